"""rln_fast.ops: the fused RL ops as torch custom ops (C++ on CPU, CUDA on GPU), and their twins."""

from . import reference, reference_rl
from .conv3d import conv3d
from .conv3d_rl import conv3d_rl_divide, conv3d_rl_multiply
from .rl_classic import (
    EdgeWeights,
    edge_weights,
    psf_conv_ratio,
    psf_conv_update,
    psf_conv_update_,
    rl_predict_,
    rl_ratio,
    rl_ratio_,
    rl_update,
    rl_update_,
    store_edge_weights,
)
from .rl_divide import rl_divide
from .rl_multiply import rl_multiply

__all__ = ["conv3d", "conv3d_rl_divide", "conv3d_rl_multiply", "rl_divide", "rl_multiply",
           "rl_ratio", "rl_ratio_", "rl_predict_", "rl_update", "rl_update_", "psf_conv_ratio",
           "psf_conv_update",
           "psf_conv_update_", "edge_weights", "store_edge_weights", "EdgeWeights", "reference", "reference_rl"]
