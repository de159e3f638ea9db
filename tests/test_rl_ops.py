"""The classic-RL ops (rl_ratio, rl_update, psf_conv_ratio, psf_conv_update) against their twins:
values in float64, the Bertero weights against Hᵀ1 itself, opcheck, edge cases, every error."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

from rln_fast import _backend
from rln_fast.ops import reference_rl as ref
from rln_fast.ops import rl_classic as rc

from .conftest import DEVICES, fresh_python

f64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def rand(*shape, g, lo=0.0, dtype=f64, device="cpu"):
    return (torch.rand(*shape, generator=g, dtype=dtype) + lo).to(device)


def fft_case(n, img, work, psf_shape, *, g, device="cpu", dtype=f64):
    """image [n,1,img], blurred / estimate / correction [n,1,work], a PSF, Bertero weights."""
    psf = rand(*psf_shape, g=g, dtype=dtype)
    psf = psf / psf.sum()
    w = rc.edge_weights(psf, work, img, circular=True, device=device)
    return (rand(n, 1, *img, g=g, dtype=dtype, device=device),
            rand(n, 1, *work, g=g, lo=0.1, dtype=dtype, device=device),
            rand(n, 1, *work, g=g, lo=0.1, dtype=dtype, device=device),
            rand(n, 1, *work, g=g, dtype=dtype, device=device), psf.to(device), w)


# (a) float64 against the twins ------------------------------------------------------------

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 2),
    img=st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 19)),
    psf_shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
    extra=st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 4)),
    background=st.floats(-0.5, 2.0),
    tv=st.sampled_from([0.0, 0.003, 0.2, 3.0]),
    clamp_min=st.sampled_from([0.0, 0.05]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fft_ops_match_twins_random_shapes(n, img, psf_shape, extra, background, tv, clamp_min,
                                           weighted, seed):
    g = torch.Generator().manual_seed(seed)
    work = tuple(a + b - 1 + e for a, b, e in zip(img, psf_shape, extra, strict=True))
    image, blurred, est, corr, _, w = fft_case(n, img, work, psf_shape, g=g)
    w = w if weighted else None
    assert rel_err(rc.rl_ratio(image, blurred, background, 1e-3),
                   ref.rl_ratio(image, blurred, background, 1e-3)) <= 1e-10
    for periodic in (True, False):
        got = rc.rl_update(est, corr, w, tv, clamp_min, 0.01, periodic)
        assert rel_err(got, ref.rl_update(est, corr, w, tv, clamp_min, 0.01, periodic)) <= 1e-10
    # In place with the Biggs bookkeeping.
    prev, change = rand(n, 1, *work, g=g), rand(n, 1, *work, g=g) - 0.5
    want = ref.rl_update_biggs(est, corr, prev, change, w, tv, clamp_min, 0.01, weighted)
    c2, p2, ch2 = corr.clone(), prev.clone(), change.clone()
    dots = rc.rl_update_(c2, est, w, tv, clamp_min, 0.01, weighted, previous=p2, change=ch2)
    for a, b in zip((c2, p2, ch2, dots), want, strict=True):
        assert rel_err(a, b) <= 1e-10


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 2),
    img=st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 17)),
    half=st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 3)),
    ext=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    tv=st.sampled_from([0.0, 0.01, 1.0]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_direct_ops_match_twins_random_shapes(n, img, half, ext, tv, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    psf = rand(*(2 * h + 1 for h in half), g=g)
    est_shape = tuple(a + 2 * e for a, e in zip(img, ext, strict=True))  # image centred, any even margin
    image = rand(n, 1, *img, g=g)
    est = rand(n, 1, *est_shape, g=g, lo=0.05)
    ratio = rand(n, 1, *img, g=g)
    w = rc.edge_weights(psf, est_shape, img, ext, circular=False) if weighted else None
    assert rel_err(rc.psf_conv_ratio(image, est, psf, 0.3, 1e-3),
                   ref.psf_conv_ratio(image, est, psf, 0.3, 1e-3)) <= 1e-10
    assert rel_err(rc.psf_conv_update(est, ratio, psf, w, tv, 0.0, 0.02),
                   ref.psf_conv_update(est, ratio, psf, w, tv, 0.0, 0.02)) <= 1e-10
    prev, change = rand(n, 1, *est_shape, g=g), rand(n, 1, *est_shape, g=g)
    want = ref.psf_conv_update_biggs(est, ratio, psf, prev, change, w, tv, 0.0, 0.02)
    out, p2, ch2 = torch.empty_like(est), prev.clone(), change.clone()
    dots = rc.psf_conv_update_(out, est, ratio, psf, w, tv, 0.0, 0.02, previous=p2, change=ch2)
    for a, b in zip((out, p2, ch2, dots), want, strict=True):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_float32_close_to_float64(device):
    g = torch.Generator().manual_seed(1)
    image, blurred, est, corr, psf, w = fft_case(1, (5, 9, 33), (9, 13, 40), (5, 5, 8), g=g,
                                                 device=device)
    f32 = [t.float() for t in (image, blurred, est, corr)]
    assert rel_err(rc.rl_ratio(f32[0], f32[1], 0.2, 1e-6), ref.rl_ratio(image, blurred, 0.2, 1e-6)) <= 1e-6
    assert rel_err(rc.rl_update(f32[2], f32[3], w, 0.01, 0.0, 0.01),
                   ref.rl_update(est, corr, w, 0.01, 0.0, 0.01)) <= 1e-5
    k = psf[:5, :5, :7].contiguous()
    assert rel_err(rc.psf_conv_ratio(f32[0], f32[2][:, :, :9, :13, :37].contiguous(), k.float()),
                   ref.psf_conv_ratio(image, est[:, :, :9, :13, :37], k)) <= 1e-5


# the weights: 1 / Hᵀ1_M ---------------------------------------------------------------------

def _adjoint_of_mask_fft(psf: torch.Tensor, work, img) -> torch.Tensor:
    """Hᵀ 1_M on a circular job: correlation of the mask with the PSF (centre shape // 2)."""
    mask = torch.zeros(work, dtype=f64)
    mask[: img[0], : img[1], : img[2]] = 1
    k = torch.zeros(work, dtype=f64)
    k[: psf.shape[0], : psf.shape[1], : psf.shape[2]] = psf
    k = torch.roll(k, [-(n // 2) for n in psf.shape], (0, 1, 2))
    return torch.fft.irfftn(torch.fft.rfftn(mask) * torch.fft.rfftn(k).conj(), s=work)


@pytest.mark.parametrize("psf_shape", [(3, 5, 7), (4, 6, 5), (1, 1, 1), (5, 2, 9)])
@pytest.mark.parametrize("extra", [(0, 0, 0), (3, 1, 2)])
def test_edge_weights_are_the_inverse_adjoint_of_the_mask(psf_shape, extra):
    g = torch.Generator().manual_seed(2)
    img = (6, 7, 9)
    work = tuple(a + b - 1 + e for a, b, e in zip(img, psf_shape, extra, strict=True))
    psf = rand(*psf_shape, g=g)
    w = rc.edge_weights(psf, work, img, circular=True, threshold=0.0)
    s = _adjoint_of_mask_fft(psf, work, img)
    want = torch.where(s > 1e-12, 1 / s.clamp_min(1e-12), torch.zeros_like(s))
    got = ref.edge_weight_volume(w.table, w.bounds, 0.0, work)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    # The kernel applies the same weights: u = c = 1 gives w itself.
    ones = torch.ones(1, 1, *work, dtype=f64)
    assert rel_err(rc.rl_update(ones, ones, w)[0, 0], want) <= 1e-9


def test_edge_weights_direct_geometry_and_threshold():
    g = torch.Generator().manual_seed(3)
    psf = rand(3, 5, 5, g=g)
    psf /= psf.sum()
    img, est = (4, 6, 5), (6, 10, 9)
    w = rc.edge_weights(psf, est, img, (1, 2, 2), circular=False, threshold=0.05)
    # Hᵀ1_M on the zero-padded estimate grid: correlate the image mask with the PSF.
    mask = torch.zeros(1, 1, *est, dtype=f64)
    mask[:, :, 1:5, 2:8, 2:7] = 1
    s = F.conv3d(F.pad(mask, (2, 2, 2, 2, 1, 1)), psf[None, None])[0, 0]
    want = torch.where(s > 0.05, 1 / s, torch.zeros_like(s))
    assert torch.allclose(ref.edge_weight_volume(w.table, w.bounds, 0.05, est), want, rtol=1e-12)
    ones = torch.ones(1, 1, *est, dtype=f64)
    assert rel_err(rc.psf_conv_update(ones, torch.ones(1, 1, *img, dtype=f64), psf, w)[0, 0],
                   torch.where(s > 0.05, torch.ones_like(s), torch.zeros_like(s))) <= 1e-12


def test_edge_weights_reject_a_box_that_does_not_fit():
    with pytest.raises(ValueError, match=r"a PSF of 5 taps and an observed box of 5 voxels do not fit a circular job of 8"):
        rc.edge_weights(np.ones((1, 5, 1)), (1, 8, 1), (1, 5, 1), circular=True)
    with pytest.raises(ValueError, match=r"'psf' must be 3-D"):
        rc.edge_weights(np.ones((5, 1)), (8, 1), (5, 1), circular=True)


def test_malformed_bounds_are_clamped_not_read_out_of_range():
    psf = torch.rand(3, 3, 3, dtype=f64)
    w = rc.edge_weights(psf, (5, 5, 5), (3, 3, 3), circular=True)
    bad = rc.EdgeWeights(w.table, torch.full_like(w.bounds, 10**9) * torch.tensor([-1, 1]), 0.0)
    ones = torch.ones(1, 1, 5, 5, 5, dtype=f64)
    got = rc.rl_update(ones, ones, bad)
    assert rel_err(got, torch.full_like(ones, 1 / psf.sum().item())) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("tv", [0.0, 0.02])
def test_stored_edge_weights_give_the_same_update(dtype, tv):
    # w stored per voxel (the CPU solver's form) updates exactly as w evaluated from the table.
    g = torch.Generator().manual_seed(9)
    image, blurred, est, corr, psf, w = fft_case(2, (3, 5, 4), (6, 9, 10), (4, 5, 7), g=g, dtype=dtype)
    stored = rc.store_edge_weights(w, est)
    assert stored.dense.shape == (6, 9, 10) and stored.dense.dtype == dtype
    want = ref.edge_weight_volume(w.table, w.bounds, w.threshold, (6, 9, 10)).to(dtype)
    assert torch.equal(stored.dense, want) if dtype == f64 else torch.allclose(stored.dense, want)
    assert torch.equal(rc.rl_update(est, corr, stored, tv), rc.rl_update(est, corr, w, tv))
    outs = []
    for weights in (w, stored):
        out, prev, change = corr.clone(), est.clone() * 0.5, corr.clone()
        dots = rc.rl_update_(out, est, weights, tv, previous=prev, change=change)
        outs.append((out, prev, change, dots))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    # The direct path's update reads them the same way.
    k = psf[:3, :3, :3].contiguous()
    wd = rc.edge_weights(k, (5, 7, 8), (3, 5, 6), (1, 1, 1), circular=False)
    e2 = est[:1, :, :5, :7, :8].contiguous()
    r = image[:1].contiguous()
    assert torch.equal(rc.psf_conv_update(e2, r, k, rc.store_edge_weights(wd, e2), tv),
                       rc.psf_conv_update(e2, r, k, wd, tv))


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_predict_matches_reference(dtype):
    g = torch.Generator().manual_seed(10)
    x = rand(2, 1, 5, 7, 33, g=g, dtype=dtype)
    step = rand(2, 1, 5, 7, 33, g=g, dtype=dtype) - 0.5  # growing and shrinking voxels
    x.view(-1)[:5] = 0.0  # voxels at 0 (the floor divides by tiny there)
    want = ref.rl_predict(x, step, 0.7)
    got = rc.rl_predict_(step, x, 0.7)
    assert got.data_ptr() == step.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)


def test_stored_edge_weights_are_checked():
    w = rc.store_edge_weights(_W, _v(1, 1, 4, 4, 4))
    with pytest.raises(RuntimeError, match=r"'weight_dense' must be \(D, H, W\) = \(4, 4, 5\), got \(4, 4, 4\)"):
        rc.rl_update(_v(1, 1, 4, 4, 5), _v(1, 1, 4, 4, 5), w._replace(bounds=rc.edge_weights(
            np.ones((3, 3, 3)), (4, 4, 5), (2, 2, 2), circular=True).bounds))
    with pytest.raises(RuntimeError, match=r"'weight_dense' must have the dtype of 'estimate'"):
        rc.rl_update(_v(1, 1, 4, 4, 4), _v(1, 1, 4, 4, 4), w._replace(dense=w.dense.float()))
    with pytest.raises(RuntimeError, match=r"'weight_dense' needs the 'weight_table'"):
        torch.ops.rln_fast.rl_update(_v(1, 1, 4, 4, 4), _v(1, 1, 4, 4, 4), None, None, 0.0, 0.0,
                                     1.0, 0.0, True, w.dense)


# (b) opcheck ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(4)
    image, blurred, est, corr, psf, w = fft_case(1, (3, 4, 5), (5, 6, 8), (3, 3, 4), g=g, device=device)
    wt = (w.table, w.bounds, w.threshold)
    torch.library.opcheck(torch.ops.rln_fast.rl_ratio.default, (image, blurred, 0.1, 1e-6))
    torch.library.opcheck(torch.ops.rln_fast.rl_ratio_.default, (blurred.clone(), image, 0.1, 1e-6))
    torch.library.opcheck(torch.ops.rln_fast.rl_update.default, (est, corr, *wt, 0.01, 0.02, 0.0, True))
    torch.library.opcheck(torch.ops.rln_fast.rl_update.default, (est, corr, None, None, 0.0, 0.0, 0.02, 0.0, False))
    torch.library.opcheck(torch.ops.rln_fast.rl_predict_.default, (corr.clone() - 0.5, est, 0.6, 1e-30))
    dense = rc.store_edge_weights(w, est).dense
    torch.library.opcheck(torch.ops.rln_fast.rl_update.default, (est, corr, *wt, 0.01, 0.02, 0.0, True, dense))
    torch.library.opcheck(torch.ops.rln_fast.rl_update_.default,
                          (corr.clone(), est, est.clone() * 0.5, corr.clone(), *wt, 0.0, 0.02, 0.0, True, dense))
    torch.library.opcheck(torch.ops.rln_fast.rl_update_.default,
                          (corr.clone(), est, est.clone() * 0.5, corr.clone(), *wt, 0.01, 0.02, 0.0, True))
    torch.library.opcheck(torch.ops.rln_fast.rl_update_.default,
                          (corr.clone(), est, None, None, None, None, 0.0, 0.0, 0.02, 0.0, False))
    k = psf[:3, :3, :3].contiguous()
    e2 = est[:, :, :5, :6, :7].contiguous()
    r = image[:, :, :3, :4, :5].contiguous()
    wd = rc.edge_weights(k, (5, 6, 7), (3, 4, 5), (1, 1, 1), circular=False, device=device)
    wdt = (wd.table, wd.bounds, wd.threshold)
    torch.library.opcheck(torch.ops.rln_fast.psf_conv_ratio.default, (r, e2, k, 0.1, 1e-6))
    torch.library.opcheck(torch.ops.rln_fast.psf_conv_update.default, (e2, r, k, *wdt, 0.01, 0.02, 0.0))
    torch.library.opcheck(torch.ops.rln_fast.psf_conv_update_.default,
                          (torch.empty_like(e2), e2, r, k, e2.clone(), e2.clone(), *wdt, 0.0, 0.02, 0.0))


def test_public_functions_trace_through_the_ops_under_compile():
    # Eager calls skip the dispatcher (rl_classic._eager); traced ones must still reach the ops.
    g = torch.Generator().manual_seed(6)
    image, blurred, est, corr, psf, w = fft_case(1, (3, 4, 5), (5, 6, 8), (3, 3, 4), g=g)

    def step(b, c):
        rc.rl_ratio_(b, image, 0.1, 1e-6)
        dots = rc.rl_update_(c, est, w, 0.01, 0.0, 0.02, previous=b, change=None)
        k = psf[:3, :3, :3].contiguous()
        e2 = est[:, :, :5, :6, :7].contiguous()
        r = rc.psf_conv_ratio(image[:, :, :3, :4, :5].contiguous(), e2, k, 0.1, 1e-6)
        return dots, rc.psf_conv_update(e2, r, k)

    b1, c1, b2, c2 = blurred.clone(), corr.clone(), blurred.clone(), corr.clone()
    want = step(b1, c1)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(b2, c2)
    assert torch.equal(b1, b2) and torch.equal(c1, c2)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_richardson_lucy_never_imports_dynamo():
    # The custom-op dispatcher's first call imports torch._dynamo (~1 s, 80 MiB); RL's eager
    # loop calls the kernels directly, so a command-line RL run does not pay for it.
    code = ("import sys, numpy as np, rln_fast as rf\n"
            "img = np.random.default_rng(0).random((8, 16, 16), dtype=np.float32) + 1\n"
            "k = np.ones((3, 3, 3), np.float32)\n"
            "for m in ('fft', 'direct'):\n"
            "    rf.richardson_lucy(img, k, 3, method=m, progress=False)\n"
            "print('torch._dynamo' in sys.modules)\n")
    assert fresh_python(code).strip() == "False"


# (d) edge cases ---------------------------------------------------------------------------

def test_in_place_variants_equal_the_functional_ones():
    g = torch.Generator().manual_seed(5)
    image, blurred, est, corr, psf, w = fft_case(2, (4, 5, 6), (7, 8, 11), (4, 4, 6), g=g)
    want = rc.rl_ratio(image, blurred, 0.2, 1e-6)
    b = blurred.clone()
    assert rc.rl_ratio_(b, image, 0.2, 1e-6) is b and torch.equal(b, want)
    want = rc.rl_update(est, corr, w, 0.01, 0.0, 0.01)
    c = corr.clone()
    assert torch.equal(rc.rl_update_(c, est, w, 0.01, 0.0, 0.01), torch.zeros(2, dtype=f64))
    assert torch.equal(c, want)


def test_ratio_is_zero_outside_the_image_and_guards_division():
    image = torch.ones(1, 1, 2, 2, 2, dtype=f64)
    blurred = torch.zeros(1, 1, 3, 4, 2, dtype=f64)
    blurred[0, 0, 0, 0, 0] = -5.0  # + background 1 -> -4 < eps
    r = rc.rl_ratio(image, blurred, 1.0, 0.5)
    assert r[0, 0, 0, 0, 0] == 2.0 and r[0, 0, 1, 1, 1] == 1.0
    assert r[:, :, 2:].abs().sum() == 0 and r[:, :, :, 2:].abs().sum() == 0


def test_nan_propagates_and_clamp_applies():
    est = torch.ones(1, 1, 2, 3, 4, dtype=f64)
    corr = torch.full_like(est, -1.0)
    corr[0, 0, 0, 0, 0] = float("nan")
    out = rc.rl_update(est, corr, None, 0.0, 0.0)
    assert torch.isnan(out[0, 0, 0, 0, 0]) and (out.flatten()[1:] == 0).all()
    blurred = torch.full_like(est, float("nan"))
    assert torch.isnan(rc.rl_ratio(est, blurred, 0.0, 1e-3)).all()


def test_tv_is_neutral_on_flat_and_linear_volumes():
    # div(∇u/|∇u|) = 0 on a constant and on a linear ramp (interior): factor 1.
    flat = torch.full((1, 1, 4, 5, 6), 3.0, dtype=f64)
    ones = torch.ones_like(flat)
    assert torch.allclose(rc.rl_update(flat, ones, None, 0.5, 0.0, 1e-3), flat)
    ramp = torch.arange(6, dtype=f64).expand(1, 1, 4, 5, 6).contiguous() + 1
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    for periodic in (True, False):
        got = rc.rl_update(ramp, ones, None, 0.5, 0.0, 1e-9, periodic)
        assert torch.allclose(got[inner], ramp[inner])
    # Beyond the faces: a flat volume stays flat when the neighbours wrap, while zeros beyond
    # (the direct job) pull its faces down.
    zero_pad = rc.rl_update(flat, ones, None, 0.05, 0.0, 1e-3, False)
    assert torch.allclose(zero_pad[:, :, 1:-1, 1:-1, 1:-1], flat[:, :, 1:-1, 1:-1, 1:-1])
    assert (zero_pad[:, :, 0] < 3).all()
    # A single bright voxel: TV pulls it down (factor < 1), its neighbours up.
    spike = torch.ones(1, 1, 5, 5, 5, dtype=f64)
    spike[0, 0, 2, 2, 2] = 10
    out = rc.rl_update(spike, torch.ones_like(spike), None, 0.05, 0.0, 1e-6)
    assert out[0, 0, 2, 2, 2] < 10 and out[0, 0, 2, 2, 3] > 1
    # The denominator floor keeps a huge tv finite and positive.
    big = rc.rl_update(spike, torch.ones_like(spike), None, 1e6, 0.0, 1e-6)
    assert torch.isfinite(big).all() and (big > 0).all() and big.max() <= 10 * 10


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(6)
    base = rand(1, 1, 8, 9, 12, g=g, lo=0.1)
    est = base.transpose(3, 4)  # [1, 1, 8, 12, 9], not contiguous
    corr = rand(1, 1, 8, 9, 12, g=g).transpose(3, 4)
    image = rand(1, 1, 12, 9, 8, g=g).permute(0, 1, 4, 3, 2)[:, :, :5, :6, :7]
    assert not est.is_contiguous() and not image.is_contiguous()
    assert rel_err(rc.rl_update(est, corr, None, 0.1, 0.0, 0.01),
                   ref.rl_update(est, corr, None, 0.1, 0.0, 0.01)) <= 1e-12
    assert rel_err(rc.rl_ratio(image, est, 0.1), ref.rl_ratio(image, est, 0.1)) <= 1e-12
    psf = rand(5, 3, 3, g=g).transpose(0, 2)  # [3, 3, 5]
    assert rel_err(rc.psf_conv_ratio(image, est[:, :, :7, :10, :9], psf),
                   ref.psf_conv_ratio(image, est[:, :, :7, :10, :9], psf)) <= 1e-12


def test_empty_batch_and_single_voxel():
    z = torch.zeros(0, 1, 3, 3, 3, dtype=f64)
    assert rc.rl_ratio(z, z).shape == z.shape
    assert rc.rl_update(z, z).shape == z.shape
    assert torch.equal(rc.rl_update_(z.clone(), z, previous=z.clone(), change=z.clone()),
                       torch.zeros(2, dtype=f64))
    k = torch.ones(1, 1, 1, dtype=f64)
    assert rc.psf_conv_ratio(z, z, k).shape == z.shape
    assert rc.psf_conv_update(z, z, k).shape == z.shape
    one = torch.full((1, 1, 1, 1, 1), 2.0, dtype=f64)
    assert rc.psf_conv_ratio(one, one, k * 4, 0.0, 1e-9).item() == 0.25
    assert rc.rl_update(one, one, None, 0.3, 0.0).item() == 4.0  # TV neutral on one periodic voxel


def test_dots_are_deterministic_and_batch_summed():
    g = torch.Generator().manual_seed(7)
    est = rand(3, 1, 17, 33, 65, g=g, dtype=torch.float32)
    corr = rand(3, 1, 17, 33, 65, g=g, dtype=torch.float32)
    runs = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, max(2, threads)):
            torch.set_num_threads(nt)
            ch = torch.ones_like(est)
            runs.append(rc.rl_update_(corr.clone(), est, change=ch))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1])
    g_new = (est.double() * corr.double()) - est.double()
    assert rel_err(runs[0], torch.stack([g_new.sum(), (g_new ** 2).sum()])) <= 1e-6


@pytest.mark.parametrize("circular", [True, False])
def test_weighted_update_over_many_row_chunks(circular):
    # A volume of many parallel row chunks, each with rows inside the weights' interior (reused
    # row weights) and rows at every border (recomputed): each weight still equals the twin's.
    g = torch.Generator().manual_seed(11)
    img, psf_shape = (9, 40, 150), (5, 9, 13)
    work = tuple(a + b for a, b in zip(img, psf_shape, strict=True))
    psf = rand(*psf_shape, g=g)
    origin = (0, 0, 0) if circular else tuple(b // 2 for b in psf_shape)
    w = rc.edge_weights(psf / psf.sum(), work, img, origin, circular=circular)
    est, corr = rand(2, 1, *work, g=g, lo=0.1), rand(2, 1, *work, g=g)
    threads = torch.get_num_threads()
    try:
        for nt in (1, max(2, threads)):
            torch.set_num_threads(nt)
            got = rc.rl_update(est, corr, w, 0.0, 0.0)
            assert rel_err(got, ref.rl_update(est, corr, w, 0.0, 0.0)) <= 1e-12
    finally:
        torch.set_num_threads(threads)


# every error message ----------------------------------------------------------------------

def _v(*shape, dtype=f64):
    return torch.rand(*shape, dtype=dtype) + 0.1


_W = rc.edge_weights(np.ones((3, 3, 3)), (4, 4, 4), (2, 2, 2), circular=True)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: rc.rl_ratio(_v(1, 1, 2, 2, 2), _v(1, 1, 3, 3)),
         r"rln_fast.rl_ratio: 'blurred' must be 5-D \(N, C, D, H, W\), got 4-D"),
        (lambda: rc.rl_ratio(_v(1, 1, 2, 2, 2), _v(1, 2, 3, 3, 3)),
         r"rln_fast.rl_ratio: 'blurred' must have 1 channel, got 2"),
        (lambda: rc.rl_ratio(_v(1, 1, 2, 2, 2), _v(1, 1, 3, 3, 3, dtype=torch.float16)),
         r"rln_fast.rl_ratio: 'blurred' must be float32 or float64, got Half"),
        (lambda: rc.rl_ratio(_v(1, 1, 2, 2, 2, dtype=torch.float32), _v(1, 1, 3, 3, 3)),
         r"rln_fast.rl_ratio: 'image' must have the dtype of 'blurred' \(Double\), got Float"),
        (lambda: rc.rl_ratio(_v(1, 1, 2, 4, 2), _v(1, 1, 3, 3, 3)),
         r"rln_fast.rl_ratio: 'image' must be \(N, 1, d, h, w\) with N and d, h, w <= those of 'blurred' \(1, 1, 3, 3, 3\), got \(1, 1, 2, 4, 2\)"),
        (lambda: rc.rl_ratio(_v(2, 1, 2, 2, 2), _v(1, 1, 3, 3, 3)),
         r"'image' must be \(N, 1, d, h, w\) with N"),
        (lambda: rc.rl_ratio(_v(1, 1, 2, 2, 2), _v(1, 1, 3, 3, 3), float("inf")),
         r"rln_fast.rl_ratio: 'background' must be finite, got inf"),
        (lambda: rc.rl_ratio(_v(1, 1, 2, 2, 2), _v(1, 1, 3, 3, 3), 0.0, 0.0),
         r"rln_fast.rl_ratio: 'eps' must be a finite number > 0, got 0"),
        (lambda: rc.rl_ratio_(_v(1, 1, 3, 3, 4).transpose(2, 4), _v(1, 1, 2, 2, 2)),
         r"rln_fast.rl_ratio: 'out' must be contiguous \(it is written in place\)"),
        (lambda: rc.rl_update(_v(1, 1, 3, 3, 3), _v(1, 1, 3, 3, 4)),
         r"rln_fast.rl_update: 'correction' must have the shape of 'estimate' \(1, 1, 3, 3, 3\), got \(1, 1, 3, 3, 4\)"),
        (lambda: rc.rl_update(_v(1, 1, 3, 3, 3), _v(1, 1, 3, 3, 3), None, -1.0),
         r"rln_fast.rl_update: 'tv' must be a finite number >= 0, got -1"),
        (lambda: rc.rl_update(_v(1, 1, 3, 3, 3), _v(1, 1, 3, 3, 3), None, 0.1, 0.0, 0.0),
         r"rln_fast.rl_update: 'tv_eps' must be a finite number > 0, got 0"),
        (lambda: rc.rl_update(_v(1, 1, 3, 3, 3), _v(1, 1, 3, 3, 3), None, 0.1, float("nan")),
         r"rln_fast.rl_update: 'clamp_min' must be finite, got nan"),
        (lambda: rc.rl_update(_v(1, 1, 3, 3, 3), _v(1, 1, 3, 3, 3), _W),
         r"rln_fast.rl_update: 'weight_bounds' must be \(D \+ H \+ W, 2\) = \(9, 2\), got \(12, 2\)"),
        (lambda: rc.rl_update(_v(1, 1, 4, 4, 4), _v(1, 1, 4, 4, 4), rc.EdgeWeights(_W.table.float(), _W.bounds, 0.0)),
         r"rln_fast.rl_update: 'weight_table' must be float64, got Float"),
        (lambda: rc.rl_update(_v(1, 1, 4, 4, 4), _v(1, 1, 4, 4, 4), rc.EdgeWeights(_W.table, _W.bounds.int(), 0.0)),
         r"rln_fast.rl_update: 'weight_bounds' must be int64, got Int"),
        (lambda: rc.rl_update(_v(1, 1, 4, 4, 4), _v(1, 1, 4, 4, 4), rc.EdgeWeights(_W.table[0], _W.bounds, 0.0)),
         r"rln_fast.rl_update: 'weight_table' must be 3-D \(pz \+ 1, py \+ 1, px \+ 1\) with every side >= 2, got \(4, 4\)"),
        (lambda: rc.rl_update(_v(1, 1, 4, 4, 4), _v(1, 1, 4, 4, 4), rc.EdgeWeights(_W.table, _W.bounds, -1.0)),
         r"rln_fast.rl_update: 'weight_threshold' must be a finite number >= 0, got -1"),
        (lambda: torch.ops.rln_fast.rl_update(_v(1, 1, 4, 4, 4), _v(1, 1, 4, 4, 4), _W.table, None, 0.0, 0.0, 1.0, 0.0, True),
         r"rln_fast.rl_update: 'weight_table' and 'weight_bounds' must be given together, got only 'weight_table'"),
        (lambda: (lambda e: rc.rl_predict_(e, e, 0.5))(_v(1, 1, 3, 3, 3)),
         r"rln_fast.rl_predict: 'step' and 'estimate' must not share memory"),
        (lambda: rc.rl_predict_(_v(1, 1, 3, 3, 6)[..., ::2], _v(1, 1, 3, 3, 3), 0.5),
         r"rln_fast.rl_predict: 'step' must be contiguous"),
        (lambda: rc.rl_predict_(_v(1, 1, 3, 3, 4), _v(1, 1, 3, 3, 3), 0.5),
         r"rln_fast.rl_predict: 'step' must have the shape of 'estimate' \(1, 1, 3, 3, 3\), got \(1, 1, 3, 3, 4\)"),
        (lambda: rc.rl_predict_(_v(1, 1, 3, 3, 3), _v(1, 1, 3, 3, 3), float("nan")),
         r"rln_fast.rl_predict: 'a' must be finite, got nan"),
        (lambda: (lambda e: rc.rl_update_(_v(1, 1, 3, 3, 3), e, None, 0.1, previous=e))(_v(1, 1, 3, 3, 3)),
         r"rln_fast.rl_update: 'previous' and 'estimate' must not share memory"),
        (lambda: (lambda c: rc.rl_update_(c, _v(1, 1, 3, 3, 3), change=c))(_v(1, 1, 3, 3, 3)),
         r"rln_fast.rl_update: 'change' and 'out' must not share memory"),
        (lambda: (lambda p: rc.rl_update_(_v(1, 1, 3, 3, 3), _v(1, 1, 3, 3, 3), previous=p, change=p))(_v(1, 1, 3, 3, 3)),
         r"rln_fast.rl_update: 'change' and 'previous' must not share memory"),
        (lambda: (lambda c: rc.rl_update_(c, _v(1, 1, 3, 3, 3), previous=_v(1, 1, 3, 3, 4)))(_v(1, 1, 3, 3, 3)),
         r"rln_fast.rl_update: 'previous' must have the shape of 'estimate' \(1, 1, 3, 3, 3\), got \(1, 1, 3, 3, 4\)"),
        (lambda: torch.ops.rln_fast.rl_update_(_v(1, 1, 3, 3, 6)[..., ::2], _v(1, 1, 3, 3, 3), None, None, None, None, 0.0, 0.0, 1.0, 0.0, True),
         r"rln_fast.rl_update: 'out' must be contiguous"),
        (lambda: (lambda b: torch.ops.rln_fast.rl_update_(b[1:28].view(1, 1, 3, 3, 3), b[:27].view(1, 1, 3, 3, 3), None, None, None, None, 0.0, 0.0, 1.0, 0.0, True))(_v(28)),
         r"rln_fast.rl_update: 'out' and 'estimate' must not share memory"),
        (lambda: rc.psf_conv_ratio(_v(1, 1, 3, 3, 3), _v(1, 1, 5, 5, 5), _v(3, 3)),
         r"rln_fast.psf_conv_ratio: 'psf' must be 3-D \(pz, py, px\), got 2-D"),
        (lambda: rc.psf_conv_ratio(_v(1, 1, 3, 3, 3), _v(1, 1, 5, 5, 5), _v(3, 4, 3)),
         r"rln_fast.psf_conv_ratio: 'psf' must have odd sides \(centre voxel p // 2\), got \(3, 4, 3\)"),
        (lambda: rc.psf_conv_ratio(_v(1, 1, 3, 3, 3), _v(1, 1, 5, 5, 5), _v(3, 3, 3, dtype=torch.float32)),
         r"rln_fast.psf_conv_ratio: 'psf' must have the dtype of 'estimate' \(Double\), got Float"),
        (lambda: rc.psf_conv_ratio(_v(1, 1, 3, 3, 3), _v(1, 1, 5, 6, 5), _v(3, 3, 3)),
         r"rln_fast.psf_conv_ratio: 'image' must be \(N, 1, d, h, w\) centred in 'estimate' \(1, 1, 5, 6, 5\) \(each of D - d, H - h, W - w even and >= 0\), got \(1, 1, 3, 3, 3\)"),
        (lambda: rc.psf_conv_ratio(_v(1, 1, 7, 3, 3), _v(1, 1, 5, 5, 5), _v(3, 3, 3)),
         r"'image' must be \(N, 1, d, h, w\) centred in 'estimate'"),
        (lambda: rc.psf_conv_ratio(_v(1, 1, 3, 3, 3), _v(1, 1, 5, 5, 5), _v(3, 3, 3), 0.0, -1.0),
         r"rln_fast.psf_conv_ratio: 'eps' must be a finite number > 0, got -1"),
        (lambda: rc.psf_conv_update(_v(1, 1, 5, 5, 5), _v(1, 1, 4, 3, 3), _v(3, 3, 3)),
         r"rln_fast.psf_conv_update: 'ratio' must be \(N, 1, d, h, w\) centred in 'estimate'"),
        (lambda: rc.psf_conv_update(_v(1, 1, 5, 5, 5), _v(1, 1, 3, 3, 3), _v(3, 3, 3), None, float("inf")),
         r"rln_fast.psf_conv_update: 'tv' must be a finite number >= 0, got inf"),
        (lambda: (lambda e: rc.psf_conv_update_(e, e, _v(1, 1, 3, 3, 3), _v(3, 3, 3)))(_v(1, 1, 5, 5, 5)),
         r"rln_fast.psf_conv_update: 'out' and 'estimate' must not share memory"),
        (lambda: (lambda r: rc.psf_conv_update_(_v(1, 1, 3, 3, 3), _v(1, 1, 3, 3, 3), r, _v(1, 1, 1), previous=r))(_v(1, 1, 3, 3, 3)),
         r"rln_fast.psf_conv_update: 'previous' and 'ratio' must not share memory"),
    ],
)
def test_error_messages(make, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        make()


def test_device_mismatch_message_meta():
    with pytest.raises(RuntimeError, match=r"'image' must be on the device of 'blurred'|must be on CPU or CUDA"):
        _backend.require_c("rl_ratio").rl_ratio_forward(
            torch.rand(1, 1, 2, 2, 2, device="meta"), torch.rand(1, 1, 2, 2, 2), 0.0, 1.0, None)
    with pytest.raises(RuntimeError, match=r"rln_fast.rl_update: tensors must be on CPU or CUDA, got meta"):
        _backend.require_c("rl_update").rl_update_forward(
            torch.rand(1, 1, 2, 2, 2, device="meta"), torch.rand(1, 1, 2, 2, 2, device="meta"),
            None, None, None, None, None, 0.0, 0.0, 1.0, 0.0, True, None)


def test_no_cuda_kernels_falls_back_to_the_twins(monkeypatch):
    monkeypatch.setattr(_backend, "BUILT_WITH_CUDA", False)
    monkeypatch.setattr(_backend, "_warned", set())
    x = torch.rand(1, 1, 3, 3, 3, device="meta")
    with pytest.warns(RuntimeWarning, match="running the pure-torch reference"):
        assert rc.rl_ratio(x, x).device.type == "meta"


# (e) CUDA against the CPU kernels ---------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tv", [0.0, 0.02])
def test_cuda_matches_cpu(dtype, tv):
    g = torch.Generator().manual_seed(8)
    image, blurred, est, corr, psf, w = fft_case(2, (9, 20, 31), (13, 26, 40), (5, 7, 10), g=g,
                                                 dtype=dtype)
    wc = rc.EdgeWeights(w.table.cuda(), w.bounds.cuda(), w.threshold)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(rc.rl_ratio(image.cuda(), blurred.cuda(), 0.1, 1e-6).cpu(),
                   rc.rl_ratio(image, blurred, 0.1, 1e-6)) <= tol
    prev, change = est * 0.9, corr - 0.5
    cpu = [corr.clone(), prev.clone(), change.clone()]
    dc = rc.rl_update_(cpu[0], est, w, tv, 0.0, 0.01, previous=cpu[1], change=cpu[2])
    gpu = [t.cuda() for t in (corr, prev, change)]
    dg = rc.rl_update_(gpu[0], est.cuda(), wc, tv, 0.0, 0.01, previous=gpu[1], change=gpu[2])
    for a, b in zip(gpu + [dg], cpu + [dc], strict=True):
        assert rel_err(a.cpu(), b) <= tol * 10
    k = psf[:5, :7, :9].contiguous()
    e = est[:, :, :13, :26, :39].contiguous()
    wd = rc.edge_weights(k, (13, 26, 39), (9, 20, 31), (2, 3, 4), circular=False)
    wdc = rc.EdgeWeights(wd.table.cuda(), wd.bounds.cuda(), wd.threshold)
    assert rel_err(rc.psf_conv_ratio(image.cuda(), e.cuda(), k.cuda()).cpu(),
                   rc.psf_conv_ratio(image, e, k)) <= tol
    out_c, out_g = torch.empty_like(e), torch.empty_like(e).cuda()
    ch_c, ch_g = e * 0.3, (e * 0.3).cuda()
    dc = rc.psf_conv_update_(out_c, e, image, k, wd, tv, 0.0, 0.01, change=ch_c)
    dg = rc.psf_conv_update_(out_g, e.cuda(), image.cuda(), k.cuda(), wdc, tv, 0.0, 0.01, change=ch_g)
    for a, b in ((out_g, out_c), (ch_g, ch_c), (dg, dc)):
        assert rel_err(a.cpu(), b) <= tol * 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_dots_deterministic_large():
    g = torch.Generator().manual_seed(9)
    est = rand(1, 1, 64, 128, 130, g=g, dtype=torch.float32, device="cuda")
    corr = rand(1, 1, 64, 128, 130, g=g, dtype=torch.float32, device="cuda")
    a = rc.rl_update_(corr.clone(), est, change=torch.ones_like(est))
    b = rc.rl_update_(corr.clone(), est, change=torch.ones_like(est))
    assert torch.equal(a, b)
