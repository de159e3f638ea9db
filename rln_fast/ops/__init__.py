"""rln_fast.ops: the fused RL ops as torch custom ops (C++ on CPU, CUDA on GPU), and their twins."""

from . import reference
from .conv3d import conv3d
from .rl_divide import rl_divide
from .rl_multiply import rl_multiply

__all__ = ["conv3d", "rl_divide", "rl_multiply", "reference"]
