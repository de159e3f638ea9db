"""rln_fast.ops.conv3d: the fused 3x3x3 conv (multi-input, bias, softplus, skip) as a torch custom op."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend
from . import reference

_ACTS = {"none": 0, "softplus": 1}


@torch.library.custom_op("rln_fast::conv3d", mutates_args=())
def _conv3d(
    inputs: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: int,
    skip: torch.Tensor | None,
    save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, preact = _backend.require_c("conv3d").conv3d_forward(inputs, weight, bias, act, skip, save_preact)
    return out, preact


def _check(inputs, weight, bias, act, skip) -> None:
    # Mirrors check_conv3d_args in csrc/torch/conv3d.cpp for tracing (fake tensors).
    torch._check(1 <= len(inputs) <= 4, lambda: f"rln_fast.conv3d: 'inputs' must hold 1 to 4 tensors, got {len(inputs)}")
    for i, t in enumerate(inputs):
        torch._check(t.dim() == 5, lambda i=i, t=t: f"rln_fast.conv3d: 'inputs[{i}]' must be 5-D (N, C, D, H, W), got {t.dim()}-D")
        torch._check(t.dtype in (torch.float32, torch.float64),
                     lambda i=i, t=t: f"rln_fast.conv3d: 'inputs[{i}]' must be float32 or float64, got {t.dtype}")
    cin = sum(t.shape[1] for t in inputs)
    torch._check(cin > 0, lambda: "rln_fast.conv3d: the inputs must have at least 1 channel in all, got 0")
    torch._check(weight.dim() == 5, lambda: f"rln_fast.conv3d: 'weight' must be 5-D (Cout, Cin, 3, 3, 3), got {weight.dim()}-D")
    torch._check(tuple(weight.shape[2:]) == (3, 3, 3),
                 lambda: f"rln_fast.conv3d: 'weight' must have a 3x3x3 kernel, got {'x'.join(map(str, weight.shape[2:]))}")
    torch._check(weight.shape[0] > 0, lambda: "rln_fast.conv3d: 'weight' must have at least 1 output channel, got 0")
    torch._check(weight.shape[1] == cin,
                 lambda: f"rln_fast.conv3d: 'weight' expects {weight.shape[1]} input channels, but the inputs have {cin} channels in all")
    torch._check(act in (0, 1), lambda: f"rln_fast.conv3d: 'act' must be 0 (none) or 1 (softplus), got {act}")
    if bias is not None:
        torch._check(tuple(bias.shape) == (weight.shape[0],),
                     lambda: f"rln_fast.conv3d: 'bias' must be ({weight.shape[0]}), got {tuple(bias.shape)}")
    if skip is not None:
        torch._check(skip.dim() == 5 and skip.shape[1] == 1,
                     lambda: f"rln_fast.conv3d: 'skip' must have 1 channel, got {tuple(skip.shape)}")


@_conv3d.register_fake
def _(inputs, weight, bias, act, skip, save_preact):
    _check(inputs, weight, bias, act, skip)
    x0 = inputs[0]
    out = x0.new_empty((x0.shape[0], weight.shape[0], *x0.shape[2:]))
    return out, (torch.empty_like(out) if save_preact else x0.new_empty((0,)))


@torch.library.custom_op("rln_fast::conv3d_backward", mutates_args=())
def _conv3d_backward(
    grad_out: torch.Tensor,
    inputs: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: int,
    skip: torch.Tensor | None,
    preact: torch.Tensor,
    need: list[bool],
) -> list[torch.Tensor]:
    return _backend.require_c("conv3d").conv3d_backward(
        grad_out, inputs, weight, bias, act, skip, preact, need)


@_conv3d_backward.register_fake
def _(grad_out, inputs, weight, bias, act, skip, preact, need):
    like = [*inputs, weight, bias, skip]
    return [t.new_empty(t.shape) if need[i] and t is not None else grad_out.new_empty((0,))
            for i, t in enumerate(like)]


def _setup_context(ctx, inputs, output):
    xs, weight, bias, act, skip, _ = inputs
    ctx.n_inputs = len(xs)
    ctx.act = act
    ctx.has_bias = bias is not None
    ctx.has_skip = skip is not None
    ctx.save_for_backward(*xs, weight, bias, skip, output[1])


def _backward(ctx, grad_out, _grad_preact):
    *xs, weight, bias, skip, preact = ctx.saved_tensors
    n = ctx.n_inputs
    need_in = ctx.needs_input_grad
    # needs_input_grad for a list argument is one flag for the whole list.
    need = [bool(need_in[0])] * n + [bool(need_in[1]), bool(need_in[2]) and ctx.has_bias,
                                     bool(need_in[4]) and ctx.has_skip]
    grads = _conv3d_backward(grad_out, xs, weight, bias, ctx.act, skip, preact, need)
    dxs = [g if need[i] else None for i, g in enumerate(grads[:n])]
    dw = grads[n] if need[n] else None
    db = grads[n + 1] if need[n + 1] else None
    dskip = grads[n + 2] if need[n + 2] else None
    return (dxs if need_in[0] else None), dw, db, None, dskip, None


_conv3d.register_autograd(_backward, setup_context=_setup_context)
_backend.register_float32_autocast("rln_fast::conv3d", "rln_fast::conv3d_backward")


def _as_inputs(op: str, inputs, act: str) -> list[torch.Tensor]:
    """The inputs as a non-empty list, and `act` checked: shared by the conv3d-based ops."""
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if act not in _ACTS:
        raise ValueError(f"rln_fast.{op}: 'act' must be one of {sorted(_ACTS)}, got {act!r}")
    if not inputs:
        raise ValueError(f"rln_fast.{op}: 'inputs' must hold 1 to 4 tensors, got 0")
    return inputs


def conv3d(
    inputs: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused 3x3x3 conv, stride 1, zero "same" padding.

    inputs: one [N, Ci, D, H, W] tensor or a list of up to 4, read as their channel
        concatenation (no copy is made); weight [Cout, sum Ci, 3, 3, 3]; bias [Cout] or None;
        act: "none" or "softplus"; skip [N, 1, D, H, W] adds softplus(skip) to every output
        channel after the activation. Returns [N, Cout, D, H, W].

    float32 or float64, at least one input and one output channel. Under torch.autocast,
    float16/bfloat16 inputs are cast to float32. On CUDA, a call whose weights exceed one
    block's shared memory runs as several launches over chunks of input channels.
    """
    inputs = _as_inputs("conv3d", inputs, act)
    if _backend.use_reference("conv3d", inputs[0].device):
        return reference.conv3d(inputs, weight, bias, act, skip)
    if _backend.direct(inputs, weight, bias, skip):
        return _backend.require_c("conv3d").conv3d_forward(inputs, weight, bias, _ACTS[act], skip,
                                                          False)[0]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*inputs, weight, bias, skip))
    out, _ = _conv3d(inputs, weight, bias, _ACTS[act], skip, needs_grad and act == "softplus")
    return out
