"""rln_fast: fast 3D fluorescence-microscopy deconvolution (RLN and Richardson-Lucy) on PyTorch."""

from . import distributed, io, nn, ops, psf, synth, tiling
from ._backend import backend_info
from .deconvolve import rln_deconvolve
from .distributed import deconvolve_file
from .models.rln import RLN, FusedRLN
from .rl import richardson_lucy

__version__ = "0.1.0"

__all__ = ["RLN", "FusedRLN", "backend_info", "deconvolve_file", "distributed", "io", "nn", "ops",
           "psf", "richardson_lucy", "rln_deconvolve", "synth", "tiling", "__version__"]
