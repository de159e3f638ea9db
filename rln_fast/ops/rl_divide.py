"""rln_fast.ops.rl_divide: scale * x / (mean_c(fp) + eps) + shift in one pass, as a torch custom op."""

from __future__ import annotations

import torch

from .. import _backend
from . import reference

_GRADIENTS = ("exact", "paper")


@torch.library.custom_op("rln_fast::rl_divide", mutates_args=())
def _rl_divide(x: torch.Tensor, fp: torch.Tensor, eps: float, scale: float, shift: float,
               paper: bool) -> torch.Tensor:
    return _backend.require_c("rl_divide").rl_divide_forward(x, fp, eps, scale, shift)


def _check(op, x, fp):
    torch._check(x.dim() == 5, lambda: f"rln_fast.{op}: 'x' must be 5-D (N, C, D, H, W), got {x.dim()}-D")
    torch._check(fp.dim() == 5, lambda: f"rln_fast.{op}: 'fp' must be 5-D (N, C, D, H, W), got {fp.dim()}-D")
    torch._check(x.shape[1] == 1, lambda: f"rln_fast.{op}: 'x' must have 1 channel, got {x.shape[1]}")


@_rl_divide.register_fake
def _(x, fp, eps, scale, shift, paper):
    _check("rl_divide", x, fp)
    return torch.empty_like(x)


@torch.library.custom_op("rln_fast::rl_divide_backward", mutates_args=())
def _rl_divide_backward(grad_out: torch.Tensor, x: torch.Tensor, fp: torch.Tensor, eps: float,
                        scale: float, shift: float, paper: bool, need_x: bool,
                        need_fp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dfp = _backend.require_c("rl_divide").rl_divide_backward(
        grad_out, x, fp, eps, scale, shift, paper, need_x, need_fp)
    return dx, dfp


@_rl_divide_backward.register_fake
def _(grad_out, x, fp, eps, scale, shift, paper, need_x, need_fp):
    empty = x.new_empty((0,))
    return (torch.empty_like(x) if need_x else empty), (torch.empty_like(fp) if need_fp else empty)


def _setup_context(ctx, inputs, output):
    x, fp, eps, scale, shift, paper = inputs
    ctx.args = (eps, scale, shift, paper)
    ctx.save_for_backward(x, fp)


def _backward(ctx, grad_out):
    x, fp = ctx.saved_tensors
    need_x, need_fp = ctx.needs_input_grad[:2]
    dx, dfp = _rl_divide_backward(grad_out, x, fp, *ctx.args, need_x, need_fp)
    return (dx if need_x else None), (dfp if need_fp else None), None, None, None, None


_rl_divide.register_autograd(_backward, setup_context=_setup_context)
_backend.register_float32_autocast("rln_fast::rl_divide", "rln_fast::rl_divide_backward")


def rl_divide(
    x: torch.Tensor,
    fp: torch.Tensor,
    eps: float = 1e-4,
    scale: float = 1.0,
    shift: float = 0.0,
    gradients: str = "exact",
) -> torch.Tensor:
    """scale * x / (mean_c(fp) + eps) + shift: the RL ratio with the following affine (BN) fused.

    x [N, 1, D, H, W]; fp [N, C, D, H, W] (the forward projection, averaged over channels in
    the kernel). gradients: "exact", or "paper" for the released graph's surrogate
    (dx = scale * dy, dfp = -scale * m^2 * dy / C). Returns [N, 1, D, H, W].
    """
    if gradients not in _GRADIENTS:
        raise ValueError(f"rln_fast.rl_divide: 'gradients' must be 'exact' or 'paper', got {gradients!r}")
    if _backend.use_reference("rl_divide", x.device):
        return reference.rl_divide(x, fp, eps, scale, shift, gradients)
    if _backend.direct(x, fp):
        return _backend.require_c("rl_divide").rl_divide_forward(x, fp, float(eps), float(scale),
                                                                 float(shift))
    return _rl_divide(x, fp, float(eps), float(scale), float(shift), gradients == "paper")
