"""rln_fast: fast 3D fluorescence-microscopy deconvolution (RLN and Richardson-Lucy) on PyTorch."""

from . import ops
from ._backend import backend_info

__version__ = "0.1.0"

__all__ = ["backend_info", "ops", "__version__"]
