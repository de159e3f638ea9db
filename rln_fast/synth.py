"""Synthetic RLN training data: the official phantom recipe (DESIGN "Synthetic data"), seeded.

Also, as options not in the official recipe: ``microscopy_pair`` (``recipe="microscopy"``,
data that look like real stacks) and ``recipe="mixed"`` (see the end of this module).

A phantom is drawn in three stages, each a pure function of ``seed``:

1. ``phantom_params(shape, seed)`` draws every shape's position, size and intensity with
   ``numpy.random.default_rng(seed)`` in a fixed order (the order of ``FAMILIES``; per
   family: positions, then sizes, then intensities).
2. ``phantom(shape, seed)`` rasterises them by assignment (later shapes overwrite earlier
   ones) and adds the background 30: the un-blurred object, values in [30, 880].
3. ``phantom_pair(psf, shape, seed)`` blurs the object with the 5³ Gaussian (σ = 0.7 voxel,
   sum 1, zero padding) into the ground truth, and simulates the microscope input:
   I = 5·GT, B = I ⊛ PSF (circular, by FFT), B1 = Poisson(B),
   raw = clip(B1 + N(0, 0.5²), 0, max B1), left at the ×5 scale.

Reproducibility: the blur and the FFT convolution run in float64 on ``device`` (so CPU and
GPU agree to ~1e-12 before the cast to float32); the Poisson and Gaussian draws always come
from a CPU ``torch.Generator`` seeded with ``seed``, so the same seed gives the same noise
on every device (a count could only differ where B differs across devices by float64
rounding at a Poisson sampling boundary, which is vanishingly rare).

Axes are (z, y, x) in voxels. Generalised to shapes other than 128³ the way the recipe
sits in a 128³ box: sphere/shell centres uniform in [8, side − 11] per axis; dots, lines,
sheets and boxes are drawn so that they always lie fully inside (start ranges: dots
[0, side − 4], the long sides of lines and sheets [0, side − 14], boxes [0, side − 9]).
Every side must be at least 19 voxels. As in the original rasteriser, a shell is tested
only inside its box centre ± semi-axes, which trims the outer (q ≤ 1.3) surface where it
pokes past that box along the axes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FAMILIES", "RECIPES", "phantom_params", "phantom", "phantom_pair", "pair_kind", "simulate_input",
    "write_pairs",
    "microscopy_object", "microscopy_pair", "sparse_object",
]

# "official": the recipe above. "microscopy": microscopy_pair (cells, nuclei, filaments, haze,
# uneven background, camera). "mixed": even seeds official, odd seeds microscopy.
# "mixed_sparse": seed % 3 == 0 official, 1 microscopy, 2 sparse (sparse_object: a few beads
# and bars smaller than or near the PSF on a dark background, the camera of microscopy_pair).
RECIPES = ("official", "microscopy", "mixed", "mixed_sparse")
MIXED_MICROSCOPY_EVERY = 2  # the "mixed" recipe: one volume in this many a microscopy one

# (family, count) in drawing and rasterising order.
FAMILIES: tuple[tuple[str, int], ...] = (
    ("sphere", 100),
    ("shell", 100),
    ("dot", 50),
    ("line_x", 50),
    ("line_y", 50),
    ("line_z", 50),
    ("sheet_xy", 50),
    ("sheet_xz", 50),
    ("sheet_yz", 50),
    ("box", 50),
)

MIN_SIDE = 19  # sphere/shell centres in [8, side - 11]
BACKGROUND = 30.0
INTENSITY_RANGE = (50.0, 850.0)
RADIUS_RANGE = (4, 7)  # spheres and shell semi-axes, inclusive
SHELL_RANGE = (0.8, 1.3)  # normalised radius² of the shells, inclusive
LENGTH_RANGE = (2, 10)  # lines and sheet sides, inclusive
BOX_RANGE = (2, 6)  # box sides, inclusive
THICKNESS = 2  # dots, line sections and sheet thickness
BLUR_SIGMA = 0.7
BLUR_SIZE = 5
PHOTON_SCALE = 5.0
READ_NOISE = 0.5

# Rasteriser kinds.
_BOX, _SPHERE, _SHELL = 0, 1, 2

_CENTRE_LO = 8
_CENTRE_HI_MARGIN = 11  # centre <= side - 11
# Start ranges [0, side - margin]: the 128³ recipe's ranges, all shapes fully inside.
_DOT_MARGIN = 4
_LONG_MARGIN = 14
_BOX_MARGIN = 9

# family -> axes (z=0, y=1, x=2) that are long (2..10); the others are 2 thick.
_LONG_AXES: dict[str, tuple[int, ...]] = {
    "dot": (),
    "line_x": (2,), "line_y": (1,), "line_z": (0,),
    "sheet_xy": (1, 2), "sheet_xz": (0, 2), "sheet_yz": (0, 1),
}


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        items = tuple(int(s) for s in shape)
        ok = len(items) == 3 and all(int(s) == s for s in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"shape must be 3 integers (z, y, x), got {shape!r}")
    if min(items) < MIN_SIDE:
        raise ValueError(
            f"shape must have every side >= {MIN_SIDE} voxels (sphere centres lie in "
            f"[8, side - 11]), got {items}"
        )
    return items  # type: ignore[return-value]


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_microscopy_every(every: Any) -> int:
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"microscopy_every must be an integer >= 1, got {every!r}")
    return int(every)


def phantom_params(
    shape: Sequence[int] = (128, 128, 128), seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """The drawn parameter table of one phantom, family by family (see ``FAMILIES``).

    Returns ``{family: fields}``; every family has ``intensity`` [n] float64. "sphere":
    ``centre`` [n, 3], ``radius`` [n]; "shell": ``centre`` [n, 3], ``semi_axes`` [n, 3];
    the others: ``start`` [n, 3] (lowest corner) and ``size`` [n, 3] (voxels). Integer
    fields are int64; axes (z, y, x).
    """
    side = np.asarray(_check_shape(shape), dtype=np.int64)
    rng = np.random.default_rng(_check_seed(seed))
    ilo, ihi = INTENSITY_RANGE
    out: dict[str, dict[str, np.ndarray]] = {}
    for family, n in FAMILIES:
        if family in ("sphere", "shell"):
            centre = rng.integers(_CENTRE_LO, side - _CENTRE_HI_MARGIN + 1, size=(n, 3))
            if family == "sphere":
                size_field = ("radius", rng.integers(RADIUS_RANGE[0], RADIUS_RANGE[1] + 1, size=n))
            else:
                size_field = (
                    "semi_axes", rng.integers(RADIUS_RANGE[0], RADIUS_RANGE[1] + 1, size=(n, 3))
                )
            fields = {"centre": centre, size_field[0]: size_field[1]}
        elif family == "box":
            start = rng.integers(0, side - _BOX_MARGIN + 1, size=(n, 3))
            size = rng.integers(BOX_RANGE[0], BOX_RANGE[1] + 1, size=(n, 3))
            fields = {"start": start, "size": size}
        else:
            long_axes = _LONG_AXES[family]
            hi = np.array(
                [s - (_LONG_MARGIN if a in long_axes else _DOT_MARGIN) for a, s in enumerate(side)]
            )
            start = rng.integers(0, hi + 1, size=(n, 3))
            size = np.full((n, 3), THICKNESS, dtype=np.int64)
            if long_axes:
                size[:, list(long_axes)] = rng.integers(
                    LENGTH_RANGE[0], LENGTH_RANGE[1] + 1, size=(n, len(long_axes))
                )
            fields = {"start": start, "size": size}
        fields["intensity"] = rng.uniform(ilo, ihi, size=n)
        out[family] = {k: np.asarray(v, dtype=np.float64 if k == "intensity" else np.int64)
                       for k, v in fields.items()}
    return out


def _shape_table(params: dict[str, dict[str, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Flatten the families, in order, into one table the rasteriser walks.

    Returns kind [n] int64, lo [n, 3], hi [n, 3] (inclusive bounding box), centre [n, 3],
    semi [n, 3] (int64) and intensity [n] float32.
    """
    kinds, los, his, cens, semis, ints = [], [], [], [], [], []
    for family, _ in FAMILIES:
        p = params[family]
        n = p["intensity"].shape[0]
        if family in ("sphere", "shell"):
            c = p["centre"]
            a = np.repeat(p["radius"][:, None], 3, axis=1) if family == "sphere" else p["semi_axes"]
            kinds.append(np.full(n, _SPHERE if family == "sphere" else _SHELL))
            los.append(c - a)
            his.append(c + a)
            cens.append(c)
            semis.append(a)
        else:
            kinds.append(np.full(n, _BOX))
            los.append(p["start"])
            his.append(p["start"] + p["size"] - 1)
            cens.append(np.zeros((n, 3), np.int64))
            semis.append(np.ones((n, 3), np.int64))
        ints.append(p["intensity"])
    cat = np.concatenate
    return (
        cat(kinds).astype(np.int64), cat(los).astype(np.int64), cat(his).astype(np.int64),
        cat(cens).astype(np.int64), cat(semis).astype(np.int64), cat(ints).astype(np.float32),
    )


_numba_kernel: Any = None


def _get_numba_kernel() -> Any:
    """JIT the rasteriser on first use (numba imported lazily); None when numba is missing."""
    global _numba_kernel
    if _numba_kernel is not None:
        return _numba_kernel
    try:
        import numba
    except ImportError:
        return None

    shell_lo, shell_hi = SHELL_RANGE

    @numba.njit(parallel=True, cache=True)
    def raster(vol, kind, lo, hi, cen, semi, inten):  # pragma: no cover - runs compiled
        # One thread per z plane; every thread walks all shapes in order, so on each voxel
        # the later shape wins exactly as in a serial loop.
        nz = vol.shape[0]
        n = kind.shape[0]
        for z in numba.prange(nz):
            for s in range(n):
                if z < lo[s, 0] or z > hi[s, 0]:
                    continue
                k = kind[s]
                dz = z - cen[s, 0]
                for y in range(lo[s, 1], hi[s, 1] + 1):
                    dy = y - cen[s, 1]
                    for x in range(lo[s, 2], hi[s, 2] + 1):
                        dx = x - cen[s, 2]
                        if k == 0:
                            inside = True
                        elif k == 1:
                            inside = dz * dz + dy * dy + dx * dx <= semi[s, 0] * semi[s, 0]
                        else:
                            q = ((dz * dz) / (semi[s, 0] * semi[s, 0])
                                 + (dy * dy) / (semi[s, 1] * semi[s, 1])
                                 + (dx * dx) / (semi[s, 2] * semi[s, 2]))
                            inside = q >= shell_lo and q <= shell_hi
                        if inside:
                            vol[z, y, x] = inten[s]

    _numba_kernel = raster
    return raster


def _run_keeping_torch_threads(kernel: Any, *args: Any) -> None:
    """Runs a numba parallel kernel on no more threads than torch uses, and leaves torch's count
    as it was.

    numba's OpenMP threading layer binds to the libgomp torch has loaded, and its first launch
    sets the calling thread's OpenMP team size to numba's own thread count (all cores). After it,
    ``torch.get_num_threads()`` and rln_fast's CPU kernels would use every core even where the
    caller asked for fewer (two ``--threads 1`` trainings side by side then fight over both cores).
    """
    import numba  # noqa: PLC0415 - loaded already: the kernel is numba's

    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(numba_threads)
        torch.set_num_threads(torch_threads)


def _raster_numpy(vol: np.ndarray, kind, lo, hi, cen, semi, inten) -> None:
    """Pure-numpy twin of the numba rasteriser (same float64 shell test, same order)."""
    shell_lo, shell_hi = SHELL_RANGE
    for s in range(kind.shape[0]):
        sl = tuple(slice(lo[s, a], hi[s, a] + 1) for a in range(3))
        if kind[s] == _BOX:
            vol[sl] = inten[s]
            continue
        dz, dy, dx = (
            np.arange(lo[s, a], hi[s, a] + 1, dtype=np.int64) - cen[s, a] for a in range(3)
        )
        dz, dy, dx = dz[:, None, None], dy[None, :, None], dx[None, None, :]
        if kind[s] == _SPHERE:
            mask = dz * dz + dy * dy + dx * dx <= semi[s, 0] * semi[s, 0]
        else:
            q = ((dz * dz) / (semi[s, 0] * semi[s, 0])
                 + (dy * dy) / (semi[s, 1] * semi[s, 1])
                 + (dx * dx) / (semi[s, 2] * semi[s, 2]))
            mask = (q >= shell_lo) & (q <= shell_hi)
        vol[sl][mask] = inten[s]


def _rasterise(shape: tuple[int, int, int], params: dict, backend: str = "auto") -> np.ndarray:
    table = _shape_table(params)
    vol = np.zeros(shape, dtype=np.float32)
    kernel = _get_numba_kernel() if backend in ("auto", "numba") else None
    if backend == "numba" and kernel is None:
        raise ImportError("rln_fast.synth: backend='numba' needs numba (pip install numba)")
    if kernel is not None:
        _run_keeping_torch_threads(kernel, vol, *table)
    else:
        _raster_numpy(vol, *table)
    return vol


def phantom(
    shape: Sequence[int] = (128, 128, 128), seed: int = 0, *, backend: str = "auto"
) -> np.ndarray:
    """The un-blurred phantom object with its background: float32 (z, y, x), values in [30, 880].

    backend: "auto" (numba when installed, else numpy), "numba" or "numpy"; all give the
    same array.
    """
    if backend not in ("auto", "numba", "numpy"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}")
    shape_t = _check_shape(shape)
    vol = _rasterise(shape_t, phantom_params(shape_t, seed), backend)
    vol += np.float32(BACKGROUND)
    return vol


def _gaussian_taps(sigma: float = BLUR_SIGMA, size: int = BLUR_SIZE) -> np.ndarray:
    # The 5³ kernel exp(-r²/2σ²)/sum is separable: each axis gets these normalised taps.
    r = np.arange(size, dtype=np.float64) - size // 2
    t = np.exp(-(r * r) / (2.0 * sigma * sigma))
    return t / t.sum()


def _blur(vol: torch.Tensor) -> torch.Tensor:
    """vol [D, H, W] (float64) convolved with the 5³ Gaussian, zero padding ("same")."""
    taps = _gaussian_taps()
    h = len(taps) // 2
    out = vol
    for axis in range(3):
        n = out.shape[axis]
        pad = [0, 0] * 3
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = h  # F.pad lists the last axis first
        padded = torch.nn.functional.pad(out, pad)
        acc = torch.zeros_like(out)
        for k, w in enumerate(taps):
            acc += float(w) * padded.narrow(axis, k, n)
        out = acc
    return out


def _align_psf(psf: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Zero-pad or crop psf to shape, its voxel ``psf.shape // 2`` landing on ``shape // 2``."""
    out = np.zeros(shape, dtype=np.float64)
    src, dst = [], []
    for n_in, n_out in zip(psf.shape, shape, strict=True):
        off = n_out // 2 - n_in // 2  # where psf index 0 lands in out
        a0, a1 = max(0, -off), min(n_in, n_out - off)
        src.append(slice(a0, a1))
        dst.append(slice(a0 + off, a1 + off))
    out[tuple(dst)] = psf[tuple(src)]
    return out


def _as_psf(psf: Any) -> np.ndarray:
    if isinstance(psf, torch.Tensor):
        psf = psf.detach().cpu().numpy()
    arr = np.asarray(psf, dtype=np.float64)
    if arr.ndim != 3 or arr.size == 0:
        raise ValueError(f"psf must be a 3-D array (z, y, x), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.sum() <= 0:
        raise ValueError("psf must be finite, non-negative and not all zero")
    return arr / arr.sum()


def simulate_input(
    gt: Any,
    psf: Any,
    seed: int = 0,
    *,
    scale: float = PHOTON_SCALE,
    read_noise: float = READ_NOISE,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """The recipe's microscope: raw input (float32 numpy, z, y, x) for a ground truth gt.

    B = (scale·gt) ⊛ psf, circular FFT convolution with the PSF normalised to sum 1 and
    centred (its voxel ``psf.shape // 2`` becomes the origin; zero-padded or cropped to
    gt's shape); raw = clip(Poisson(B) + N(0, read_noise²), 0, max Poisson(B)), left at
    the ``scale`` (default ×5) intensity scale. The FFT runs in float64 on ``device``
    (default CPU); the noise is drawn on the CPU from ``torch.Generator().manual_seed(seed)``
    so every device gives the same input.
    """
    seed = _check_seed(seed)
    psf_arr = _as_psf(psf)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(gt, torch.Tensor):
        g = gt.detach().to(device=dev, dtype=torch.float64)
    else:
        g = torch.from_numpy(np.asarray(gt, dtype=np.float64)).to(dev)
    if g.dim() != 3:
        raise ValueError(f"gt must be a 3-D array (z, y, x), got shape {tuple(g.shape)}")
    shape_t = tuple(g.shape)

    kernel = np.fft.ifftshift(_align_psf(psf_arr, shape_t))  # centre -> index 0
    otf = torch.fft.rfftn(torch.from_numpy(kernel).to(dev))
    b = torch.fft.irfftn(torch.fft.rfftn(g * float(scale)) * otf, s=shape_t)
    # FFT rounding leaves |B| ~ 1e-13 negatives where B should be 0; Poisson needs B >= 0.
    b = b.clamp_min(0.0).cpu()

    gen = torch.Generator(device="cpu").manual_seed(seed)
    b1 = torch.poisson(b, generator=gen)
    noise = torch.randn(shape_t, generator=gen, dtype=torch.float64) * float(read_noise)
    raw = (b1 + noise).clamp(0.0, float(b1.max()))
    return raw.numpy().astype(np.float32)


def pair_kind(seed: int, recipe: str = "official", microscopy_every: int = MIXED_MICROSCOPY_EVERY) -> str:
    """Which generator ``phantom_pair(psf, shape, seed, recipe=..., microscopy_every=...)`` uses:
    "official", "microscopy" or "sparse". Two calls with the same seed, shape and kind return
    the same pair whatever their recipes, so a cache of pairs may key on the kind."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    seed = _check_seed(seed)
    every = _check_microscopy_every(microscopy_every)
    if recipe == "microscopy" or (recipe == "mixed" and seed % every == every - 1) or (
            recipe == "mixed_sparse" and seed % 3 == 1):
        return "microscopy"
    if recipe == "mixed_sparse" and seed % 3 == 2:
        return "sparse"
    return "official"


def phantom_pair(
    psf: Any,
    shape: Sequence[int] = (128, 128, 128),
    seed: int = 0,
    device: str | torch.device | None = None,
    *,
    scale: float = PHOTON_SCALE,
    read_noise: float = READ_NOISE,
    recipe: str = "official",
    microscopy_every: int = MIXED_MICROSCOPY_EVERY,
) -> tuple[np.ndarray, np.ndarray]:
    """One training pair (gt, raw), both float32 numpy (z, y, x) of ``shape``.

    recipe: "official" (default, described here), "microscopy" (``microscopy_pair``; scale
    and read_noise are then ignored), "mixed" (official for even seeds, microscopy for odd;
    generally microscopy where seed % ``microscopy_every`` == microscopy_every − 1, one
    volume in ``microscopy_every``; the other recipes ignore it) or "mixed_sparse" (by
    seed % 3: official, microscopy, ``microscopy_pair(..., kind="sparse")``).

    gt: ``phantom(shape, seed)`` blurred by the 5³ Gaussian (σ 0.7 voxel, sum 1, zero
    padding), computed in float64 on ``device``. raw: ``simulate_input(gt, psf, seed)``,
    at the ×``scale`` intensity scale. psf: numpy/torch array (z, y, x) sampled at the
    phantom's voxel size. The same seed gives the same pair on every device.
    """
    shape_t = _check_shape(shape)
    kind = pair_kind(seed, recipe, microscopy_every)
    seed = int(seed)
    if kind == "microscopy":
        return microscopy_pair(psf, shape_t, seed, device)
    if kind == "sparse":
        return microscopy_pair(psf, shape_t, seed, device, kind="sparse")
    psf_arr = _as_psf(psf)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gt = _blur(torch.from_numpy(phantom(shape_t, seed)).to(device=dev, dtype=torch.float64))
    raw = simulate_input(gt, psf_arr, seed, scale=scale, read_noise=read_noise, device=dev)
    return gt.cpu().numpy().astype(np.float32), raw


def _atomic_imwrite(path: Path, arr: np.ndarray) -> None:
    import tifffile

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tifffile.imwrite(tmp, arr)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_pairs(
    out_dir: str | os.PathLike,
    n: int,
    psf: Any,
    shape: Sequence[int] = (128, 128, 128),
    seed: int = 0,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    skip_existing: bool = False,
    recipe: str = "official",
) -> list[tuple[Path, Path]]:
    """Write n pairs as ``out_dir/gt/NNN.tif`` and ``out_dir/input/NNN.tif`` (float32 TIFF).

    Pair i is ``phantom_pair(psf, shape, seed + i, device, recipe=recipe)``. Each file is written to a
    temporary name and renamed, so a killed run never leaves a partial TIFF. skip_existing:
    keep pairs whose two files are both there (a rerun of a killed run finishes it; pair i
    only depends on seed + i). Returns the (gt, input) paths.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    seed = _check_seed(seed)
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    out = Path(out_dir)
    (out / "gt").mkdir(parents=True, exist_ok=True)
    (out / "input").mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(max(int(n) - 1, 0))))
    items: Any = range(int(n))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="phantoms", unit="pair")
    paths = []
    for i in items:
        name = f"{i:0{width}d}.tif"
        if skip_existing and (out / "gt" / name).is_file() and (out / "input" / name).is_file():
            paths.append((out / "gt" / name, out / "input" / name))
            continue
        gt, raw = phantom_pair(psf, shape, seed + i, device, recipe=recipe)
        _atomic_imwrite(out / "gt" / name, gt)
        _atomic_imwrite(out / "input" / name, raw)
        paths.append((out / "gt" / name, out / "input" / name))
    return paths


# --------------------------------------------------------------------------- microscopy recipe
#
# Not part of the official recipe: training data that look like widefield/confocal stacks.
# Every range below is drawn from numpy.random.default_rng(seed) in the order written.

MICRO_NUCLEI = (2, 7)  # textured ellipsoids per volume (nucleus/cell size), inclusive
MICRO_RADIUS = (8.0, 40.0)  # their lateral semi-axes, voxels
MICRO_Z_RATIO = (0.35, 0.8)  # z semi-axis / lateral semi-axis (z voxels are coarser)
MICRO_FILAMENTS = (0, 30)  # filaments per volume, inclusive
MICRO_PUNCTA = (0, 300)  # small spots per volume, inclusive
MICRO_PHOTONS = (30.0, 3000.0)  # peak photons of the blurred object, log-uniform
MICRO_BACKGROUND = (0.0, 0.15)  # mean of the uneven background, fraction of the peak
MICRO_OFFSET = (0.0, 500.0)  # camera offset (ADU), uniform
MICRO_GAIN = (0.5, 4.0)  # ADU per photon, log-uniform
MICRO_READ_NOISE = (0.5, 8.0)  # read noise (ADU, sd), uniform


def _gauss(vol: np.ndarray, sigma: Any) -> np.ndarray:
    """Circular Gaussian blur (σ per axis, voxels) by FFT, float32."""
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (3,))
    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))
    freqs = [torch.fft.fftfreq(n, dtype=torch.float64) for n in vol.shape[:2]]
    freqs.append(torch.fft.rfftfreq(vol.shape[2], dtype=torch.float64))
    h = None
    for a, f in enumerate(freqs):
        g = torch.exp(-2.0 * (np.pi * sig[a] * f) ** 2).to(torch.float32)
        g = g.view([-1 if i == a else 1 for i in range(3)])
        h = g if h is None else h * g
    return torch.fft.irfftn(torch.fft.rfftn(t) * h, s=vol.shape).numpy()


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _object_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or min(shape_t) < 8:
        raise ValueError(f"shape must be 3 integers >= 8 (z, y, x), got {shape!r}")
    return shape_t  # type: ignore[return-value]


def _uneven_background(rng: np.random.Generator, shape: tuple[int, int, int],
                       mean: tuple[float, float]) -> np.ndarray:
    """Smooth positive noise (features tens of voxels across) whose mean is drawn from
    ``mean`` (a fraction of the object's peak), float32."""
    field = _gauss(rng.standard_normal(shape).astype(np.float32), (6.0, 12.0, 12.0))
    field = np.exp(rng.uniform(0.1, 0.6) * field / max(float(field.std()), 1e-12))
    return (field * (rng.uniform(*mean) / float(field.mean()))).astype(np.float32)


def microscopy_object(shape: Sequence[int], seed: int = 0, textured: bool = True,
                      sharp_edges: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(object, background) float32 (z, y, x), values >= 0, object maximum 1: a pure function of seed.

    object: 2-7 textured, soft-edged ellipsoids of nucleus/cell size (lateral semi-axes
    8-40 voxels, rotated in the (y, x) plane; some hollow, as nuclear envelopes or
    membranes), each with its own brightness and a smooth random texture (dark and bright
    domains 1-4 voxels across); 0-30 filaments (smooth random curves ~2 voxels thick);
    0-300 puncta (Gaussian spots). background: a smooth, uneven field (features tens of
    voxels across) with a mean of 0-0.15 of the object's maximum. Objects may lie partly
    outside the volume.
    Ablations (the recipes keep the defaults; every draw is made either way, so the objects
    are the same): ``textured=False`` fills each ellipsoid evenly (no texture);
    ``sharp_edges=True`` gives a solid ellipsoid an edge 0.25 voxels wide instead of 0.7-2,
    and a hollow one a shell of half its drawn thickness (σ 0.35-1 voxels instead of 1-2).
    """
    shape_t = _object_shape(shape)
    rng = np.random.default_rng(_check_seed(seed))
    nz, ny, nx = shape_t
    obj = np.zeros(shape_t, np.float32)
    # Textures shared by the volume's ellipsoids (each samples its own part of them).
    tex = []
    for sigma in (rng.uniform(1.0, 2.0), rng.uniform(2.0, 4.0)):
        t = _gauss(rng.standard_normal(shape_t).astype(np.float32), sigma)
        tex.append(t / max(float(t.std()), 1e-12))
    for _ in range(int(rng.integers(MICRO_NUCLEI[0], MICRO_NUCLEI[1] + 1))):
        r = rng.uniform(*MICRO_RADIUS)
        axes = np.array([r * rng.uniform(*MICRO_Z_RATIO), r, r * rng.uniform(0.6, 1.0)])
        centre = np.array([rng.uniform(-0.2, 1.2) * nz, rng.uniform(0, ny), rng.uniform(0, nx)])
        theta = rng.uniform(0, np.pi)
        brightness = rng.uniform(0.25, 1.0)
        hollow = rng.uniform() < 0.25
        contrast = rng.uniform(0.2, 0.8)
        mix = rng.uniform()
        edge = rng.uniform(0.7, 2.0)
        lo = np.maximum(np.floor(centre - axes - 3).astype(int), 0)
        hi = np.minimum(np.ceil(centre + axes + 4).astype(int), shape_t)
        if np.any(hi <= lo):
            continue
        z, y, x = (np.arange(lo[a], hi[a], dtype=np.float32) - centre[a] for a in range(3))
        z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
        c, s = np.cos(theta), np.sin(theta)
        u, v = c * y + s * x, -s * y + c * x
        rho = np.sqrt((z / axes[0]) ** 2 + (u / axes[1]) ** 2 + (v / axes[2]) ** 2)
        depth = (1.0 - rho) * axes[1]  # ~voxels inside the surface
        if hollow:
            shell = edge / 2 if sharp_edges else max(edge, 1.0)
            mask = np.exp(-0.5 * (depth / shell) ** 2)
        else:
            mask = 1.0 / (1.0 + np.exp(-np.clip(depth / (0.25 if sharp_edges else edge), -30, 30)))
        sl = tuple(slice(lo[a], hi[a]) for a in range(3))
        texture = mix * tex[0][sl] + (1 - mix) * tex[1][sl]
        if not textured:
            contrast = 0.0
        val = brightness * mask * np.clip(1.0 + contrast * texture, 0.0, None)
        np.maximum(obj[sl], val.astype(np.float32), out=obj[sl])
    # Filaments: smooth random walks splatted into the grid, then thickened.
    fil = np.zeros(shape_t, np.float32)
    for _ in range(int(rng.integers(MICRO_FILAMENTS[0], MICRO_FILAMENTS[1] + 1))):
        n = int(rng.integers(40, 400))
        p = np.array([rng.uniform(0, nz), rng.uniform(0, ny), rng.uniform(0, nx)])
        d = rng.standard_normal(3)
        d[0] *= 0.4  # mostly lateral, as in a cell
        turns = rng.standard_normal((n, 3)) * rng.uniform(0.05, 0.3)
        brightness = rng.uniform(0.2, 1.0)
        pts = np.empty((n, 3))
        for i in range(n):
            d = d / max(np.linalg.norm(d), 1e-12)
            p = p + 0.5 * d
            pts[i] = p
            d = d + turns[i]
        idx = np.round(pts).astype(int) % np.array(shape_t)
        np.add.at(fil, (idx[:, 0], idx[:, 1], idx[:, 2]), brightness)
    if fil.any():
        fil = _gauss(fil, 0.8)
        fil *= 1.0 / 0.5  # a straight line at 2 points/voxel peaks near 2/(2π·0.8²) ≈ 0.5
    # Puncta: points blurred into spots.
    dots = np.zeros(shape_t, np.float32)
    m = int(rng.integers(MICRO_PUNCTA[0], MICRO_PUNCTA[1] + 1))
    if m:
        idx = np.stack([rng.integers(0, s, size=m) for s in shape_t], axis=1)
        np.add.at(dots, (idx[:, 0], idx[:, 1], idx[:, 2]), rng.uniform(0.1, 1.0, size=m).astype(np.float32))
        dots = _gauss(dots, 0.9) / 0.0871  # a point peaks at (2π·0.9²)^-1.5 ≈ 0.0871
    obj = np.maximum(obj, np.maximum(fil, dots))
    obj /= max(float(obj.max()), 1e-12)
    return obj.astype(np.float32), _uneven_background(rng, shape_t, MICRO_BACKGROUND)


SPARSE_BEADS = (1, 40)  # beads per volume, inclusive
SPARSE_BEAD_SIGMA = (0.35, 1.2)  # lateral σ of a bead, voxels (axial: 0.45 of it)
SPARSE_BARS = (0, 8)  # straight bars per volume, inclusive
SPARSE_BACKGROUND = (0.0, 0.05)  # mean of the uneven background, fraction of the peak


def sparse_object(shape: Sequence[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(object, background) like ``microscopy_object``, for sparse bright structure: 1-40
    beads (Gaussian spots of lateral σ 0.35-1.2 voxels, axial 0.45 of that: sub-resolution
    beads), 0-8 straight bars (5-40 voxels long, 1-3 across) of log-uniform brightness 0.05-1,
    on a dark uneven background (mean 0-0.05 of the peak). Volumes like a bead slide or
    flowdec's bars, which the cell-filled microscopy volumes never show: a few bright voxels
    on a dark field, far above the volume's 99.5th percentile once normalised."""
    shape_t = _object_shape(shape)
    rng = np.random.default_rng([_check_seed(seed), 3])
    obj = np.zeros(shape_t, np.float32)
    grid = [np.arange(n, dtype=np.float32) for n in shape_t]
    for _ in range(int(rng.integers(SPARSE_BEADS[0], SPARSE_BEADS[1] + 1))):
        sig = rng.uniform(*SPARSE_BEAD_SIGMA)
        sigma = np.array([0.45 * sig, sig, sig])
        centre = np.array([rng.uniform(0, n) for n in shape_t])
        bright = _log_uniform(rng, 0.05, 1.0)
        lo = np.maximum(np.floor(centre - 4 * sigma - 1).astype(int), 0)
        hi = np.minimum(np.ceil(centre + 4 * sigma + 2).astype(int), shape_t)
        if np.any(hi <= lo):
            continue
        z, y, x = (grid[a][lo[a]:hi[a]] - centre[a] for a in range(3))
        spot = np.exp(-0.5 * ((z[:, None, None] / sigma[0]) ** 2 + (y[None, :, None] / sigma[1]) ** 2
                              + (x[None, None, :] / sigma[2]) ** 2))
        sl = tuple(slice(lo[a], hi[a]) for a in range(3))
        np.maximum(obj[sl], (bright * spot).astype(np.float32), out=obj[sl])
    for _ in range(int(rng.integers(SPARSE_BARS[0], SPARSE_BARS[1] + 1))):
        length, width = rng.uniform(5, 40), rng.uniform(1.0, 3.0)
        centre = np.array([rng.uniform(0, n) for n in shape_t])
        d = rng.standard_normal(3)
        d[0] *= 0.3
        d /= max(float(np.linalg.norm(d)), 1e-12)
        bright = _log_uniform(rng, 0.05, 1.0)
        reach = length / 2 + 3 * width
        lo = np.maximum(np.floor(centre - reach).astype(int), 0)
        hi = np.minimum(np.ceil(centre + reach + 1).astype(int), shape_t)
        if np.any(hi <= lo):
            continue
        z, y, x = np.meshgrid(*(grid[a][lo[a]:hi[a]] - centre[a] for a in range(3)), indexing="ij")
        along = z * d[0] + y * d[1] + x * d[2]
        across2 = z * z + y * y + x * x - along * along
        inside = 1.0 / (1.0 + np.exp(np.clip((np.abs(along) - length / 2) / 0.7, -30, 30)))
        bar = inside * np.exp(-0.5 * np.maximum(across2, 0.0) / (width / 2) ** 2)
        sl = tuple(slice(lo[a], hi[a]) for a in range(3))
        np.maximum(obj[sl], (bright * bar).astype(np.float32), out=obj[sl])
    obj /= max(float(obj.max()), 1e-12)
    return obj.astype(np.float32), _uneven_background(rng, shape_t, SPARSE_BACKGROUND)


def microscopy_pair(
    psf: Any,
    shape: Sequence[int] = (128, 128, 128),
    seed: int = 0,
    device: str | torch.device | None = None,
    kind: str = "cells",
    background_in_truth: float = 1.0,
    outside_objects: bool = True,
    textured: bool = True,
    sharp_edges: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A training pair (gt, raw) that looks like a microscope stack; float32 numpy (z, y, x).

    kind: "cells" (``microscopy_object``) or "sparse" (``sparse_object``: beads and bars).
    background_in_truth: the fraction of the uneven background that gt holds, in [0, 1]: 1
    (the recipes) keeps it all, 0 leaves it out so that a network learns to remove it as
    haze. raw is the same whatever the fraction (ablations in the model card).
    outside_objects: False empties the object above and below the volume (the background
    stays), so that raw holds no out-of-focus haze from outside it (an ablation; the recipes
    keep them). textured, sharp_edges: ``microscopy_object``'s ablations (kind "cells" only).
    The object and background are drawn taller than ``shape`` by
    the PSF's axial half-size above and below, so that objects outside the volume send
    out-of-focus haze into it. With P the peak photons (log-uniform 30-3000):
    gt = P·(object + background) blurred by the recipe's 5³ Gaussian, cropped to ``shape``;
    raw = gain·Poisson(P·(object ⊛ psf) + P·background) + offset + N(0, read²), cropped,
    clipped at 0, with gain log-uniform 0.5-4 ADU/photon, offset 0-500 ADU, read noise
    0.5-8 ADU. The convolution is circular over the tall volume (float64 FFT on
    ``device``); noise comes from a CPU generator seeded with ``seed``.
    """
    shape_t = _check_shape(shape)
    seed = _check_seed(seed)
    psf_arr = _as_psf(psf)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    margin = psf_arr.shape[0] // 2
    tall = (shape_t[0] + 2 * margin, shape_t[1], shape_t[2])
    if kind not in ("cells", "sparse"):
        raise ValueError(f"kind must be 'cells' or 'sparse', got {kind!r}")
    keep = float(background_in_truth)
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"background_in_truth must be in [0, 1], got {background_in_truth!r}")
    if kind == "cells":
        obj, bg = microscopy_object(tall, seed, textured=textured, sharp_edges=sharp_edges)
    elif not textured or sharp_edges:
        raise ValueError("textured and sharp_edges apply to kind='cells' only")
    else:
        obj, bg = sparse_object(tall, seed)
    if not outside_objects:
        obj[:margin] = 0.0
        obj[margin + shape_t[0]:] = 0.0
    rng = np.random.default_rng([seed, 1])  # camera draws, independent of the object's stream
    photons = _log_uniform(rng, *MICRO_PHOTONS)
    gain = _log_uniform(rng, *MICRO_GAIN)
    offset = rng.uniform(*MICRO_OFFSET)
    read = rng.uniform(*MICRO_READ_NOISE)
    o = torch.from_numpy(obj).to(device=dev, dtype=torch.float64)
    kernel = np.fft.ifftshift(_align_psf(psf_arr, tall))
    otf = torch.fft.rfftn(torch.from_numpy(kernel).to(dev))
    b = torch.fft.irfftn(torch.fft.rfftn(o) * otf, s=tall).clamp_min(0.0)
    k = photons / max(float(b.max()), 1e-12)
    crop = slice(margin, margin + shape_t[0])
    b = (b[crop] + torch.from_numpy(bg[crop]).to(dev, torch.float64)) * k
    gt = _blur((o[crop] + keep * torch.from_numpy(bg[crop]).to(dev, torch.float64)) * k)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    counts = torch.poisson(b.cpu(), generator=gen)
    noise = torch.randn(shape_t, generator=gen, dtype=torch.float64) * read
    raw = (gain * counts + offset + noise).clamp_min(0.0)
    return gt.cpu().numpy().astype(np.float32), raw.numpy().astype(np.float32)
