"""The fused ops against their pure-torch twins: values, gradients, opcheck, compile, edge cases, errors."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import rln_fast
from rln_fast import ops
from rln_fast.ops import reference

from .conftest import DEVICES, fresh_python

f64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def make_conv_case(n, chans, cout, dhw, *, bias, skip, device, dtype=f64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(n, c, *dhw, generator=g, dtype=dtype) for c in chans]
    w = torch.randn(cout, sum(chans), 3, 3, 3, generator=g, dtype=dtype) * 0.3
    b = torch.randn(cout, generator=g, dtype=dtype) if bias else None
    s = torch.randn(n, 1, *dhw, generator=g, dtype=dtype) * 3 if skip else None
    out = [t.to(device).requires_grad_(requires_grad) if t is not None else None for t in (*inputs, w, b, s)]
    return out[: len(chans)], out[len(chans)], out[len(chans) + 1], out[len(chans) + 2]


RLN_LAYERS = [((1,), 4), ((4,), 4), ((4, 4), 4), ((1,), 8), ((8,), 8), ((8, 8), 8), ((8, 1, 1), 8), ((8, 8), 8)]


# (a) float64 against the twin -------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chans,cout", RLN_LAYERS)
@pytest.mark.parametrize("act", ["none", "softplus"])
def test_conv3d_matches_reference_rln_layers(device, chans, cout, act):
    xs, w, b, s = make_conv_case(2, chans, cout, (5, 7, 9), bias=True, skip=True, device=device)
    got = ops.conv3d(xs, w, b, act, s)
    want = reference.conv3d(xs, w, b, act, s)
    assert got.shape == want.shape and got.dtype == f64 and got.device == want.device
    assert rel_err(got, want) <= 1e-10


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 2),
    chans=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    cout=st.integers(1, 11),
    dhw=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 40)),
    bias=st.booleans(),
    skip=st.booleans(),
    act=st.sampled_from(["none", "softplus"]),
    seed=st.integers(0, 2**16),
)
def test_conv3d_matches_reference_random_shapes(n, chans, cout, dhw, bias, skip, act, seed):
    xs, w, b, s = make_conv_case(n, chans, cout, dhw, bias=bias, skip=skip, device="cpu", seed=seed)
    assert rel_err(ops.conv3d(xs, w, b, act, s), reference.conv3d(xs, w, b, act, s)) <= 1e-10


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 9),
    dhw=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 33)),
    eps=st.floats(1e-6, 1e-1),
    scale=st.floats(-3, 3),
    shift=st.floats(-3, 3),
    offset=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_rl_ops_match_reference_random_shapes(n, c, dhw, eps, scale, shift, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, *dhw, generator=g, dtype=f64) + 0.1
    fp = torch.rand(n, c, *dhw, generator=g, dtype=f64) + 0.1
    assert rel_err(ops.rl_divide(x, fp, eps, scale, shift),
                   reference.rl_divide(x, fp, eps, scale, shift)) <= 1e-10
    assert rel_err(ops.rl_multiply(x, fp, offset), reference.rl_multiply(x, fp, offset)) <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_float32_close_to_float64_twin(device):
    xs, w, b, s = make_conv_case(1, (8, 8), 8, (6, 10, 37), bias=True, skip=True, device=device,
                                 dtype=torch.float32)
    got = ops.conv3d(xs, w, b, "softplus", s)
    want = reference.conv3d([x.double() for x in xs], w.double(), b.double(), "softplus", s.double())
    assert rel_err(got.double(), want) <= 1e-5


# (b) gradcheck on tiny volumes ------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chans", [(1,), (2, 3), (1, 1, 2)])
@pytest.mark.parametrize("act", ["none", "softplus"])
def test_conv3d_gradcheck(device, chans, act):
    xs, w, b, s = make_conv_case(2, chans, 3, (3, 4, 5), bias=True, skip=True, device=device,
                                 requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.conv3d(list(a[:-3]), a[-3], a[-2], act, a[-1]),
                                    (*xs, w, b, s))


@pytest.mark.parametrize("device", DEVICES)
def test_conv3d_gradcheck_partial_requires_grad(device):
    xs, w, b, s = make_conv_case(1, (2,), 2, (3, 3, 4), bias=True, skip=True, device=device)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: ops.conv3d(xs, w, b, "softplus", s), (w,))
    xs[0].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.conv3d([x], w.detach(), None, "softplus"), (xs[0],))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gradients", ["exact", "paper"])
def test_rl_ops_gradients(device, gradients):
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(2, 1, 3, 4, 5, generator=g, dtype=f64) + 0.2).to(device).requires_grad_()
    fp = (torch.rand(2, 3, 3, 4, 5, generator=g, dtype=f64) + 0.2).to(device).requires_grad_()
    if gradients == "exact":
        assert torch.autograd.gradcheck(lambda a, b: ops.rl_divide(a, b, 1e-4, 1.3, 0.2), (x, fp))
        assert torch.autograd.gradcheck(lambda a, b: ops.rl_multiply(a, b, 0.7), (x, fp))
    # Both modes: the same gradients as the twin (which writes the paper surrogate by hand).
    for op, ref, args in ((ops.rl_divide, reference.rl_divide, (1e-4, 1.3, 0.2)),
                          (ops.rl_multiply, reference.rl_multiply, (0.7,))):
        dy = torch.randn(x.shape, generator=g, dtype=f64).to(device)
        got = torch.autograd.grad(op(x, fp, *args, gradients=gradients), (x, fp), dy)
        want = torch.autograd.grad(ref(x, fp, *args, gradients=gradients), (x, fp), dy)
        for a, b in zip(got, want, strict=True):
            assert rel_err(a, b) <= 1e-10


def test_paper_gradients_differ_from_exact():
    x = torch.rand(1, 1, 2, 2, 3, dtype=f64, requires_grad=True)
    fp = torch.rand(1, 2, 2, 2, 3, dtype=f64, requires_grad=True) + 0.5
    ge = torch.autograd.grad(ops.rl_divide(x, fp).sum(), (x, fp))
    gp = torch.autograd.grad(ops.rl_divide(x, fp, gradients="paper").sum(), (x, fp))
    assert torch.allclose(gp[0], torch.ones_like(x))  # dx = dy under the surrogate
    assert not torch.allclose(ge[0], gp[0]) and not torch.allclose(ge[1], gp[1])


def test_double_backward_is_an_error():
    xs, w, b, s = make_conv_case(1, (1,), 2, (3, 3, 3), bias=False, skip=False, device="cpu",
                                 requires_grad=True)
    y = ops.conv3d(xs, w, None, "softplus")
    (gw,) = torch.autograd.grad(y.sum(), w, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gw.sum(), w)


# (c) torch.library.opcheck ----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    xs, w, b, s = make_conv_case(1, (2, 1), 3, (3, 4, 5), bias=True, skip=True, device=device,
                                 requires_grad=True)
    torch.library.opcheck(torch.ops.rln_fast.conv3d.default, (xs, w, b, 1, s, True))
    torch.library.opcheck(torch.ops.rln_fast.conv3d.default, (xs, w, None, 0, None, False))
    x = (torch.rand(1, 1, 3, 4, 5, dtype=f64, device=device) + 0.1).requires_grad_()
    fp = (torch.rand(1, 3, 3, 4, 5, dtype=f64, device=device) + 0.1).requires_grad_()
    torch.library.opcheck(torch.ops.rln_fast.rl_divide.default, (x, fp, 1e-4, 1.5, 0.1, False))
    torch.library.opcheck(torch.ops.rln_fast.rl_divide.default, (x, fp, 1e-4, 1.5, 0.1, True))
    torch.library.opcheck(torch.ops.rln_fast.rl_multiply.default, (x, fp, 1.0, False))
    torch.library.opcheck(torch.ops.rln_fast.rl_multiply.default, (x, fp, 1.0, True))


# (d) edge cases and error messages --------------------------------------------------------

def test_non_contiguous_inputs():
    base = torch.randn(2, 6, 5, 6, 7, dtype=f64)
    x = base[:, ::2]  # every other channel: not contiguous
    w = torch.randn(4, 3, 3, 3, 3, dtype=f64).transpose(2, 4)
    skip = torch.randn(2, 1, 7, 6, 5, dtype=f64).permute(0, 1, 4, 3, 2)
    assert not x.is_contiguous() and not w.is_contiguous() and not skip.is_contiguous()
    assert rel_err(ops.conv3d(x, w, None, "softplus", skip),
                   reference.conv3d(x, w, None, "softplus", skip)) <= 1e-10
    e = base[:, :1].transpose(3, 4).contiguous().transpose(3, 4)
    assert rel_err(ops.rl_multiply(base[:, :1, :, :, ::1], x, 1.0), reference.rl_multiply(base[:, :1], x, 1.0)) <= 1e-10
    assert rel_err(ops.rl_divide(e.abs(), x.abs()), reference.rl_divide(e.abs(), x.abs())) <= 1e-10


def test_batch_zero_and_size_one():
    xs, w, b, s = make_conv_case(0, (2,), 3, (4, 5, 6), bias=True, skip=True, device="cpu")
    assert ops.conv3d(xs, w, b, "softplus", s).shape == (0, 3, 4, 5, 6)
    assert ops.rl_divide(torch.rand(0, 1, 2, 2, 2), torch.rand(0, 3, 2, 2, 2)).shape == (0, 1, 2, 2, 2)
    assert ops.rl_multiply(torch.rand(0, 1, 2, 2, 2), torch.rand(0, 3, 2, 2, 2)).shape == (0, 1, 2, 2, 2)
    xs, w, b, s = make_conv_case(1, (1,), 2, (1, 1, 1), bias=True, skip=True, device="cpu")
    assert rel_err(ops.conv3d(xs, w, b, "softplus", s), reference.conv3d(xs, w, b, "softplus", s)) <= 1e-10


def test_batch_zero_backward():
    xs, w, b, s = make_conv_case(0, (2,), 3, (4, 5, 6), bias=True, skip=False, device="cpu",
                                 requires_grad=True)
    ops.conv3d(xs, w, b, "softplus").sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ops.conv3d(torch.rand(1, 5, 5, 5), torch.rand(2, 1, 3, 3, 3)),
         r"rln_fast.conv3d: 'inputs\[0\]' must be 5-D \(N, C, D, H, W\), got 4-D"),
        (lambda: ops.conv3d(torch.rand(1, 1, 5, 5, 5, dtype=torch.float16), torch.rand(2, 1, 3, 3, 3)),
         r"'inputs\[0\]' must be float32 or float64, got Half"),
        (lambda: ops.conv3d(torch.rand(1, 1, 5, 5, 5), torch.rand(2, 1, 3, 3, 3, dtype=f64)),
         r"'weight' must have the dtype of 'inputs\[0\]'"),
        (lambda: ops.conv3d(torch.rand(1, 2, 5, 5, 5), torch.rand(2, 3, 3, 3, 3)),
         r"'weight' expects 3 input channels, but the inputs have 2 channels in all"),
        (lambda: ops.conv3d([torch.rand(1, 2, 5, 5, 5), torch.rand(1, 2, 5, 5, 5)], torch.rand(2, 3, 3, 3, 3)),
         r"'weight' expects 3 input channels, but the inputs have 4 channels in all"),
        (lambda: ops.conv3d(torch.rand(1, 1, 5, 5, 5), torch.rand(2, 1, 5, 5, 5)),
         r"'weight' must have a 3x3x3 kernel, got 5x5x5"),
        (lambda: ops.conv3d(torch.rand(1, 1, 5, 5, 5), torch.rand(2, 1, 3, 3)),
         r"'weight' must be 5-D \(Cout, Cin, 3, 3, 3\), got 4-D"),
        (lambda: ops.conv3d([torch.rand(1, 1, 5, 5, 5), torch.rand(1, 1, 5, 5, 4)], torch.rand(2, 2, 3, 3, 3)),
         r"'inputs\[1\]' must have the batch and spatial size of 'inputs\[0\]' \(1, 1, 5, 5, 5\), got \(1, 1, 5, 5, 4\)"),
        (lambda: ops.conv3d([torch.rand(1, 1, 2, 2, 2)] * 5, torch.rand(2, 5, 3, 3, 3)),
         r"'inputs' must hold 1 to 4 tensors, got 5"),
        (lambda: ops.conv3d([], torch.rand(2, 5, 3, 3, 3)), r"'inputs' must hold 1 to 4 tensors, got 0"),
        (lambda: ops.conv3d(torch.rand(1, 1, 5, 5, 5), torch.rand(2, 1, 3, 3, 3), torch.rand(3)),
         r"'bias' must be \(2\), got \(3\)"),
        (lambda: ops.conv3d(torch.rand(1, 1, 5, 5, 5), torch.rand(2, 1, 3, 3, 3), skip=torch.rand(1, 2, 5, 5, 5)),
         r"'skip' must have 1 channel, got 2"),
        (lambda: ops.conv3d(torch.rand(1, 1, 5, 5, 5), torch.rand(2, 1, 3, 3, 3), act="relu"),
         r"'act' must be one of \['none', 'softplus'\], got 'relu'"),
        (lambda: ops.rl_divide(torch.rand(1, 2, 3, 3, 3), torch.rand(1, 2, 3, 3, 3)),
         r"rln_fast.rl_divide: 'x' must have 1 channel, got 2"),
        (lambda: ops.rl_divide(torch.rand(1, 1, 3, 3, 3), torch.rand(1, 2, 3, 3)),
         r"rln_fast.rl_divide: 'fp' must be 5-D \(N, C, D, H, W\), got 4-D"),
        (lambda: ops.rl_divide(torch.rand(1, 1, 3, 3, 3), torch.rand(1, 2, 3, 3, 4)),
         r"rln_fast.rl_divide: 'fp' must have the batch and spatial size of 'x'"),
        (lambda: ops.rl_divide(torch.rand(1, 1, 3, 3, 3), torch.rand(1, 2, 3, 3, 3), gradients="approx"),
         r"'gradients' must be 'exact' or 'paper', got 'approx'"),
        (lambda: ops.rl_multiply(torch.ones(1, 1, 3, 3, 3, dtype=torch.int32), torch.rand(1, 2, 3, 3, 3)),
         r"rln_fast.rl_multiply: 'e' must be float32 or float64, got Int"),
        (lambda: ops.rl_multiply(torch.rand(1, 1, 3, 3, 3), torch.rand(1, 2, 3, 3, 3, dtype=f64)),
         r"rln_fast.rl_multiply: 'bp' must have the dtype of 'e'"),
        (lambda: ops.rl_multiply(torch.rand(1, 1, 3, 3, 3), torch.rand(1, 0, 3, 3, 3)),
         r"rln_fast.rl_multiply: 'bp' must have at least 1 channel, got 0"),
    ],
)
def test_error_messages(make, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        make()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_device_mismatch_message():
    with pytest.raises(RuntimeError, match=r"'weight' must be on the device of 'inputs\[0\]'"):
        ops.conv3d(torch.rand(1, 1, 3, 3, 3, device="cuda"), torch.rand(2, 1, 3, 3, 3))


def test_device_mismatch_message_meta():
    # Without a GPU the device check is exercised with the meta device on the C++ side.
    with pytest.raises(RuntimeError, match=r"'fp' must be on the device of 'x'|must be on CPU or CUDA"):
        rln_fast._backend.require_c("rl_divide").rl_divide_forward(
            torch.rand(1, 1, 2, 2, 2), torch.rand(1, 1, 2, 2, 2, device="meta"), 1e-4, 1.0, 0.0)


def test_backend_info():
    info = rln_fast.backend_info()
    assert info["cpu"] is True
    assert set(info) >= {"cpu", "cuda", "cuda_arch", "torch"}
    assert isinstance(info["cuda_arch"], list)
    if not info["cuda"]:
        assert "cuda_missing_reason" in info


def test_direct_calls_only_where_the_dispatcher_adds_nothing():
    # Eager inference calls the kernels straight away (no torch._dynamo import); gradients,
    # autocast and traced (fake/functional) tensors go through the custom ops.
    from rln_fast import _backend

    x = torch.rand(1, 1, 2, 2, 2)
    w = torch.rand(1, 1, 3, 3, 3, requires_grad=True)
    assert _backend.direct(x, None, [x, x])
    assert not _backend.direct(x, w)
    with torch.no_grad():
        assert _backend.direct(x, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not _backend.direct(x, w)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not _backend.direct(mode.from_tensor(x))


def test_inference_never_imports_dynamo():
    code = ("import sys, numpy as np, rln_fast as rf\n"
            "v = np.random.default_rng(0).random((8, 16, 16), dtype=np.float32)\n"
            "rf.rln_deconvolve(v, progress=False)\n"
            "print('torch._dynamo' in sys.modules)\n")
    assert fresh_python(code).strip() == "False"


def test_cpu_kernels_read_subnormals_as_zero_and_restore_the_callers_mode():
    # Subnormal floats cost a microcode assist per operation on x86; the CPU kernels run with
    # FTZ/DAZ inside their parallel regions and leave the caller's floating-point mode as it was.
    import platform

    tiny = 1e-39  # a float32 subnormal
    x = torch.full((1, 1, 4, 4, 4), tiny)
    w = torch.ones(1, 1, 3, 3, 3)
    y = ops.conv3d(x, w, None, "none")
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert torch.count_nonzero(y) == 0
    else:
        assert torch.count_nonzero(y) == y.numel()
    # Gradients too: the sigmoid of a strongly negative pre-activation is subnormal.
    xg = torch.full((1, 1, 4, 4, 4), -90.0, requires_grad=True)
    (g,) = torch.autograd.grad(ops.conv3d(xg, w, None, "softplus").sum(), (xg,))
    assert torch.isfinite(g).all()
    # The caller's threads (this one and torch's workers) still compute subnormals.
    assert float(np.float32(1e-38) * np.float32(0.01)) != 0.0
    big = torch.full((1 << 20,), 1e-38) * 0.01
    assert torch.count_nonzero(big) == big.numel()


# (e) torch.compile and CUDA vs the CPU twin -----------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    xs, w, b, s = make_conv_case(1, (2, 2), 4, (4, 5, 6), bias=True, skip=True, device=device,
                                 dtype=torch.float32, requires_grad=True)
    x1 = (torch.rand(1, 1, 4, 5, 6, device=device) + 0.1)

    def f(a, c, w, b, s, x1):
        y = ops.conv3d([a, c], w, b, "softplus", s)
        r = ops.rl_divide(x1, y, 1e-4, 2.0, 0.5)
        return ops.rl_multiply(r, y, 1.0)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(*xs, w, b, s, x1)
    got = compiled(*xs, w, b, s, x1)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    g_eager = torch.autograd.grad(eager.sum(), (*xs, w, b, s))
    g_comp = torch.autograd.grad(got.sum(), (*xs, w, b, s))
    for a, c in zip(g_comp, g_eager, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("chans,cout", RLN_LAYERS + [((16,), 8), ((3,), 10), ((2,), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu_twin(chans, cout, dtype):
    xs, w, b, s = make_conv_case(2, chans, cout, (9, 13, 70), bias=True, skip=True, device="cpu",
                                 dtype=dtype, requires_grad=True)
    cpu_out = ops.conv3d(xs, w, b, "softplus", s)
    dy = torch.randn_like(cpu_out)
    cpu_grads = torch.autograd.grad(cpu_out, (*xs, w, b, s), dy)
    cu = [t.detach().cuda().requires_grad_() for t in (*xs, w, b, s)]
    cuda_out = ops.conv3d(cu[: len(xs)], *cu[len(xs):-1], "softplus", cu[-1])
    cuda_grads = torch.autograd.grad(cuda_out, cu, dy.cuda())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert rel_err(cuda_out.cpu(), cpu_out) <= tol
    for a, c in zip(cuda_grads, cpu_grads, strict=True):
        assert rel_err(a.cpu(), c) <= tol * 10


def test_cuda_tensor_without_cuda_build_falls_back_with_warning(monkeypatch):
    # A build without CUDA kernels says so once, then runs the twin.
    from rln_fast import _backend

    monkeypatch.setattr(_backend, "BUILT_WITH_CUDA", False)
    monkeypatch.setattr(_backend, "_warned", set())
    x = torch.rand(1, 1, 3, 3, 3, device="meta")
    fp = torch.rand(1, 2, 3, 3, 3, device="meta")
    with pytest.warns(RuntimeWarning, match="running the pure-torch reference"):
        ops.rl_divide(x, fp)
