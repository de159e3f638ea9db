"""rln_fast: fast 3D fluorescence-microscopy deconvolution (RLN and Richardson-Lucy) on PyTorch.

The public names below are imported on first use (PEP 562), so that ``import rln_fast`` and
``rln-fast --help`` stay quick and do not load torch; ``rln_fast.RLN`` and
``from rln_fast import richardson_lucy`` work as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("distributed", "io", "nn", "ops", "psf", "synth", "tiling")
# public name -> the submodule that defines it
_NAMES = {
    "backend_info": "_backend",
    "rln_deconvolve": "deconvolve",
    "deconvolve_file": "distributed",
    "RLN": "models.rln",
    "FusedRLN": "models.rln",
    "richardson_lucy": "rl",
}

__all__ = ["RLN", "FusedRLN", "backend_info", "deconvolve_file", "distributed", "io", "nn", "ops",
           "psf", "richardson_lucy", "rln_deconvolve", "synth", "tiling", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
