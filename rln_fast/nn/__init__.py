"""rln_fast.nn: drop-in modules on the fused ops, for RLN and for other PyTorch 3D pipelines."""

from .layers import FusedConv3d, RLDivide, RLMultiply

__all__ = ["FusedConv3d", "RLDivide", "RLMultiply"]
