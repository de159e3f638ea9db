"""conv3d_rl_divide / conv3d_rl_multiply (inference-only fused ops) against their twins."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from rln_fast import ops
from rln_fast.ops import reference

from .conftest import DEVICES
from .test_ops import make_conv_case, rel_err

f64 = torch.float64


def _operand(n, dhw, device, dtype=f64, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, *dhw, generator=g, dtype=dtype) + 0.1).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chans,cout", [((4, 4), 4), ((4,), 4), ((4,), 8), ((8,), 8), ((1,), 1)])
def test_fused_rl_ops_match_twin(device, chans, cout):
    xs, w, b, s = make_conv_case(2, chans, cout, (5, 7, 19), bias=True, skip=True, device=device)
    x = _operand(2, (5, 7, 19), device)
    got = ops.conv3d_rl_divide(xs, w, b, "softplus", s, x, 1e-4, 1.7, -0.2)
    want = reference.conv3d_rl_divide(xs, w, b, "softplus", s, x, 1e-4, 1.7, -0.2)
    assert rel_err(got, want) <= 1e-10
    got = ops.conv3d_rl_multiply(xs, w, b, "softplus", x, 1.0)
    want = reference.conv3d_rl_multiply(xs, w, b, "softplus", x, 1.0)
    assert rel_err(got, want) <= 1e-10
    # Without e: the plain channel mean (RLN's output layer).
    mean = reference.conv3d(xs, w, b, "softplus").mean(1, keepdim=True)
    assert rel_err(ops.conv3d_rl_multiply(xs, w, b, "softplus", None), mean) <= 1e-10


@settings(max_examples=20, deadline=None)
@given(chans=st.lists(st.integers(1, 4), min_size=1, max_size=3), cout=st.integers(1, 8),
       dhw=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 35)),
       act=st.sampled_from(["none", "softplus"]), skip=st.booleans(), seed=st.integers(0, 999))
def test_fused_rl_ops_random_shapes(chans, cout, dhw, act, skip, seed):
    xs, w, b, s = make_conv_case(1, chans, cout, dhw, bias=True, skip=skip, device="cpu", seed=seed)
    x = _operand(1, dhw, "cpu", seed=seed)
    fp_pos = reference.conv3d(xs, w, b, act, s).mean(1, keepdim=True).abs().min() > 1e-3
    if fp_pos:  # a division by a mean near -eps is ill-conditioned for any implementation
        assert rel_err(ops.conv3d_rl_divide(xs, w, b, act, s, x),
                       reference.conv3d_rl_divide(xs, w, b, act, s, x)) <= 1e-9
    assert rel_err(ops.conv3d_rl_multiply(xs, w, b, act, x, 0.5),
                   reference.conv3d_rl_multiply(xs, w, b, act, x, 0.5)) <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fused(device):
    xs, w, b, s = make_conv_case(1, (2, 2), 4, (3, 4, 5), bias=True, skip=True, device=device)
    x = _operand(1, (3, 4, 5), device)
    torch.library.opcheck(torch.ops.rln_fast.conv3d_rl_divide.default,
                          (xs, w, b, 1, s, x, 1e-4, 1.5, 0.1), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.rln_fast.conv3d_rl_multiply.default,
                          (xs, w, None, 1, x, 1.0), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.rln_fast.conv3d_rl_multiply.default,
                          (xs, w, b, 1, None, 0.0), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fused(device):
    xs, w, b, s = make_conv_case(1, (4,), 4, (4, 6, 8), bias=True, skip=True, device=device,
                                 dtype=torch.float32)
    x = _operand(1, (4, 6, 8), device, torch.float32)

    def f(a, w, b, s, x):
        r = ops.conv3d_rl_divide([a], w, b, "softplus", s, x, 1e-4, 2.0, 0.1)
        return ops.conv3d_rl_multiply([a], w, b, "softplus", r, 1.0)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(*xs, w, b, s, x),
                                   f(*xs, w, b, s, x))


def test_fused_errors():
    xs, w, b, s = make_conv_case(1, (2,), 4, (3, 4, 5), bias=True, skip=False, device="cpu")
    with pytest.raises(RuntimeError, match=r"rln_fast.conv3d_rl_divide: 'x' must have 1 channel, got 2"):
        ops.conv3d_rl_divide(xs, w, b, "softplus", None, torch.rand(1, 2, 3, 4, 5, dtype=f64))
    w9 = torch.rand(9, 2, 3, 3, 3, dtype=f64)
    with pytest.raises(RuntimeError, match=r"'weight' may have at most 8 output channels, got 9"):
        ops.conv3d_rl_multiply(xs, w9, None, "softplus", torch.rand(1, 1, 3, 4, 5, dtype=f64))
    with pytest.raises(RuntimeError, match=r"'e' must have the batch and spatial size of 'inputs\[0\]'"):
        ops.conv3d_rl_multiply(xs, w, None, "softplus", torch.rand(1, 1, 3, 4, 6, dtype=f64))
    with pytest.raises(RuntimeError, match=r"inference-only \(no backward\)"):
        ops.conv3d_rl_multiply(xs, w.requires_grad_(), None, "softplus", torch.rand(1, 1, 3, 4, 5, dtype=f64))
    with pytest.raises(ValueError, match=r"'act' must be one of"):
        ops.conv3d_rl_divide(xs, w.detach(), None, "relu", None, torch.rand(1, 1, 3, 4, 5, dtype=f64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("chans,cout", [((4, 4), 4), ((4,), 4), ((4,), 8), ((8,), 8)])
def test_fused_cuda_matches_cpu(chans, cout):
    xs, w, b, s = make_conv_case(2, chans, cout, (9, 13, 70), bias=True, skip=True, device="cpu",
                                 dtype=torch.float32)
    x = _operand(2, (9, 13, 70), "cpu", torch.float32)
    cu = [t.cuda() for t in (*xs, w, b, s, x)]
    n = len(xs)
    a = ops.conv3d_rl_divide(xs, w, b, "softplus", s, x, 1e-4, 1.3, 0.2)
    c = ops.conv3d_rl_divide(cu[:n], *cu[n:n + 2], "softplus", cu[n + 2], cu[n + 3], 1e-4, 1.3, 0.2)
    assert rel_err(c.cpu(), a) <= 1e-5
    a = ops.conv3d_rl_multiply(xs, w, b, "softplus", x, 1.0)
    c = ops.conv3d_rl_multiply(cu[:n], *cu[n:n + 2], "softplus", cu[n + 3], 1.0)
    assert rel_err(c.cpu(), a) <= 1e-5
    a = ops.conv3d_rl_multiply(xs, w, b, "softplus", None)
    c = ops.conv3d_rl_multiply(cu[:n], *cu[n:n + 2], "softplus", None)
    assert rel_err(c.cpu(), a) <= 1e-5
