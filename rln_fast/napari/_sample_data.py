"""napari sample data: seeded synthetic widefield phantoms (rln_fast.synth) with their PSF.

Both samples use the optics of the shipped RLN model (rln_fast.demo: Born–Wolf, NA 1.45,
emission 0.461 µm, immersion 1.512, voxel (0.3, 0.13, 0.13) µm), so the RLN widget's default
model suits them. Each gives three layers: the blurred, noisy input, the ground truth (hidden)
and the PSF (hidden), all with the voxel size as their scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["phantom", "demo_volume"]

_SMALL_SHAPE = (32, 64, 64)
_SMALL_PSF_SHAPE = (17, 33, 33)
_SMALL_SEED = 0


def _layers(gt: np.ndarray, raw: np.ndarray, psf: np.ndarray, name: str,
            voxel_size: tuple[float, float, float]) -> list[tuple[Any, dict, str]]:
    scale = tuple(voxel_size)
    return [
        (raw, {"name": f"{name} input", "scale": scale}, "image"),
        (gt, {"name": f"{name} truth", "scale": scale, "visible": False}, "image"),
        (psf, {"name": f"{name} PSF", "scale": scale, "visible": False,
               "colormap": "inferno"}, "image"),
    ]


def phantom() -> list[tuple[Any, dict, str]]:
    """A small phantom (32×64×64 voxels, seed 0): quick to make and to deconvolve."""
    from rln_fast import demo, synth
    from rln_fast import psf as psf_models

    psf = psf_models.born_wolf(_SMALL_PSF_SHAPE, demo.VOXEL_SIZE, **demo.PSF_ARGS)
    gt, raw = synth.phantom_pair(psf, _SMALL_SHAPE, seed=_SMALL_SEED)
    return _layers(gt, raw, psf, "phantom", demo.VOXEL_SIZE)


def demo_volume() -> list[tuple[Any, dict, str]]:
    """The volume of ``rln-fast demo`` (64×128×128 voxels, the demo's seed and PSF)."""
    from rln_fast import demo, synth
    from rln_fast import psf as psf_models

    psf = psf_models.born_wolf(demo.PSF_SHAPE, demo.VOXEL_SIZE, **demo.PSF_ARGS)
    gt, raw = synth.phantom_pair(psf, demo.SHAPE, seed=demo.SEED)
    return _layers(gt, raw, psf, "demo", demo.VOXEL_SIZE)
