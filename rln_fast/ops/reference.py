"""Pure-torch twins of every rln_fast op: the test oracle, and a fallback users may select.

Each function computes exactly what the fused kernel computes, written with
``torch.nn.functional`` so autograd gives its exact gradient. The "paper"
surrogate gradients of the RL ops are written as autograd Functions here too,
so the twin covers both gradient modes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["softplus", "conv3d", "rl_divide", "rl_multiply", "conv3d_rl_divide", "conv3d_rl_multiply"]


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), stable for every x (no threshold switch, unlike F.softplus)."""
    return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


def conv3d(
    inputs: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """cat(inputs) [N, Cin, D, H, W] * weight [Cout, Cin, 3, 3, 3] (+ bias [Cout]), zero "same" padding.

    act: "none" or "softplus"; skip [N, 1, D, H, W] adds softplus(skip) to every output channel.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = [inputs]
    x = torch.cat(list(inputs), dim=1) if len(inputs) > 1 else inputs[0]
    y = F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2)
    if act == "softplus":
        y = softplus(y)
    if skip is not None:
        y = y + softplus(skip)
    return y


class _PaperDivide(torch.autograd.Function):
    # m = x / (d + eps) sends dm to x and -m^2 dm to d (the released training graph's gradient).
    @staticmethod
    def forward(ctx, x, d, eps):
        m = x / (d + eps)
        ctx.save_for_backward(m)
        return m

    @staticmethod
    def backward(ctx, dm):
        (m,) = ctx.saved_tensors
        return dm, -m * m * dm, None


class _PaperMultiply(torch.autograd.Function):
    # y = e * g sends dy (not dy * g) to e and dy * e to g.
    @staticmethod
    def forward(ctx, e, g):
        ctx.save_for_backward(e)
        return e * g

    @staticmethod
    def backward(ctx, dy):
        (e,) = ctx.saved_tensors
        return dy, dy * e


def rl_divide(
    x: torch.Tensor,
    fp: torch.Tensor,
    eps: float = 1e-4,
    scale: float = 1.0,
    shift: float = 0.0,
    gradients: str = "exact",
) -> torch.Tensor:
    """scale * x [N, 1, D, H, W] / (mean_c(fp [N, C, D, H, W]) + eps) + shift -> [N, 1, D, H, W]."""
    d = fp.mean(dim=1, keepdim=True)
    if gradients == "paper":
        m = _PaperDivide.apply(x, d, eps)
    else:
        m = x / (d + eps)
    return scale * m + shift


def rl_multiply(
    e: torch.Tensor, bp: torch.Tensor, offset: float = 0.0, gradients: str = "exact"
) -> torch.Tensor:
    """e [N, 1, D, H, W] * (mean_c(bp [N, C, D, H, W]) + offset) -> [N, 1, D, H, W]."""
    g = bp.mean(dim=1, keepdim=True) + offset
    if gradients == "paper":
        return _PaperMultiply.apply(e, g)
    return e * g


def conv3d_rl_divide(
    inputs: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    skip: torch.Tensor | None,
    x: torch.Tensor,
    eps: float = 1e-4,
    scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """rl_divide(x, conv3d(inputs, weight, bias, act, skip), eps, scale, shift): [N, 1, D, H, W]."""
    return rl_divide(x, conv3d(inputs, weight, bias, act, skip), eps, scale, shift)


def conv3d_rl_multiply(
    inputs: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    e: torch.Tensor | None,
    offset: float = 0.0,
) -> torch.Tensor:
    """rl_multiply(e, conv3d(inputs, weight, bias, act), offset): [N, 1, D, H, W]; e None reads as 1."""
    y = conv3d(inputs, weight, bias, act)
    return rl_multiply(torch.ones_like(y[:, :1]) if e is None else e, y, offset)
