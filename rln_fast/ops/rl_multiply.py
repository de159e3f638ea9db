"""rln_fast.ops.rl_multiply: e * (mean_c(bp) + offset) in one pass, as a torch custom op."""

from __future__ import annotations

import torch

from .. import _backend
from . import reference

_GRADIENTS = ("exact", "paper")


@torch.library.custom_op("rln_fast::rl_multiply", mutates_args=())
def _rl_multiply(e: torch.Tensor, bp: torch.Tensor, offset: float, paper: bool) -> torch.Tensor:
    return _backend.require_c("rl_multiply").rl_multiply_forward(e, bp, offset)


@_rl_multiply.register_fake
def _(e, bp, offset, paper):
    torch._check(e.dim() == 5, lambda: f"rln_fast.rl_multiply: 'e' must be 5-D (N, C, D, H, W), got {e.dim()}-D")
    torch._check(bp.dim() == 5, lambda: f"rln_fast.rl_multiply: 'bp' must be 5-D (N, C, D, H, W), got {bp.dim()}-D")
    torch._check(e.shape[1] == 1, lambda: f"rln_fast.rl_multiply: 'e' must have 1 channel, got {e.shape[1]}")
    return torch.empty_like(e)


@torch.library.custom_op("rln_fast::rl_multiply_backward", mutates_args=())
def _rl_multiply_backward(grad_out: torch.Tensor, e: torch.Tensor, bp: torch.Tensor, offset: float,
                          paper: bool, need_e: bool, need_bp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    de, dbp = _backend.require_c("rl_multiply").rl_multiply_backward(
        grad_out, e, bp, offset, paper, need_e, need_bp)
    return de, dbp


@_rl_multiply_backward.register_fake
def _(grad_out, e, bp, offset, paper, need_e, need_bp):
    empty = e.new_empty((0,))
    return (torch.empty_like(e) if need_e else empty), (torch.empty_like(bp) if need_bp else empty)


def _setup_context(ctx, inputs, output):
    e, bp, offset, paper = inputs
    ctx.args = (offset, paper)
    ctx.save_for_backward(e, bp)


def _backward(ctx, grad_out):
    e, bp = ctx.saved_tensors
    need_e, need_bp = ctx.needs_input_grad[:2]
    de, dbp = _rl_multiply_backward(grad_out, e, bp, *ctx.args, need_e, need_bp)
    return (de if need_e else None), (dbp if need_bp else None), None, None


_rl_multiply.register_autograd(_backward, setup_context=_setup_context)
_backend.register_float32_autocast("rln_fast::rl_multiply", "rln_fast::rl_multiply_backward")


def rl_multiply(
    e: torch.Tensor, bp: torch.Tensor, offset: float = 0.0, gradients: str = "exact"
) -> torch.Tensor:
    """e * (mean_c(bp) + offset): the RL multiplicative update with the channel mean fused.

    e [N, 1, D, H, W]; bp [N, C, D, H, W] (the back projection). gradients: "exact", or "paper"
    for the released graph's surrogate (de = dy instead of dy * g). Returns [N, 1, D, H, W].
    """
    if gradients not in _GRADIENTS:
        raise ValueError(f"rln_fast.rl_multiply: 'gradients' must be 'exact' or 'paper', got {gradients!r}")
    if _backend.use_reference("rl_multiply", e.device):
        return reference.rl_multiply(e, bp, offset, gradients)
    if _backend.direct(e, bp):
        return _backend.require_c("rl_multiply").rl_multiply_forward(e, bp, float(offset))
    return _rl_multiply(e, bp, float(offset), gradients == "paper")
