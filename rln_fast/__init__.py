"""rln_fast: fast 3D fluorescence-microscopy deconvolution (RLN and Richardson-Lucy) on PyTorch.

The public names below are imported on first use (PEP 562), so that ``import rln_fast`` and
``rln-fast --help`` stay quick and do not load torch; ``rln_fast.RLN`` and
``from rln_fast import richardson_lucy`` work as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_NAMES = {
    "backend_info": "_backend",
    "rln_deconvolve": "deconvolve",
    "norm_percentiles": "deconvolve",
    "deconvolve_file": "distributed",
    "deconvolve_stack": "stack",
    "RLN": "models.rln",
    "FusedRLN": "models.rln",
    "richardson_lucy": "rl",
}

__all__ = ["RLN", "FusedRLN", "backend_info", "deconvolve_file", "deconvolve_stack", "distributed",
           "io", "nn", "norm_percentiles", "ops", "psf", "richardson_lucy", "rln_deconvolve", "stack", "synth", "tiling",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("__"):
        # Any submodule, as after the eager imports this package used to do (rln_fast.rl, ...).
        try:
            module = importlib.import_module(f"{__name__}.{name}")
            if name == "models":  # rln_fast.models.rln.RLN, as the eager imports allowed
                importlib.import_module(f"{__name__}.models.rln")
            return module
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
