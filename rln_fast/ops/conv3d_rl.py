"""conv3d_rl_divide / conv3d_rl_multiply: a conv whose channels reach memory only as the RL step on their mean.

Inference-only (forward) ops for the fused RLN: the forward projection FP = conv(...) feeds
rl_divide, the back projection BP feeds rl_multiply, and neither C-channel tensor is stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend
from . import reference
from .conv3d import _ACTS, _as_inputs, _check


def _check_operand(op, name, a, weight):
    if a is not None:
        torch._check(a.dim() == 5 and a.shape[1] == 1,
                     lambda: f"rln_fast.{op}: '{name}' must be (N, 1, D, H, W), got {tuple(a.shape)}")
    torch._check(weight.shape[0] <= 8,
                 lambda: f"rln_fast.{op}: 'weight' may have at most 8 output channels, got {weight.shape[0]}")


@torch.library.custom_op("rln_fast::conv3d_rl_divide", mutates_args=())
def _conv3d_rl_divide(inputs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                      act: int, skip: torch.Tensor | None, x: torch.Tensor, eps: float,
                      scale: float, shift: float) -> torch.Tensor:
    return _backend.require_c("conv3d_rl_divide").conv3d_rl_divide_forward(
        inputs, weight, bias, act, skip, x, eps, scale, shift)


@_conv3d_rl_divide.register_fake
def _(inputs, weight, bias, act, skip, x, eps, scale, shift):
    _check(inputs, weight, bias, act, skip)
    _check_operand("conv3d_rl_divide", "x", x, weight)
    return torch.empty_like(x)


@torch.library.custom_op("rln_fast::conv3d_rl_multiply", mutates_args=())
def _conv3d_rl_multiply(inputs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                        act: int, e: torch.Tensor | None, offset: float) -> torch.Tensor:
    return _backend.require_c("conv3d_rl_multiply").conv3d_rl_multiply_forward(
        inputs, weight, bias, act, e, offset)


@_conv3d_rl_multiply.register_fake
def _(inputs, weight, bias, act, e, offset):
    _check(inputs, weight, bias, act, None)
    _check_operand("conv3d_rl_multiply", "e", e, weight)
    x0 = inputs[0]
    return x0.new_empty((x0.shape[0], 1, *x0.shape[2:]))


_backend.register_float32_autocast("rln_fast::conv3d_rl_divide", "rln_fast::conv3d_rl_multiply")


def _prepare(op: str, inputs, act: str, tensors) -> list[torch.Tensor]:
    inputs = _as_inputs(op, inputs, act)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*inputs, *tensors)):
        raise RuntimeError(f"rln_fast.{op} is inference-only (no backward): use conv3d followed "
                           f"by {op.removeprefix('conv3d_')} for training, or call it under "
                           "torch.no_grad()")
    return inputs


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
    """scale * x / (mean_c(act(conv3d(inputs) + bias) + softplus(skip)) + eps) + shift.

    The same as ``rl_divide(x, conv3d(inputs, weight, bias, act, skip), eps, scale, shift)``
    without writing the conv's channels. inputs as conv3d; weight [Cout <= 8, Cin, 3, 3, 3];
    x [N, 1, D, H, W]. Returns [N, 1, D, H, W]. Forward only.
    """
    inputs = _prepare("conv3d_rl_divide", inputs, act, (weight, bias, skip, x))
    if _backend.use_reference("conv3d_rl_divide", inputs[0].device):
        return reference.conv3d_rl_divide(inputs, weight, bias, act, skip, x, eps, scale, shift)
    args = (inputs, weight, bias, _ACTS[act], skip, x, float(eps), float(scale), float(shift))
    if _backend.direct(inputs, weight, bias, skip, x):
        return _backend.require_c("conv3d_rl_divide").conv3d_rl_divide_forward(*args)
    return _conv3d_rl_divide(*args)


def conv3d_rl_multiply(
    inputs: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    e: torch.Tensor | None,
    offset: float = 0.0,
) -> torch.Tensor:
    """e * (mean_c(act(conv3d(inputs) + bias)) + offset), without writing the conv's channels.

    inputs as conv3d; weight [Cout <= 8, Cin, 3, 3, 3]; e [N, 1, D, H, W], or None for 1 (the
    channel mean itself: RLN's output layer). Returns [N, 1, D, H, W]. Forward only.
    """
    inputs = _prepare("conv3d_rl_multiply", inputs, act, (weight, bias, e))
    if _backend.use_reference("conv3d_rl_multiply", inputs[0].device):
        return reference.conv3d_rl_multiply(inputs, weight, bias, act, e, offset)
    args = (inputs, weight, bias, _ACTS[act], e, float(offset))
    if _backend.direct(inputs, weight, bias, e):
        return _backend.require_c("conv3d_rl_multiply").conv3d_rl_multiply_forward(*args)
    return _conv3d_rl_multiply(*args)
