"""rln_fast.synth: the official phantom recipe (parameter ranges, rasteriser, noise model, I/O)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from rln_fast import synth

SMALL = (40, 36, 32)


def _delta(n: int = 5) -> np.ndarray:
    d = np.zeros((n, n, n), np.float32)
    d[n // 2, n // 2, n // 2] = 1.0
    return d


def test_params_counts_and_ranges_128():
    p = synth.phantom_params((128, 128, 128), seed=3)
    assert [f for f, _ in synth.FAMILIES] == list(p)
    counts = {f: len(v["intensity"]) for f, v in p.items()}
    assert counts["sphere"] == 100 and counts["shell"] == 100
    for f in ("dot", "line_x", "line_y", "line_z", "sheet_xy", "sheet_xz", "sheet_yz", "box"):
        assert counts[f] == 50
    for f, v in p.items():
        assert np.all((v["intensity"] >= 50) & (v["intensity"] <= 850)), f
    for f in ("sphere", "shell"):
        c = p[f]["centre"]
        assert c.min() >= 8 and c.max() <= 117
    assert set(np.unique(p["sphere"]["radius"])) <= set(range(4, 8))
    assert p["sphere"]["radius"].min() == 4 and p["sphere"]["radius"].max() == 7
    assert p["shell"]["semi_axes"].min() == 4 and p["shell"]["semi_axes"].max() == 7
    assert np.all(p["dot"]["size"] == 2)
    long_axis = {"line_z": 0, "line_y": 1, "line_x": 2}
    for f, a in long_axis.items():
        s = p[f]["size"]
        assert s[:, a].min() >= 2 and s[:, a].max() <= 10
        assert np.all(np.delete(s, a, axis=1) == 2), f
    thin_axis = {"sheet_xy": 0, "sheet_xz": 1, "sheet_yz": 2}
    for f, a in thin_axis.items():
        s = p[f]["size"]
        assert np.all(s[:, a] == 2), f
        sides = np.delete(s, a, axis=1)
        assert sides.min() >= 2 and sides.max() <= 10, f
    b = p["box"]["size"]
    assert b.min() == 2 and b.max() == 6
    # Every small shape lies fully inside the volume.
    for f in ("dot", *long_axis, *thin_axis, "box"):
        assert p[f]["start"].min() >= 0
        assert (p[f]["start"] + p[f]["size"]).max() <= 128, f


def test_params_ranges_scale_with_shape():
    shape = (24, 40, 64)
    p = synth.phantom_params(shape, seed=1)
    side = np.array(shape)
    for f in ("sphere", "shell"):
        c = p[f]["centre"]
        assert np.all(c >= 8) and np.all(c <= side - 11)
    for f, v in p.items():
        if "start" in v:
            assert np.all(v["start"] >= 0) and np.all(v["start"] + v["size"] <= side), f
        else:
            a = v["radius"][:, None] if f == "sphere" else v["semi_axes"]
            assert np.all(v["centre"] - a >= 0) and np.all(v["centre"] + a < side), f


def test_bad_arguments():
    with pytest.raises(ValueError, match="every side >= 19"):
        synth.phantom((18, 32, 32))
    with pytest.raises(ValueError, match="3 integers"):
        synth.phantom((32, 32))
    with pytest.raises(ValueError, match="non-negative integer"):
        synth.phantom(SMALL, seed=-1)
    with pytest.raises(ValueError, match="backend"):
        synth.phantom(SMALL, backend="cuda")


def test_determinism_per_seed():
    a = synth.phantom(SMALL, seed=7)
    b = synth.phantom(SMALL, seed=7)
    c = synth.phantom(SMALL, seed=8)
    assert a.dtype == np.float32 and a.shape == SMALL
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g1, r1 = synth.phantom_pair(_delta(), SMALL, seed=7)
    g2, r2 = synth.phantom_pair(_delta(), SMALL, seed=7)
    g3, r3 = synth.phantom_pair(_delta(), SMALL, seed=8)
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(g1, g3) and not np.array_equal(r1, r3)


def test_rasterised_values_and_backends_agree():
    pytest.importorskip("numba")
    for seed in (0, 5):
        a = synth.phantom(SMALL, seed=seed, backend="numba")
        b = synth.phantom(SMALL, seed=seed, backend="numpy")
        np.testing.assert_array_equal(a, b)
    full = synth.phantom(seed=0)
    assert full.shape == (128, 128, 128)
    assert full.min() >= 30.0 and full.max() <= 880.0
    assert full.min() == 30.0  # background is present
    assert 0.02 < np.mean(full > 30) < 0.5


def test_shapes_overwrite_in_order():
    # The last box drawn shows its own intensity everywhere inside it.
    p = synth.phantom_params(SMALL, seed=2)
    vol = synth.phantom(SMALL, seed=2)
    start, size = p["box"]["start"][-1], p["box"]["size"][-1]
    sl = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    np.testing.assert_array_equal(vol[sl], np.float32(p["box"]["intensity"][-1]) + np.float32(30))


def test_gt_is_blurred_object():
    obj = synth.phantom(SMALL, seed=4)
    gt, _ = synth.phantom_pair(_delta(), SMALL, seed=4)
    r = np.arange(5) - 2.0
    t = np.exp(-(r**2) / (2 * 0.7**2))
    k = t[:, None, None] * t[None, :, None] * t[None, None, :]
    k /= k.sum()
    ref = torch.nn.functional.conv3d(
        torch.from_numpy(obj.astype(np.float64))[None, None],
        torch.from_numpy(k)[None, None], padding=2,
    )[0, 0].numpy()
    np.testing.assert_allclose(gt, ref, rtol=1e-6, atol=1e-4)


def test_psf_convolution_is_circular_and_centred():
    # A shifted delta PSF shifts the (noise-free, large-count) image by the same offset.
    gt = np.zeros(SMALL)
    gt[5, 6, 7] = 1e6
    psf = np.zeros((5, 5, 5))
    psf[2, 2, 3] = 1.0  # one voxel +x from the centre
    raw = synth.simulate_input(gt, psf, seed=0, scale=1.0, read_noise=0.0)
    assert np.unravel_index(np.argmax(raw), raw.shape) == (5, 6, 8)
    gt[:] = 0
    gt[5, 6, SMALL[2] - 1] = 1e6  # wraps around the x edge
    raw = synth.simulate_input(gt, psf, seed=0, scale=1.0, read_noise=0.0)
    assert np.unravel_index(np.argmax(raw), raw.shape) == (5, 6, 0)


def test_noise_model_statistics():
    lam = 40.0
    gt = np.full((64, 64, 64), lam / 5.0)
    raw = synth.simulate_input(gt, _delta(), seed=11)  # B = 5·gt = lam everywhere
    mean, var = raw.mean(), raw.var()
    # Poisson(lam) + N(0, 0.25): mean lam, variance lam + 0.25 (clipping is negligible here).
    assert abs(mean - lam) < 0.05
    assert abs(var - (lam + 0.25)) < 0.02 * (lam + 0.25)
    assert raw.min() >= 0.0


def test_noise_clip_bounds():
    gt = np.full((24, 24, 24), 0.4)  # B = 2: many zeros and a small max
    raw = synth.simulate_input(gt, _delta(3), seed=1)
    b1 = synth.simulate_input(gt, _delta(3), seed=1, read_noise=0.0)
    assert raw.min() == 0.0  # zero counts plus negative noise clip at 0
    assert raw.max() <= b1.max()  # never above max Poisson(B)
    assert np.mean(raw == 0.0) > 0.05  # a clip, not a rare event
    np.testing.assert_array_equal(b1, np.round(b1))  # read_noise 0: pure Poisson counts


def test_same_pair_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    g1, r1 = synth.phantom_pair(_delta(), SMALL, seed=3)
    g2, r2 = synth.phantom_pair(_delta(), SMALL, seed=3, device="cuda")
    np.testing.assert_allclose(g1, g2, rtol=1e-6)
    assert np.mean(r1 != r2) < 1e-4


def test_write_pairs(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    paths = synth.write_pairs(tmp_path, 2, _delta(), SMALL, seed=5, progress=False)
    assert [p[0].name for p in paths] == ["000.tif", "001.tif"]
    assert sorted(p.name for p in (tmp_path / "gt").iterdir()) == ["000.tif", "001.tif"]
    assert sorted(p.name for p in (tmp_path / "input").iterdir()) == ["000.tif", "001.tif"]
    gt, raw = synth.phantom_pair(_delta(), SMALL, seed=6)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "gt" / "001.tif"), gt)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "input" / "001.tif"), raw)


def test_write_pairs_skip_existing_finishes_a_killed_run(tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    synth.write_pairs(tmp_path, 3, _delta(), SMALL, seed=5, progress=False)
    (tmp_path / "input" / "002.tif").unlink()  # killed between the two files of pair 2
    before = (tmp_path / "gt" / "000.tif").stat().st_mtime_ns
    drawn = []
    real = synth.phantom_pair
    monkeypatch.setattr(synth, "phantom_pair", lambda *a, **k: drawn.append(a[2]) or real(*a, **k))
    synth.write_pairs(tmp_path, 3, _delta(), SMALL, seed=5, progress=False, skip_existing=True)
    assert drawn == [7]  # only the incomplete pair is drawn again
    assert (tmp_path / "gt" / "000.tif").stat().st_mtime_ns == before
    _, raw = real(_delta(), SMALL, seed=7)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "input" / "002.tif"), raw)


# --------------------------------------------------------------------------- microscopy recipe

MICRO = (24, 32, 28)


def _gauss_psf() -> np.ndarray:
    from rln_fast import psf as psf_models

    return psf_models.gaussian((9, 9, 9), 1.0, sigma=(2.0, 1.0, 1.0))


def test_microscopy_background_can_be_left_out_of_the_truth():
    psf = _gauss_psf()
    g_in, r_in = synth.microscopy_pair(psf, MICRO, seed=7)
    g_out, r_out = synth.microscopy_pair(psf, MICRO, seed=7, background_in_truth=False)
    np.testing.assert_array_equal(r_in, r_out)  # the microscope sees the same light
    # The difference is the background alone: blurred, scaled like the object, positive.
    diff = g_in.astype(np.float64) - g_out
    assert diff.min() > 0 and diff.mean() > 0.01 * g_in.mean()
    margin = psf.shape[0] // 2
    tall = (MICRO[0] + 2 * margin, *MICRO[1:])
    _, bg = synth.microscopy_object(tall, 7)
    expect = bg[margin: margin + MICRO[0]].astype(np.float64)
    inner = (slice(2, -2),) * 3  # away from the GT blur's zero padding
    corr = np.corrcoef(diff[inner].ravel(), expect[inner].ravel())[0, 1]
    assert corr > 0.99
    half, r_half = synth.microscopy_pair(psf, MICRO, seed=7, background_in_truth=0.5)
    np.testing.assert_array_equal(r_half, r_in)
    np.testing.assert_allclose(g_in.astype(np.float64) - half, diff / 2, atol=1e-3 * float(g_in.max()))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="background_in_truth"):
            synth.microscopy_pair(psf, MICRO, seed=7, background_in_truth=bad)


def test_microscopy_objects_outside_the_volume_can_be_left_out():
    psf = _gauss_psf()
    g_in, r_in = synth.microscopy_pair(psf, MICRO, seed=7)
    g_out, r_out = synth.microscopy_pair(psf, MICRO, seed=7, outside_objects=False)
    # The truth is the same light inside the volume, up to the photon scale (set by the brightest
    # blurred voxel of the tall volume, which may lie outside it); the raw loses their haze.
    scale = float(g_in.max()) / float(g_out.max())
    np.testing.assert_allclose(g_out.astype(np.float64) * scale, g_in, rtol=1e-4, atol=1e-4 * float(g_in.max()))
    assert not np.array_equal(r_in, r_out)
    margin = psf.shape[0] // 2
    obj, _ = synth.microscopy_object((MICRO[0] + 2 * margin, *MICRO[1:]), 7)
    assert obj[:margin].max() > 0 or obj[margin + MICRO[0]:].max() > 0  # there was something to remove


def test_microscopy_texture_and_edges_can_be_ablated():
    shape = (40, 64, 64)
    ref, bg = synth.microscopy_object(shape, seed=2)
    flat, bg_flat = synth.microscopy_object(shape, seed=2, textured=False)
    sharp, bg_sharp = synth.microscopy_object(shape, seed=2, sharp_edges=True)
    # Every draw is still made: the background (drawn last) is the same.
    np.testing.assert_array_equal(bg, bg_flat)
    np.testing.assert_array_equal(bg, bg_sharp)
    assert not np.array_equal(ref, flat) and not np.array_equal(ref, sharp)

    def roughness(vol, where):  # mean |Laplacian| over the voxels in where
        lap = sum(np.diff(vol.astype(np.float64), 2, axis=a)[tuple(slice(1, -1) if b != a else slice(None)
                                                               for b in range(3))] for a in range(3))
        return float(np.abs(lap)[where[1:-1, 1:-1, 1:-1]].mean())

    # Deep inside the objects the untextured volume is flat; the textured one is not.
    inside = flat > 0.2
    for axis in range(3):
        for step in (1, -1):
            inside &= np.abs(flat - np.roll(flat, step, axis=axis)) < 1e-5
    assert inside.sum() > 100
    assert roughness(flat, inside) < 0.01 * roughness(ref, inside)
    # Sharp edges: steeper steps at the objects' surfaces (the same objects otherwise).
    assert np.abs(np.diff(sharp, axis=2)).max() > np.abs(np.diff(ref, axis=2)).max()
    psf = _gauss_psf()
    g, r = synth.microscopy_pair(psf, MICRO, seed=7)
    g2, r2 = synth.microscopy_pair(psf, MICRO, seed=7, textured=False, sharp_edges=True)
    assert not np.array_equal(g, g2) and not np.array_equal(r, r2)
    for bad in ({"textured": False}, {"sharp_edges": True}):
        with pytest.raises(ValueError, match="kind='cells' only"):
            synth.microscopy_pair(psf, MICRO, seed=7, kind="sparse", **bad)


def test_microscopy_determinism_per_seed():
    psf = _gauss_psf()
    g1, r1 = synth.microscopy_pair(psf, MICRO, seed=5)
    g2, r2 = synth.microscopy_pair(psf, MICRO, seed=5)
    g3, r3 = synth.microscopy_pair(psf, MICRO, seed=6)
    assert g1.shape == r1.shape == MICRO and g1.dtype == r1.dtype == np.float32
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(g1, g3) and not np.array_equal(r1, r3)
    o1, b1 = synth.microscopy_object(MICRO, seed=5)
    o2, b2 = synth.microscopy_object(MICRO, seed=5)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(b1, b2)


def test_microscopy_object_value_ranges():
    for seed in range(4):
        obj, bg = synth.microscopy_object((40, 64, 64), seed=seed)
        assert obj.min() >= 0 and obj.max() == pytest.approx(1.0, abs=1e-6)
        lo, hi = synth.MICRO_BACKGROUND
        assert bg.min() > 0 or hi == 0
        assert lo - 1e-6 <= float(bg.mean()) <= hi + 1e-6
        # Uneven: the background varies smoothly (neighbours close, far voxels differ).
        if bg.mean() > 0.01:
            assert bg.std() > 0.02 * bg.mean()
            assert np.abs(np.diff(bg, axis=2)).max() < 0.2 * bg.max()


def test_microscopy_gt_is_blurred_object_and_raw_has_camera():
    psf = _gauss_psf()
    seed = 3
    gt, raw = synth.microscopy_pair(psf, MICRO, seed=seed)
    margin = psf.shape[0] // 2
    obj, bg = synth.microscopy_object((MICRO[0] + 2 * margin, *MICRO[1:]), seed=seed)
    crop = slice(margin, margin + MICRO[0])
    ref = synth._blur(torch.from_numpy((obj[crop] + bg[crop]).astype(np.float64))).numpy()
    k = float(gt.sum() / ref.sum())  # the photon scale
    lo, hi = synth.MICRO_PHOTONS
    assert 0.1 * lo < k < 10 * hi
    np.testing.assert_allclose(gt, k * ref, rtol=1e-4, atol=1e-4 * k)
    assert raw.min() >= 0


def test_microscopy_haze_from_outside_the_volume(monkeypatch):
    # An object only just above the crop (in the tall margin) sends light into raw, not gt.
    psf = _gauss_psf()
    margin = psf.shape[0] // 2
    tall = (MICRO[0] + 2 * margin, *MICRO[1:])

    def above_only(shape, seed=0, **ablations):
        assert tuple(shape) == tall
        obj = np.zeros(shape, np.float32)
        obj[margin - 2:margin, 8:24, 8:20] = 1.0
        return obj, np.zeros(shape, np.float32)

    monkeypatch.setattr(synth, "microscopy_object", above_only)
    gt, raw = synth.microscopy_pair(psf, MICRO, seed=1)
    assert gt.max() == 0.0
    top, bottom = raw[:2, 8:24, 8:20].mean(), raw[-2:, 8:24, 8:20].mean()
    assert top > bottom + 10 * raw[-2:].std() / np.sqrt(raw[-2:, 8:24, 8:20].size) + 1.0


def test_recipe_option():
    psf = _gauss_psf()
    shape = (24, 24, 24)
    official = synth.phantom_pair(psf, shape, seed=4)
    mixed_even = synth.phantom_pair(psf, shape, seed=4, recipe="mixed")
    micro = synth.phantom_pair(psf, shape, seed=5, recipe="microscopy")
    mixed_odd = synth.phantom_pair(psf, shape, seed=5, recipe="mixed")
    for a, b in zip(official, mixed_even, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(micro, mixed_odd, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(micro[0], synth.microscopy_pair(psf, shape, 5)[0])
    with pytest.raises(ValueError, match="recipe"):
        synth.phantom_pair(psf, shape, seed=4, recipe="confocal")
    with pytest.raises(ValueError, match="recipe"):
        synth.write_pairs("/nonexistent/never", 1, psf, shape, recipe="x", progress=False)


def test_mixed_recipes_share_of_microscopy_volumes(monkeypatch):
    # microscopy_every = N: microscopy where seed % N == N - 1 (the recipe: N = 2, odd seeds);
    # the other recipes ignore it.
    drawn = []
    monkeypatch.setattr(synth, "microscopy_pair", lambda psf, shape, seed, device=None, **kw: drawn.append(seed))
    monkeypatch.setattr(synth, "phantom", lambda shape, seed: np.zeros(shape, np.float32))
    psf = _gauss_psf()
    for every, want in ((None, [1, 3, 5, 7]), (2, [1, 3, 5, 7]), (4, [3, 7]), (1, list(range(8)))):
        kw = {} if every is None else {"microscopy_every": every}
        drawn.clear()
        for seed in range(8):
            synth.phantom_pair(psf, (20, 20, 20), seed, recipe="mixed", **kw)
        synth.phantom_pair(psf, (20, 20, 20), 3, recipe="official", **kw)
        assert drawn == want, every
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="microscopy_every"):
            synth.phantom_pair(psf, (20, 20, 20), 1, recipe="mixed", microscopy_every=bad)


def test_mixed_sparse_recipe_cycles_official_microscopy_sparse():
    psf = _gauss_psf()
    shape = (24, 24, 24)
    for seed, want in ((6, synth.phantom_pair(psf, shape, seed=6)),
                       (7, synth.microscopy_pair(psf, shape, 7)),
                       (8, synth.microscopy_pair(psf, shape, 8, kind="sparse"))):
        for a, b in zip(synth.phantom_pair(psf, shape, seed=seed, recipe="mixed_sparse"), want, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="kind"):
        synth.microscopy_pair(psf, shape, 8, kind="beads")


def test_sparse_object_is_few_bright_small_things_on_a_dark_field():
    for seed in range(4):
        obj, bg = synth.sparse_object((40, 64, 64), seed=seed)
        assert obj.dtype == bg.dtype == np.float32 and obj.min() >= 0
        assert obj.max() == pytest.approx(1.0, abs=1e-6)
        # Sparse: almost every voxel far below the peak (what makes them unlike the cells).
        assert float((obj > 0.1).mean()) < 0.05
        lo, hi = synth.SPARSE_BACKGROUND
        assert lo - 1e-6 <= float(bg.mean()) <= hi + 1e-6
        np.testing.assert_array_equal(obj, synth.sparse_object((40, 64, 64), seed=seed)[0])
    assert not np.array_equal(synth.sparse_object((40, 64, 64), 0)[0], synth.sparse_object((40, 64, 64), 1)[0])


def test_numba_rasteriser_keeps_torchs_thread_count():
    # numba's OpenMP layer shares torch's libgomp; its first launch in a process used to leave
    # the caller's OpenMP team at numba's thread count, so torch.set_num_threads(1) was undone
    # (and rln_fast's CPU kernels then ran on every core). A fresh process: the first launch.
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba runs one thread here: nothing to undo")
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from rln_fast import synth\n"
        "torch.ones(8).sum(), torch.get_num_threads()  # torch's OpenMP in use first, as in training\n"
        f"synth.phantom({SMALL}, seed=1, backend='numba')\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "1"
