"""Tests of the RLN training form, its fused inference form, checkpoint I/O and rln_deconvolve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rln_fast.deconvolve as deconvolve_mod
from rln_fast.deconvolve import norm_percentiles, rln_deconvolve
from rln_fast.models import rln as rln_mod
from rln_fast.models.rln import INTERMEDIATE_KEYS, RLN, FusedRLN

SHARED = Path(__file__).resolve().parents[2] / "shared"
OFFICIAL = SHARED / "official_rln"
CKPT = OFFICIAL / "model.ckpt"
REF_CASE = OFFICIAL / "reference_case_c.npz"

needs_official = pytest.mark.skipif(
    not (REF_CASE.exists() and Path(str(CKPT) + ".index").exists()),
    reason="shared/official_rln (released checkpoint + reference case) not present",
)


def _random_model(seed: int = 0, **kw) -> RLN:
    """Official init plus non-trivial BN affine and running statistics, in eval mode."""
    torch.manual_seed(seed)
    m = RLN(**kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in rln_mod._BNS:
            bn = getattr(m, name)
            c = bn.num_features
            bn.weight.copy_(0.5 + torch.rand(c, generator=g))
            bn.bias.copy_(0.3 * torch.randn(c, generator=g))
            bn.running_mean.copy_(0.5 * torch.randn(c, generator=g))
            bn.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
    return m.eval()


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


# ------------------------------------------------------------------ structure and init


def test_parameter_count_and_names():
    m = RLN()
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 15_968
    conv = sum(getattr(m, n).numel() for n in [*rln_mod._CONVS, "e7"])
    assert conv == 15_808
    assert tuple(m.e7.shape) == (8, 4, 2, 2, 2)
    assert tuple(m.u6.shape) == (8, 10, 3, 3, 3)
    bns = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.BatchNorm3d)]
    assert bns == list(rln_mod._BNS)
    assert all(mod.eps == 1e-3 and mod.momentum == 0.01
               for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm3d))


def test_initialisation():
    torch.manual_seed(0)
    m = RLN()
    r = torch.arange(-1.0, 2.0)
    r2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    for name in rln_mod._GAUSS_CONVS:
        w = getattr(m, name).detach()
        centre = w[:, :, 1, 1, 1]  # = U(0, 1) per input channel, same for every output
        assert torch.all((centre >= 0) & (centre <= 1))
        assert torch.allclose(centre, centre[:1].expand_as(centre))
        for o, sigma in enumerate((2.0, 0.5, 1.0, 1.5)):
            g = torch.exp(-r2 / (2 * sigma**2))
            assert torch.allclose(w[o], centre[o][:, None, None, None] * g, atol=1e-6)
    for name in ["e4", "e5", "e6", "e7", "e8", "u3", "u4", "u5", "u6", "u7"]:
        w = getattr(m, name).detach()
        assert w.abs().max() <= 2.0 and 0.7 < w.std() < 1.0  # truncated N(0, 1): std 0.88
    bn = m.bn_u7
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    before = m.e5.detach().clone()
    m.reset_parameters()
    assert not torch.equal(before, m.e5)


def test_bad_config():
    with pytest.raises(ValueError, match="gradients"):
        RLN(gradients="approx")
    with pytest.raises(ValueError, match="bn"):
        RLN(bn="tf")
    assert "paper" in repr(RLN(gradients="paper")) and "official" in repr(RLN(bn="official"))


@pytest.mark.parametrize("shape", [(1, 1, 2, 3, 5), (2, 1, 7, 9, 11), (1, 1, 2, 2, 2)])
def test_odd_shapes_and_intermediates(shape):
    m = _random_model()
    x = torch.rand(shape)
    with torch.no_grad():
        d = m(x, return_intermediates=True)
        assert torch.equal(m(x), d["output"])
    assert tuple(d) == INTERMEDIATE_KEYS
    half = (shape[0], 1, shape[2] // 2, shape[3] // 2, shape[4] // 2)
    for k, v in d.items():
        expected = half if k in ("xdown", "FP1", "ratio1") else shape
        assert tuple(v.shape) == expected, k
        assert torch.isfinite(v).all(), k
    m.train()
    if shape == (1, 1, 2, 2, 2):
        with pytest.raises(ValueError, match="train mode needs more than one voxel"):
            m(x)
        x = torch.rand(2, *shape[1:])
    assert m(x).shape == x.shape


def test_input_errors():
    m = RLN().eval()
    with pytest.raises(ValueError, match=r"\(N, 1, D, H, W\).*\(1, 4, 4, 4\)"):
        m(torch.rand(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 4, 4, 4\)"):
        m(torch.rand(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match=r">= 2.*\(1, 1, 4, 1, 4\)"):
        m(torch.rand(1, 1, 4, 1, 4))
    with pytest.raises(TypeError, match="float64"):
        m(torch.rand(1, 1, 4, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m(np.zeros((1, 1, 4, 4, 4), np.float32))
    f = m.fuse()
    with pytest.raises(ValueError, match=r">= 2"):
        f(torch.rand(1, 1, 1, 4, 4))


# ------------------------------------------------------------------ the released checkpoint


@pytest.fixture(scope="module")
def official() -> RLN:
    if not (REF_CASE.exists() and Path(str(CKPT) + ".index").exists()):
        pytest.skip("shared/official_rln not present")
    return RLN.from_official_checkpoint(CKPT).eval()


@pytest.fixture(scope="module")
def ref_case() -> dict[str, torch.Tensor]:
    if not REF_CASE.exists():
        pytest.skip("shared/official_rln not present")
    z = np.load(REF_CASE)
    # NDHWC -> NCDHW
    return {k: torch.from_numpy(z[k]).permute(0, 4, 1, 2, 3).contiguous() for k in z.files}


@needs_official
@pytest.mark.parametrize("form", ["eval", "fused"])
def test_reference_case(official, ref_case, form):
    model = official if form == "eval" else official.fuse()
    with torch.no_grad():
        d = model(ref_case["input"], return_intermediates=True)
    errs = {k: _rel_err(d[k], ref_case[k]) for k in INTERMEDIATE_KEYS}
    bad = {k: e for k, e in errs.items() if not e <= 1e-5}
    assert not bad, f"{form}: relative errors above 1e-5: {bad}"
    # Without intermediates the fused form runs conv3d_rl_divide / conv3d_rl_multiply instead.
    with torch.no_grad():
        assert _rel_err(model(ref_case["input"]), ref_case["output"]) <= 1e-5


@needs_official
def test_official_metadata_and_params(official):
    assert official.metadata["steps"] == 50_000
    assert sum(p.numel() for p in official.parameters()) == 15_968
    assert official.bn_t1.num_features == 1 and official.bn_u7.num_features == 8


@needs_official
def test_official_checkpoint_errors(monkeypatch):
    from rln_fast.models import tf_checkpoint

    real = tf_checkpoint.read_tf_checkpoint(CKPT)

    def fake(drop=None, reshape=None):
        def read(prefix, names=None):
            d = dict(real)
            if drop:
                del d[drop]
            if reshape:
                d[reshape] = d[reshape].reshape(-1)
            return d
        return read

    monkeypatch.setattr(tf_checkpoint, "read_tf_checkpoint", fake(drop="update/init_w_3/u_6"))
    with pytest.raises(tf_checkpoint.CheckpointError, match="'update/init_w_3/u_6' is missing"):
        RLN.from_official_checkpoint(CKPT)
    monkeypatch.setattr(tf_checkpoint, "read_tf_checkpoint", fake(reshape="estimation/e_2"))
    with pytest.raises(ValueError, match=r"'estimation/e_2' has shape \[432\], expected"):
        RLN.from_official_checkpoint(CKPT)
    monkeypatch.setattr(tf_checkpoint, "read_tf_checkpoint",
                        fake(drop="batch_normalization_16/moving_variance"))
    with pytest.raises(ValueError, match="batch_normalization_16/moving_variance"):
        RLN.from_official_checkpoint(CKPT)


# ------------------------------------------------------------------ train mode


def _bn_io(m: RLN, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        getattr(m, n).register_forward_hook(
            lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0].detach(), out.detach()))
        )
        for n in rln_mod._BNS
    ]
    try:
        m(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("bn", ["torch", "official"])
def test_train_mode_batch_statistics(bn):
    m = _random_model(seed=3, bn=bn).train()
    before = {n: (getattr(m, n).running_mean.clone(), getattr(m, n).running_var.clone())
              for n in rln_mod._BNS}
    x = torch.rand(2, 1, 6, 8, 10)
    seen = _bn_io(m, x)
    assert set(seen) == set(rln_mod._BNS)
    for n, (inp, out) in seen.items():
        mod = getattr(m, n)
        dims = (0, 2, 3, 4)
        # normalised with batch statistics: batch mean of the output is beta
        assert torch.allclose(out.mean(dims), mod.bias.detach(), atol=1e-4), n
        var_b, mean_b = torch.var_mean(inp.double(), dim=dims, correction=0)
        var_u = torch.var(inp.double(), dim=dims, correction=1)
        expected_out = (inp - mean_b[None, :, None, None, None].float()) / torch.sqrt(
            var_b[None, :, None, None, None].float() + 1e-3
        ) * mod.weight.detach()[None, :, None, None, None] + mod.bias.detach()[
            None, :, None, None, None]
        assert torch.allclose(out, expected_out, atol=1e-4, rtol=1e-4), n
        rm0, rv0 = before[n]
        var_run = var_b if bn == "official" else var_u
        assert torch.allclose(mod.running_mean.double(), 0.99 * rm0.double() + 0.01 * mean_b,
                              rtol=1e-6, atol=1e-7), n
        assert torch.allclose(mod.running_var.double(), 0.99 * rv0.double() + 0.01 * var_run,
                              rtol=1e-6, atol=1e-7), n
        assert int(mod.num_batches_tracked) == 1


def test_official_bn_eval_equals_torch_bn():
    a = _random_model(seed=5, bn="torch")
    b = RLN(bn="official")
    b.load_state_dict(a.state_dict())
    b.eval()
    x = torch.rand(1, 1, 6, 6, 6)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_paper_gradients_change_grads_not_outputs():
    exact = _random_model(seed=7)
    paper = RLN(gradients="paper")
    paper.load_state_dict(exact.state_dict())
    exact.train()
    paper.train()
    x = torch.rand(2, 1, 6, 6, 6)
    ye, yp = exact(x), paper(x)
    assert torch.allclose(ye, yp, rtol=1e-6, atol=1e-7)
    ye.square().mean().backward()
    yp.square().mean().backward()
    # u5..u7 sit after every RL op: identical grads; e1 sits before all of them: different.
    assert torch.allclose(exact.u7.grad, paper.u7.grad, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(exact.e1.grad, paper.e1.grad, rtol=1e-3, atol=1e-8)
    assert all(torch.isfinite(p.grad).all() for p in paper.parameters())


# ------------------------------------------------------------------ save / load


def test_save_load_roundtrip(tmp_path):
    m = _random_model(seed=11, bn="official", gradients="paper")
    m.metadata = {"note": "test", "steps": 12}
    p = tmp_path / "m.pt"
    m.save(p)
    m2 = RLN.load(p)
    assert (m2.bn, m2.gradients, m2.metadata) == ("official", "paper", m.metadata)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    x = torch.rand(1, 1, 5, 6, 7)
    with torch.no_grad():
        assert torch.equal(m(x), m2.eval()(x))


def test_load_errors(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match="not a readable rln_fast model file"):
        RLN.load(bad)
    other = tmp_path / "other.pt"
    torch.save({"format": "something.else", "version": 1}, other)
    with pytest.raises(ValueError, match="not an rln_fast RLN file.*something.else"):
        RLN.load(other)
    plain = tmp_path / "plain.pt"
    torch.save(RLN().state_dict(), plain)
    with pytest.raises(ValueError, match="not an rln_fast RLN file"):
        RLN.load(plain)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "rln_fast.RLN", "version": 99}, newer)
    with pytest.raises(ValueError, match="version 99"):
        RLN.load(newer)
    partial = tmp_path / "partial.pt"
    torch.save({"format": "rln_fast.RLN", "version": 1, "config": {}}, partial)
    with pytest.raises(ValueError, match="lacks state_dict, metadata"):
        RLN.load(partial)
    wrong = tmp_path / "wrong.pt"
    sd = RLN().state_dict()
    del sd["e3"]
    torch.save({"format": "rln_fast.RLN", "version": 1, "config": {}, "state_dict": sd,
                "metadata": {}}, wrong)
    with pytest.raises(ValueError, match=r"do not fit RLN: missing \[.e3.\]"):
        RLN.load(wrong)
    with pytest.raises(FileNotFoundError):
        RLN.load(tmp_path / "missing.pt")


# ------------------------------------------------------------------ fused form


@pytest.mark.parametrize(
    "shape", [(1, 1, 2, 3, 5), (1, 1, 7, 9, 11), (2, 1, 16, 16, 16), (1, 1, 3, 2, 4)]
)
def test_fuse_matches_eval(shape):
    m = _random_model(seed=13)
    f = m.fuse()
    x = torch.rand(shape)
    with torch.no_grad():
        a = m(x, return_intermediates=True)
        b = f(x, return_intermediates=True)
    assert tuple(b) == INTERMEDIATE_KEYS
    for k in INTERMEDIATE_KEYS:
        assert _rel_err(b[k], a[k]) <= 1e-5, (k, _rel_err(b[k], a[k]))


@settings(max_examples=12, deadline=None)
@given(st.tuples(st.integers(2, 7), st.integers(2, 7), st.integers(2, 7)))
def test_fuse_matches_eval_any_shape(dhw):
    m = _random_model(seed=17)
    x = torch.rand(1, 1, *dhw)
    with torch.no_grad():
        assert _rel_err(m.fuse()(x), m(x)) <= 1e-5


def test_fused_is_inference_only():
    m = _random_model()
    f = m.fuse()
    assert isinstance(f, FusedRLN) and not f.training
    assert f.eval() is f
    with pytest.raises(RuntimeError, match="inference-only"):
        f.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        f(torch.rand(1, 1, 4, 4, 4, requires_grad=True))
    assert len(list(f.parameters())) == 0
    # fuse() reads running statistics; training afterwards leaves the fused copy alone
    m.train()
    m(torch.rand(2, 1, 4, 4, 4))
    w = f.w_e1.clone()
    m.fuse()
    assert torch.equal(w, f.w_e1)


# ------------------------------------------------------------------ rln_deconvolve


def _np_official_norm(v: np.ndarray) -> tuple[np.ndarray, float, float]:
    mi, ma = np.percentile(v.astype(np.float64), [0.01, 99.5])
    if ma == 0:
        return v, mi, ma
    if ma < 2 * mi:
        return v / ma, mi, ma
    return (v - mi) / (ma - mi + 1e-20), mi, ma


def _volume(seed: int, shape=(6, 9, 10), offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (offset + 100 * rng.random(shape) ** 3).astype(np.float32)


@pytest.mark.parametrize("offset", [0.0, 1000.0])  # the (x-mi)/(ma-mi) and x/ma branches
def test_deconvolve_normalisation(offset):
    m = _random_model(seed=19)
    v = _volume(1, offset=offset)
    xn, mi, ma = _np_official_norm(v)
    assert (ma < 2 * mi) == (offset > 0)
    with torch.no_grad():
        net = m(torch.from_numpy(xn.astype(np.float32))[None, None])[0, 0].numpy()
    y = rln_deconvolve(v, m, normalize="official", progress=False)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == v.shape
    np.testing.assert_allclose(y, net, rtol=1e-5, atol=1e-5 * np.abs(net).max())
    g = rln_deconvolve(v, m)  # "global", rescaled to input units
    back = net * ma if ma < 2 * mi else net * (ma - mi + 1e-20) + mi
    np.testing.assert_allclose(g, back, rtol=1e-5, atol=1e-5 * np.abs(back).max())
    g_raw = rln_deconvolve(v, m, rescale=False)
    np.testing.assert_allclose(g_raw, net, rtol=1e-5, atol=1e-5 * np.abs(net).max())


def test_deconvolve_torch_and_raw():
    m = _random_model(seed=23)
    v = torch.from_numpy(_volume(2, shape=(5, 7, 4)))
    y = rln_deconvolve(v, m.fuse(), normalize=None)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.device == v.device
    with torch.no_grad():
        assert torch.allclose(y, m(v[None, None])[0, 0], rtol=1e-5, atol=1e-4)
    y += 1  # an ordinary tensor, not an inference tensor
    # An all-zero volume deconvolves to zeros (the network alone would add its biases).
    zeros = rln_deconvolve(torch.zeros(4, 4, 4, dtype=torch.float64), m, normalize="official")
    assert torch.equal(zeros, torch.zeros(4, 4, 4))
    ints = rln_deconvolve(np.arange(64, dtype=np.uint16).reshape(4, 4, 4), m)
    assert ints.dtype == np.float32 and np.isfinite(ints).all()


def test_deconvolve_model_path(tmp_path):
    m = _random_model(seed=29)
    p = tmp_path / "m.pt"
    m.save(p)
    v = _volume(3, shape=(4, 5, 6))
    np.testing.assert_array_equal(rln_deconvolve(v, str(p)), rln_deconvolve(v, m))


def test_percentiles_match_numpy(monkeypatch):
    v = torch.from_numpy(_volume(4, shape=(7, 11, 13)))
    expected = np.percentile(v.numpy().astype(np.float64), [0.01, 99.5])
    np.testing.assert_allclose(deconvolve_mod._percentiles(v), expected, rtol=1e-12)
    monkeypatch.setattr(deconvolve_mod, "_QUANTILE_MAX", 0)  # the large-volume numpy path
    np.testing.assert_allclose(deconvolve_mod._percentiles(v), expected, rtol=1e-12)


def test_percentiles_match_numpy_at_other_percentiles(monkeypatch):
    v = torch.from_numpy(_volume(5, shape=(9, 11, 13)))
    expected = np.percentile(v.numpy().astype(np.float64), [0.5, 99.99])
    np.testing.assert_allclose(deconvolve_mod._percentiles(v, (0.5, 99.99)), expected, rtol=1e-12)
    monkeypatch.setattr(deconvolve_mod, "_QUANTILE_MAX", 0)
    np.testing.assert_allclose(deconvolve_mod._percentiles(v, (0.5, 99.99)), expected, rtol=1e-12)


def test_model_norm_percentiles_from_metadata():
    m = _random_model(seed=31)
    assert norm_percentiles(m) == (0.01, 99.5)  # no record: the official inference script's
    m.metadata["config"] = '{"norm_percentiles": [0.02, 99.9]}'  # rln_fast.train's config
    assert norm_percentiles(m) == (0.02, 99.9) == norm_percentiles(m.fuse())
    m.metadata["norm_percentiles"] = [0.01, 99.99]  # the explicit record wins
    assert norm_percentiles(m) == (0.01, 99.99)
    for bad in ([99.9, 0.01], [0.01, 101.0], ["a", 1.0], 5.0):
        m.metadata["norm_percentiles"] = bad
        with pytest.raises(ValueError, match="norm_percentiles"):
            norm_percentiles(m)


@pytest.mark.parametrize("tile", [None, (4, 6, 6)])
def test_deconvolve_uses_the_model_percentiles(tile):
    m = _random_model(seed=37)
    m.metadata["norm_percentiles"] = [0.01, 99.99]
    v = _volume(6, shape=(9, 12, 11))
    mi, ma = np.percentile(v.astype(np.float64), [0.01, 99.99])
    xn = (v - mi) / (ma - mi + 1e-20)
    with torch.no_grad():
        net = m(torch.from_numpy(xn.astype(np.float32))[None, None])[0, 0].numpy()
    y = rln_deconvolve(v, m, normalize="official", tile=tile, progress=False)
    np.testing.assert_allclose(y, net, rtol=1e-5, atol=1e-5 * np.abs(net).max())
    g = rln_deconvolve(v, m, tile=tile, progress=False)
    back = net * (ma - mi + 1e-20) + mi
    np.testing.assert_allclose(g, back, rtol=1e-5, atol=1e-5 * np.abs(back).max())
    # Not what the official percentiles give: the record is what changed the result.
    del m.metadata["norm_percentiles"]
    assert not np.allclose(rln_deconvolve(v, m, normalize="official", tile=tile, progress=False), y,
                           rtol=1e-3, atol=1e-3 * np.abs(net).max())


def test_missing_shipped_model_error():
    with pytest.raises(FileNotFoundError, match=r"no shipped model 'nope'.*RLN.from_official_checkpoint"):
        RLN.from_pretrained("nope")


def test_deconvolve_errors():
    m = _random_model()
    v = np.ones((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="not both"):  # tiles: tests/test_tiling.py
        rln_deconvolve(v, m, tile=(2, 2, 2), memory_budget="1GB")
    with pytest.raises(ValueError, match="normalize"):
        rln_deconvolve(v, m, normalize="percentile")
    with pytest.raises(ValueError, match=r"3-D \(z, y, x\), got shape \(1, 4, 4, 4\)"):
        rln_deconvolve(v[None], m)
    with pytest.raises(ValueError, match=r">= 2, got shape \(4, 1, 4\)"):
        rln_deconvolve(v[:, :1], m)
    bad = v.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        rln_deconvolve(bad, m)
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        rln_deconvolve(torch.from_numpy(bad), m)
    with pytest.raises(TypeError, match="model must be"):
        rln_deconvolve(v, model=42)
    with pytest.raises(TypeError, match="numpy array, torch tensor or cupy"):
        rln_deconvolve([[[1.0]]], m)


@pytest.mark.parametrize("shape", [(37, 10, 9), (64, 7, 12), (33, 5, 6)])
def test_fused_slabs_are_bitwise_one_slab(monkeypatch, shape):
    # Big volumes run the full-resolution stages in z-slabs with halos; the output must not
    # depend on the slab boundaries at all.
    from rln_fast.models.rln import FusedRLN

    torch.manual_seed(0)
    f = RLN().eval().fuse()
    x = torch.rand(2, 1, *shape)
    with torch.no_grad():
        whole = f(x)
        monkeypatch.setattr(FusedRLN, "_MIN_SLAB_VOXELS", 1)
        assert len(FusedRLN._slabs(shape[0], shape[1] * shape[2])) > 1
        assert torch.equal(f(x), whole)


# ------------------------------------------------------------------ wider networks


def test_width_scales_every_multi_channel_layer():
    m, w = RLN(), RLN(width=2)
    assert sum(p.numel() for p in w.parameters()) == 60_952
    for name in [*rln_mod._CONVS, "e7"]:
        a, b = getattr(m, name).shape, getattr(w, name).shape
        cin = tuple(2 * c if c > 1 else c for c in rln_mod._CONV_INPUTS[name])
        if name == "e7":
            assert tuple(b) == (2 * a[0], 2 * a[1], *a[2:])
        else:
            assert tuple(b) == (2 * a[0], sum(cin), *a[2:]), name
    assert tuple(w.u6.shape[:2]) == (16, 18)  # [m1 (16), E2 (1), E1 (1)]
    for name in rln_mod._BNS:
        one = name in rln_mod._ONE_CHANNEL_BNS
        assert getattr(w, name).num_features == getattr(m, name).num_features * (1 if one else 2)
    assert "width=2" in repr(w) and "width" not in repr(m)
    # Each of the 4 Gaussian sigmas on 2 consecutive output channels.
    torch.manual_seed(0)
    g = RLN(width=3).e1[:, 0, 1, 1]  # centre column: exp(-r²/2σ²) x one U(0, 1)
    assert torch.allclose(g[0::3], g[1::3]) and torch.allclose(g[0::3], g[2::3])


@pytest.mark.parametrize("width", [0, -1, 1.5, True, "2"])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        RLN(width=width)


@pytest.mark.parametrize("factor", [2, 3])
def test_widened_computes_the_same_function(factor):
    m = _random_model(seed=5, bn="official", gradients="paper")
    m.metadata = {"note": "kept"}
    w = m.widened(factor)
    assert w.width == factor and not w.training and w.metadata == m.metadata
    assert (w.bn, w.gradients) == ("official", "paper")
    x = torch.rand(2, 1, 11, 14, 9, generator=torch.Generator().manual_seed(3)) * 3
    with torch.no_grad():
        ref = m(x, return_intermediates=True)
        for out in (w(x, return_intermediates=True), w.fuse()(x, return_intermediates=True)):
            for k in INTERMEDIATE_KEYS:  # float32 sums in another order: relative to the max
                assert _rel_err(out[k], ref[k]) < 1e-5, k
        # The lean fused path: wide layers exceed the fused kernels' 8 channels and run unfused.
        assert _rel_err(w.fuse()(x), ref["output"]) < 1e-5
    # Train mode: the copies share batch statistics, so it is the same function there too.
    m.train()
    with torch.no_grad():
        assert _rel_err(m.widened(factor)(x), m(x)) < 1e-5
    # A second widening multiplies.
    assert m.widened(2).widened(factor).width == 2 * factor


def test_widened_noise_parts_the_copies():
    m = _random_model(seed=6)
    a = m.widened(2, noise=0.01, generator=torch.Generator().manual_seed(0))
    b = m.widened(2, noise=0.01, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.e2[0::2], a.e2[1::2])
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert not torch.equal(a(x), m.widened(2)(x))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise"):
            m.widened(2, noise=bad)
    with pytest.raises(ValueError, match="width must be"):
        m.widened(0)


def test_wide_model_save_load_and_deconvolve(tmp_path):
    m = _random_model(seed=7)
    w = m.widened(2)
    w.save(tmp_path / "w.pt")
    m.save(tmp_path / "m.pt")
    # Width-1 files keep their config as before; wide ones record the width.
    assert "width" not in torch.load(tmp_path / "m.pt", weights_only=True)["config"]
    r = RLN.load(tmp_path / "w.pt")
    assert r.width == 2
    for k, v in w.state_dict().items():
        assert torch.equal(v, r.state_dict()[k]), k
    vol = np.random.default_rng(0).random((12, 20, 20)).astype(np.float32) * 100
    np.testing.assert_allclose(rln_deconvolve(vol, r, progress=False),
                               rln_deconvolve(vol, m, progress=False), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="released model has width 1"):
        RLN.from_official_checkpoint(tmp_path / "missing.ckpt", width=2)
