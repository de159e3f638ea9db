"""Tiles: the grid, the memory budget, exact block-wise percentiles, tiled RLN = untiled RLN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rln_fast as rf
from rln_fast import tiling
from rln_fast.models.rln import RLN


@pytest.fixture(scope="module")
def model() -> RLN:
    torch.manual_seed(0)
    return RLN().eval()  # random official initialisation: every layer does something


def test_grid_covers_the_volume_once():
    shape = (37, 50, 23)
    tiles = tiling.tile_grid(shape, (16, 16, 16), 5)
    seen = np.zeros(shape, np.int32)
    for t in tiles:
        seen[t.core] += 1
        for c, o, i, s in zip(t.core, t.outer, t.inner, shape, strict=True):
            assert o.start == max(c.start - 5, 0) and o.stop == min(c.stop + 5, s)
            assert i.start == c.start - o.start and i.stop - i.start == c.stop - c.start
    assert (seen == 1).all()
    assert len(tiles) == 3 * 4 * 2


def test_rln_grid_refuses_odd_cuts():
    with pytest.raises(ValueError, match="even sides"):
        tiling.tile_grid((40, 40, 40), (15, 16, 16), 16, even=True)
    with pytest.raises(ValueError, match="even sides"):
        tiling.tile_grid((40, 40, 40), (16, 16, 16), 15, even=True)
    # An odd core that covers the whole axis is no cut.
    assert len(tiling.tile_grid((15, 40, 40), (15, 16, 16), 16, even=True)) == 9


@pytest.mark.parametrize("text,expected", [
    ("4GB", 4 * 10**9), ("4 GiB", 4 << 30), ("4G", 4 << 30), ("512MB", 512 * 10**6),
    ("1.5GiB", 3 << 29), (1000, 1000), ("2e9", 2 * 10**9)])
def test_parse_memory(text, expected):
    assert tiling.parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["4 parsecs", "", "-1GB", 0, "GB"])
def test_parse_memory_refuses(bad):
    with pytest.raises(ValueError, match="memory budget"):
        tiling.parse_memory(bad)


def test_choose_core_fits_the_budget():
    shape, halo, bpv = (200, 1000, 900), (16, 16, 16), 256
    budget = 1 << 30
    core = tiling.choose_core(shape, budget, bpv, halo)
    outer = [min(c + 2 * h, s) for c, h, s in zip(core, halo, shape, strict=True)]
    assert bpv * np.prod(outer) <= budget
    assert all(c % 16 == 0 or c == s for c, s in zip(core, shape, strict=True))
    # Not wasteful: one more step on any axis would not fit.
    assert bpv * np.prod(outer) > budget / 2
    assert tiling.choose_core((10, 20, 30), budget, bpv, halo) == (10, 20, 30)
    with pytest.raises(ValueError, match="too small"):
        tiling.choose_core(shape, 1 << 20, bpv, halo)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "float32", "float64"])
def test_exact_percentiles_match_numpy(dtype, monkeypatch):
    rng = np.random.default_rng(1)
    a = rng.normal(300, 80, (23, 31, 17))
    a[a < 250] = 0  # many ties, as a dark background has
    if np.dtype(dtype).kind in "ui":
        a = np.clip(a, np.iinfo(dtype).min, np.iinfo(dtype).max)
    a = a.astype(dtype)
    # Small blocks, so that the histograms really add up over several reads.
    monkeypatch.setattr(tiling, "_slabs", lambda shape, voxels=0: [
        (slice(z, min(z + 3, shape[0])), slice(0, shape[1]), slice(0, shape[2]))
        for z in range(0, shape[0], 3)])
    q = (0.01, 50, 99.5, 100)
    expected = np.percentile(a.astype(np.float32), q)
    np.testing.assert_array_equal(tiling.exact_percentiles(a, q), expected)


def test_exact_percentiles_refuse_nan():
    a = np.ones((4, 4, 4), np.float32)
    a[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        tiling.exact_percentiles(a)


@pytest.mark.parametrize("shape,tile", [
    ((45, 70, 61), (16, 32, 32)),   # sides not multiples of the tile, odd sides
    ((40, 36, 36), (18, 20, 34)),   # tiles not multiples of 4
    ((9, 101, 33), (8, 50, 12)),    # thin z, a 1-voxel last core
])
@pytest.mark.parametrize("normalize", ["global", None])
def test_tiled_rln_equals_untiled(model, shape, tile, normalize):
    rng = np.random.default_rng(2)
    x = (rng.gamma(2.0, 40.0, shape) + 5).astype(np.float32)
    full = rf.rln_deconvolve(x, model, normalize=normalize, progress=False)
    tiled = rf.rln_deconvolve(x, model, normalize=normalize, tile=tile, progress=False)
    assert np.abs(tiled - full).max() <= 1e-5 * np.abs(full).max()


def test_flip_ensemble_is_the_mean_of_flipped_runs_and_tiles_exactly(model):
    rng = np.random.default_rng(4)
    x = (rng.gamma(2.0, 40.0, (21, 34, 27)) + 5).astype(np.float32)  # odd sides
    one = rf.rln_deconvolve(x, model, progress=False)
    flipped = rf.rln_deconvolve(np.ascontiguousarray(x[:, :, ::-1]), model, progress=False)[:, :, ::-1]
    two = rf.rln_deconvolve(x, model, ensemble=2, progress=False)
    np.testing.assert_allclose(two, (one + flipped) / 2, rtol=1e-6, atol=1e-6 * np.abs(one).max())
    assert np.abs(two - one).max() > 1e-3 * np.abs(one).max()  # the flip changes the output
    eight = rf.rln_deconvolve(x, model, ensemble=8, progress=False)
    tiled = rf.rln_deconvolve(x, model, ensemble=8, tile=(10, 16, 14), progress=False)
    assert np.abs(tiled - eight).max() <= 1e-5 * np.abs(eight).max()
    # torch in, torch out; the mean is an ordinary tensor
    t = rf.rln_deconvolve(torch.from_numpy(x), model, ensemble=4, normalize=None, progress=False)
    assert isinstance(t, torch.Tensor) and not t.is_inference()
    for bad in (0, 3, 16, True, 2.0):
        with pytest.raises(ValueError, match="ensemble must be 1, 2, 4 or 8"):
            rf.rln_deconvolve(x, model, ensemble=bad, progress=False)


def test_tiled_rln_from_a_budget_torch_in_torch_out(model):
    x = torch.rand(36, 80, 72) * 100
    full = rf.rln_deconvolve(x, model, progress=False)
    # 256 B/voxel planned: 30 MB allows outer boxes of ~117k voxels, so several tiles.
    assert tiling.choose_core(x.shape, 30 * 10**6, tiling.RLN_BYTES_PER_VOXEL, 16) < (36, 80, 72)
    tiled = rf.rln_deconvolve(x, model, memory_budget="30MB", progress=False)
    assert isinstance(tiled, torch.Tensor) and tiled.dtype == torch.float32
    assert (tiled - full).abs().max() <= 1e-5 * full.abs().max()


def test_halo_16_is_needed(model, monkeypatch):
    """The test above can fail: with a halo of 8 the seams exceed its tolerance (the influence
    of a voxel fades with distance, so 12-14 would pass it; 16 is the receptive field)."""
    rng = np.random.default_rng(3)
    x = (rng.gamma(2.0, 40.0, (40, 40, 40)) + 5).astype(np.float32)
    full = rf.rln_deconvolve(x, model, progress=False)
    monkeypatch.setattr(tiling, "RLN_HALO", 8)
    short = rf.rln_deconvolve(x, model, tile=(20, 20, 20), progress=False)
    assert np.abs(short - full).max() > 1e-5 * np.abs(full).max()


@pytest.mark.parametrize("kwargs,match", [
    (dict(tile=(15, 16, 16)), "even sides"),
    (dict(tile=(1, 16, 16)), "tile sides must be >= 2"),
    (dict(tile=(16, 16)), "3 ints"),
    (dict(tile=(16, 16, 16), memory_budget="1GB"), "not both"),
    (dict(memory_budget="lots"), "not understood"),
])
def test_tile_arguments_are_checked(model, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rf.rln_deconvolve(np.ones((40, 40, 40), np.float32), model, progress=False, **kwargs)


@pytest.fixture(scope="module")
def rl_case():
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(0)
    shape = (40, 96, 96)
    obj = np.zeros(shape, np.float32)
    idx = tuple(rng.integers(0, n, 400) for n in shape)
    obj[idx] = rng.uniform(100, 1000, 400)
    k = rf.psf.gaussian((9, 15, 15), 1.0, sigma=(1.5, 2.0, 2.0))
    img = rng.poisson(np.maximum(fftconvolve(obj, k, mode="same"), 0) + 10).astype(np.float32)
    return img, k


def test_tiled_rl_seams(rl_case):
    """Plain RL in tiles with the default halo (two PSF extents): seams at ~1e-5 of the max."""
    img, k = rl_case
    full = rf.richardson_lucy(img, k, 20, acceleration=None, progress=False)
    tiled = rf.richardson_lucy(img, k, 20, acceleration=None, tile=(16, 48, 48), progress=False)
    assert np.abs(tiled - full).max() <= 5e-5 * full.max()
    # Halving the halo shows the seams, so the check above can fail.
    rl_halo = tiling.rl_halo
    try:
        tiling.rl_halo = lambda shape, widths=2.0: rl_halo(shape, 0.5)
        short = rf.richardson_lucy(img, k, 20, acceleration=None, tile=(16, 48, 48), progress=False)
    finally:
        tiling.rl_halo = rl_halo
    assert np.abs(short - full).max() > 1e-3 * full.max()


def test_tiled_rl_biggs_and_budget(rl_case):
    img, k = rl_case
    x = torch.from_numpy(img)
    full = rf.richardson_lucy(x, k, 10, acceleration="biggs", background=0, progress=False)
    tiled = rf.richardson_lucy(x, k, 10, memory_budget="40MB", acceleration="biggs",
                               background="auto", progress=False)
    assert isinstance(tiled, torch.Tensor)
    auto_full = rf.richardson_lucy(x, k, 10, acceleration="biggs", background="auto", progress=False)
    rms = float(((tiled - auto_full) ** 2).mean().sqrt() / (auto_full**2).mean().sqrt())
    assert rms < 0.03  # each tile extrapolates with its own Biggs steps
    assert not torch.equal(full, auto_full)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tile=8, memory_budget="1GB"), "not both"),
    (dict(tile=8, callback=lambda i, x: None), "callback="),
    (dict(memory_budget="1 furlong"), "not understood"),
])
def test_tiled_rl_arguments(rl_case, kwargs, match):
    img, k = rl_case
    with pytest.raises(ValueError, match=match):
        rf.richardson_lucy(img, k, 2, progress=False, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_tiled_rln_on_cuda_equals_untiled(model):
    x = (torch.rand(40, 70, 66, device="cuda") * 100 + 5)
    full = rf.rln_deconvolve(x, model, progress=False)
    tiled = rf.rln_deconvolve(x, model, tile=(16, 32, 32), progress=False)
    assert tiled.is_cuda
    assert (tiled - full).abs().max() <= 1e-5 * full.abs().max()
    # Host input, tiles computed on the GPU.
    host = rf.rln_deconvolve(x.cpu().numpy(), model, tile=(16, 32, 32), device="cuda",
                             progress=False)
    assert np.abs(host - full.cpu().numpy()).max() <= 1e-5 * float(full.abs().max())
