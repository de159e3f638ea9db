"""FusedConv3d, RLDivide, RLMultiply: nn.Modules that own parameters and call the fused ops."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .. import ops


class FusedConv3d(nn.Module):
    """3x3x3 conv, stride 1, zero "same" padding, with bias, activation and skip fused.

    Equivalent to ``act(conv3d(torch.cat(inputs, 1), weight) + bias) + softplus(skip)`` but
    reads the inputs in place (no concatenation copy) and writes the output once.

    Args:
        in_channels: total input channels (the sum over the tensors passed to forward).
        out_channels: output channels.
        bias: learn a per-channel bias.
        act: "none" or "softplus".
    Shapes: inputs [N, Ci, D, H, W] (one tensor or a list whose Ci sum to in_channels),
        skip [N, 1, D, H, W] or None; output [N, out_channels, D, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = True,
                 act: str = "none", device=None, dtype=None) -> None:
        super().__init__()
        if act not in ("none", "softplus"):
            raise ValueError(f"FusedConv3d: 'act' must be 'none' or 'softplus', got {act!r}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"FusedConv3d: channel counts must be >= 1, got {in_channels} -> {out_channels}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.act = in_channels, out_channels, act
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3, 3, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same initialisation as nn.Conv3d, so swapping one for the other changes nothing.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * 27)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv3d(cls, conv: nn.Conv3d, act: str = "none") -> FusedConv3d:
        """Wraps an existing nn.Conv3d (3x3x3, stride 1, padding 1, no groups/dilation)."""
        ok = (conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1) and conv.groups == 1
              and conv.dilation == (1, 1, 1) and conv.padding in ((1, 1, 1), "same")
              and conv.padding_mode == "zeros")
        if not ok:
            raise ValueError("FusedConv3d.from_conv3d: needs a 3x3x3, stride 1, padding 1, zero-padded, "
                             f"ungrouped, undilated conv, got {conv}")
        m = cls(conv.in_channels, conv.out_channels, bias=conv.bias is not None, act=act,
                device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(conv.weight)
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
        return m

    def forward(self, inputs: torch.Tensor | Sequence[torch.Tensor],
                skip: torch.Tensor | None = None) -> torch.Tensor:
        return ops.conv3d(inputs, self.weight, self.bias, self.act, skip)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}"
        if self.bias is None:
            s += ", bias=False"
        if self.act != "none":
            s += f", act={self.act!r}"
        return s


class RLDivide(nn.Module):
    """The RL ratio ``scale * x / (mean_c(fp) + eps) + shift`` (x [N,1,...], fp [N,C,...]).

    No learnable parameters: scale and shift are constants (an eval-mode affine folded in).
    gradients: "exact", or "paper" for the released RLN graph's surrogate gradient.
    """

    def __init__(self, eps: float = 1e-4, scale: float = 1.0, shift: float = 0.0,
                 gradients: str = "exact") -> None:
        super().__init__()
        if gradients not in ("exact", "paper"):
            raise ValueError(f"RLDivide: 'gradients' must be 'exact' or 'paper', got {gradients!r}")
        self.eps, self.scale, self.shift, self.gradients = float(eps), float(scale), float(shift), gradients

    def reset_parameters(self) -> None:
        """Nothing to reset: the module has no parameters."""

    def forward(self, x: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
        return ops.rl_divide(x, fp, self.eps, self.scale, self.shift, self.gradients)

    def extra_repr(self) -> str:
        parts = [] if self.eps == 1e-4 else [f"eps={self.eps:g}"]
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        if self.shift != 0.0:
            parts.append(f"shift={self.shift:g}")
        if self.gradients != "exact":
            parts.append(f"gradients={self.gradients!r}")
        return ", ".join(parts)


class RLMultiply(nn.Module):
    """The RL update ``e * (mean_c(bp) + offset)`` (e [N,1,...], bp [N,C,...]); no parameters."""

    def __init__(self, offset: float = 0.0, gradients: str = "exact") -> None:
        super().__init__()
        if gradients not in ("exact", "paper"):
            raise ValueError(f"RLMultiply: 'gradients' must be 'exact' or 'paper', got {gradients!r}")
        self.offset, self.gradients = float(offset), gradients

    def reset_parameters(self) -> None:
        """Nothing to reset: the module has no parameters."""

    def forward(self, e: torch.Tensor, bp: torch.Tensor) -> torch.Tensor:
        return ops.rl_multiply(e, bp, self.offset, self.gradients)

    def extra_repr(self) -> str:
        parts = [] if self.offset == 0.0 else [f"offset={self.offset:g}"]
        if self.gradients != "exact":
            parts.append(f"gradients={self.gradients!r}")
        return ", ".join(parts)
