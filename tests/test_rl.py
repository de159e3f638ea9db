"""rln_fast.richardson_lucy: correctness (delta PSF, FFT = direct, flux), types, options, errors,
and quality on real data (flowdec bars against scikit-image; deconwolf's DAPI stack)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from rln_fast import psf as psf_models
from rln_fast.ops import rl_classic as rl_ops
from rln_fast.rl import _dfti, richardson_lucy

from .conftest import DEVICES


def blob_image(shape=(14, 22, 19), seed=0, offset=5.0):
    """A few Gaussian blobs on a flat offset, blurred, with Poisson-ish noise: positive data."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    img = np.full(shape, offset)
    for _ in range(6):
        c = [rng.uniform(2, n - 3) for n in shape]
        img += rng.uniform(50, 200) * np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / 3)
    return rng.poisson(img).astype(np.float32)


def rl(*args, **kwargs):
    kwargs.setdefault("progress", False)
    return richardson_lucy(*args, **kwargs)


def small_psf(shape=(3, 5, 5)):
    return psf_models.gaussian(shape, 1.0, sigma=(0.7, 1.0, 1.0))


# correctness -------------------------------------------------------------------------------

@pytest.mark.parametrize("method,edges", [("fft", "bertero"), ("fft", "periodic"), ("fft", "reflect"),
                                          ("direct", "bertero"), ("direct", "reflect")])
@pytest.mark.parametrize("acceleration", [None, "biggs", "shb"])
def test_delta_psf_returns_the_image(method, edges, acceleration):
    img = blob_image()
    delta = np.zeros((3, 5, 3), np.float32)
    delta[1, 2, 1] = 2.0  # normalised inside
    out = rl(img, delta, 4, method=method, edges=edges, acceleration=acceleration, background=0)
    np.testing.assert_allclose(out, img, rtol=1e-5, atol=1e-4 * img.max())


@pytest.mark.parametrize("acceleration", [None, "biggs", "shb"])
@pytest.mark.parametrize("tv,background", [(0.0, 0.0), (0.01, 3.0)])
@pytest.mark.parametrize("psf_shape", [(3, 5, 5), (5, 7, 3), (4, 6, 5)])
def test_fft_and_direct_paths_agree(acceleration, tv, background, psf_shape):
    img = blob_image()
    k = small_psf(psf_shape)
    a = rl(img, k, 12, acceleration=acceleration, tv=tv, background=background)
    b = rl(img, k, 12, method="direct", acceleration=acceleration, tv=tv, background=background)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_flux_is_preserved_with_periodic_edges():
    img = blob_image(seed=1)
    for k in (small_psf(), psf_models.gaussian((9, 15, 15), 1.0, sigma=(2, 3, 3))):
        out = rl(img, k, 15, edges="periodic", acceleration=None, background=0)
        assert abs(out.astype(np.float64).sum() / img.astype(np.float64).sum() - 1) < 1e-5


def test_rl_sharpens_a_blurred_object():
    rng = np.random.default_rng(3)
    obj = np.zeros((16, 32, 32), np.float32)
    obj[8, 10:22, 16] = 100.0
    obj[5, 8, 8] = 300.0
    k = psf_models.gaussian((7, 9, 9), 1.0, sigma=(1.5, 1.5, 1.5))
    from scipy.signal import fftconvolve

    img = np.maximum(fftconvolve(obj, k, mode="same"), 0) + 1.0
    img = rng.poisson(img * 20).astype(np.float32) / 20
    err_in = np.linalg.norm(img - 1 - obj)
    out = rl(img, k, 50, background=1.0)
    assert np.linalg.norm(out - obj) < 0.7 * err_in
    assert out[5, 8, 8] > 4 * img[5, 8, 8]


def test_even_psf_is_centred_at_shape_half():
    # An even side is the odd PSF minus its (zero) last plane: same centre, same result.
    img = blob_image(seed=2)
    odd = small_psf((5, 7, 7)).copy()
    odd[-1] = 0
    odd[:, -1] = 0
    even = odd[:-1, :-1].copy()  # (4, 6, 7)
    for method in ("fft", "direct"):
        a = rl(img, odd, 6, method=method)
        b = rl(img, even, 6, method=method)
        assert np.abs(a - b).max() <= 1e-5 * a.max(), method


# types, devices, options -------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_torch_in_torch_out_same_device(device):
    img = torch.from_numpy(blob_image()).double().to(device)
    out = rl(img, small_psf(), 3)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device == img.device
    assert out.shape == img.shape
    ref = rl(blob_image(), small_psf(), 3)
    assert np.abs(out.cpu().numpy() - ref).max() <= 1e-4 * ref.max()


def test_numpy_in_numpy_out_any_dtype():
    img = blob_image().astype(np.uint16)
    out = rl(img, small_psf(), 3)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == img.shape
    psf_t = torch.from_numpy(small_psf()).double()  # a torch PSF is fine too
    np.testing.assert_allclose(rl(img, psf_t, 3), out, rtol=1e-6, atol=1e-5)
    assert not np.shares_memory(rl(blob_image(), small_psf(), 0), blob_image())


def test_not_clipped_or_rescaled():
    img = blob_image() * 1000.0
    out = rl(img, small_psf(), 5, edges="periodic", background=0)
    assert out.max() > img.max()  # sharper peaks, nothing clipped to the input range or to 1
    assert abs(out.sum() / img.sum() - 1) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("method", ["fft", "direct"])
def test_cuda_matches_cpu_and_returns_to_the_input_device(method):
    img = blob_image()
    cpu = rl(img, small_psf(), 10, method=method, tv=0.005)
    gpu = rl(img, small_psf(), 10, method=method, tv=0.005, device="cuda")
    assert isinstance(gpu, np.ndarray)
    assert np.abs(gpu - cpu).max() <= 1e-4 * cpu.max()
    t = rl(torch.from_numpy(img), small_psf(), 10, method=method, tv=0.005, device="cuda")
    assert t.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    img = cupy.asarray(blob_image())
    out = rl(img, small_psf(), 5)
    assert isinstance(out, cupy.ndarray) and out.dtype == cupy.float32
    np.testing.assert_allclose(cupy.asnumpy(out), rl(blob_image(), small_psf(), 5), rtol=1e-4,
                               atol=1e-3)


def test_num_iter_zero_returns_the_image_as_float32():
    img = blob_image()
    out = rl(img, small_psf(), 0)
    assert out.dtype == np.float32 and np.array_equal(out, img) and not np.shares_memory(out, img)
    t = torch.from_numpy(img)
    out_t = rl(t, small_psf(), 0)
    assert torch.equal(out_t, t) and out_t.data_ptr() != t.data_ptr()


def test_callback_sees_every_iteration_and_can_stop():
    seen = []

    def cb(i, est):
        seen.append((i, tuple(est.shape), est.dtype))

    img = blob_image()
    rl(img, small_psf(), 5, callback=cb)
    assert seen == [(i, img.shape, torch.float32) for i in range(1, 6)]
    stop = rl(img, small_psf(), 50, callback=lambda i, est: i == 3)
    assert np.array_equal(stop, rl(img, small_psf(), 3))


def test_rtol_stops_early():
    img = blob_image()
    n = []
    rl(img, small_psf(), 500, rtol=1e-3, callback=lambda i, e: n.append(i))
    assert 2 <= len(n) < 500


def test_progress_bar_with_and_without_tqdm(monkeypatch, capsys):
    img = blob_image()
    a = richardson_lucy(img, small_psf(), 3, progress=True)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: no bar, no error
    b = richardson_lucy(img, small_psf(), 3, progress=True)
    assert np.array_equal(a, b)


def test_background_auto_is_a_low_percentile_and_matters():
    img = blob_image(offset=40.0)
    auto = rl(img, small_psf(), 8, background="auto")
    fixed = rl(img, small_psf(), 8, background=float(np.percentile(img, 1)))
    np.testing.assert_allclose(auto, fixed, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(auto, rl(img, small_psf(), 8))  # the default
    assert not np.allclose(auto, rl(img, small_psf(), 8, background=0), rtol=1e-3)


def test_image_at_or_below_background_gives_zeros():
    out = rl(np.zeros((5, 6, 7), np.float32), small_psf(), 4)
    assert out.shape == (5, 6, 7) and not out.any()
    assert not rl(np.full((5, 6, 7), 3.0), small_psf(), 4, background=3.0).any()


def test_tv_smooths_noise():
    img = blob_image(seed=4)

    def total_variation(v):
        return sum(np.abs(np.diff(v, axis=a)).sum() for a in range(3))

    plain = rl(img, small_psf(), 20)
    smooth = rl(img, small_psf(), 20, tv=0.02)
    assert total_variation(smooth) < 0.95 * total_variation(plain)
    assert np.array_equal(plain, rl(img, small_psf(), 20, tv=0.0))


def test_prediction_never_extrapolates_a_shrinking_voxel_to_zero():
    from rln_fast.ops import reference_rl
    from rln_fast.rl import _predict

    x = torch.tensor([1.0, 4.0, 2.0, 0.0]).view(1, 1, 1, 1, 4)
    prev = torch.tensor([4.0, 2.0, 2.0, 3.0]).view(1, 1, 1, 1, 4)  # shrinking 4x, growing, flat, 0
    for a in (1.0, 0.6):
        step = x - prev
        want = reference_rl.rl_predict(x, step, a)
        y = _predict(x, step, a)  # the fused op, over step's buffer
        assert y.data_ptr() == step.data_ptr()
        # the straight line: 1 + a (1 - 4) <= 0 for a >= 1/3; the floor: 1 - a + a / 4
        np.testing.assert_allclose(y.flatten().numpy(), [1 - a + a / 4, 4 + 2 * a, 2, 0], rtol=1e-6)
        np.testing.assert_allclose(y.numpy(), want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("acceleration,n", [("shb", 11), ("biggs", 10)])
def test_accelerated_converges_faster_than_plain(acceleration, n):
    # Likelihood after n accelerated iterations >= after 20 plain ones (measured: shb needs 11
    # here, its momentum grows from 0; biggs' first steps are longer, and it overshoots more).
    img = blob_image(seed=5, shape=(16, 24, 24))
    k = psf_models.gaussian((7, 9, 9), 1.0, sigma=(1.5, 2, 2))

    def neg_log_likelihood(x):
        # Poisson I-divergence of the model to the data, on the whole image (periodic model).
        xt = torch.from_numpy(x.astype(np.float64))
        kt = torch.zeros(img.shape, dtype=torch.float64)
        kt[:7, :9, :9] = torch.from_numpy(k)
        kt = torch.roll(kt, (-3, -4, -4), (0, 1, 2))
        m = torch.fft.irfftn(torch.fft.rfftn(xt) * torch.fft.rfftn(kt), s=img.shape).clamp_min(1e-9)
        y = torch.from_numpy(img.astype(np.float64))
        return float((m - y * torch.log(m)).sum())

    plain = neg_log_likelihood(rl(img, k, 20, edges="periodic", acceleration=None, background=0))
    fast = neg_log_likelihood(rl(img, k, n, edges="periodic", acceleration=acceleration, background=0))
    assert fast <= plain


# errors and warnings -----------------------------------------------------------------------

_IMG = np.ones((6, 7, 8), np.float32)
_PSF = np.ones((3, 3, 3), np.float32)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_iter=-1), ValueError, r"num_iter must be >= 0, got -1"),
        (dict(num_iter=2.5), TypeError, r"num_iter must be an integer >= 0, got 2.5"),
        (dict(num_iter=True), TypeError, r"num_iter must be an integer"),
        (dict(method="cufft"), ValueError, r"method must be 'fft' or 'direct', got 'cufft'"),
        (dict(acceleration="nesterov"), ValueError,
         r"acceleration must be 'shb', 'biggs' or 'none' \(or None\), got 'nesterov'"),
        (dict(tv=-0.1), ValueError, r"tv must be a finite number >= 0 \(e.g. 0.002\), got -0.1"),
        (dict(tv=float("nan")), ValueError, r"tv must be a finite number >= 0"),
        (dict(background="median"), ValueError, r"background must be a finite number or 'auto', got 'median'"),
        (dict(background=float("inf")), ValueError, r"background must be a finite number or 'auto', got inf"),
        (dict(edges="zero"), ValueError, r"edges must be 'bertero', 'periodic' or 'reflect', got 'zero'"),
        (dict(method="direct", edges="periodic"), ValueError,
         r"edges='periodic' needs method='fft': the direct path pads with zeros"),
        (dict(callback=3), TypeError, r"callback must be callable as callback\(i, estimate\), got 3"),
        (dict(rtol=0), ValueError, r"rtol must be None or a number > 0, got 0"),
        (dict(image=np.ones((6, 7))), ValueError, r"image must be 3-D \(z, y, x\), got 2-D of shape \(6, 7\)"),
        (dict(image=np.ones((0, 7, 8))), ValueError, r"image must not be empty, got shape \(0, 7, 8\)"),
        (dict(image=np.ones((6, 7, 8), complex)), TypeError, r"image must hold real numbers, got dtype torch.complex128"),
        (dict(image="x.tif"), TypeError, r"image must be a numpy array, torch tensor or cupy array of numbers, got str"),
        (dict(image=np.where(np.arange(336).reshape(6, 7, 8) % 50 == 0, np.nan, 1.0)), ValueError,
         r"image contains 7 NaN or Inf value\(s\); replace them before deconvolving"),
        (dict(psf=np.ones((3, 3))), ValueError, r"psf must be 3-D \(z, y, x\), got a 2-D array of shape \(3, 3\)"),
        (dict(psf=np.ones((3, 0, 3))), ValueError, r"psf must not be empty"),
        (dict(psf=np.full((3, 3, 3), np.inf)), ValueError, r"psf contains 27 NaN or Inf value\(s\)"),
        (dict(psf=np.zeros((3, 3, 3))), ValueError, r"psf must sum to > 0, got sum 0"),
        (dict(psf=-np.ones((3, 3, 3))), ValueError, r"psf must sum to > 0, got sum -27"),
        (dict(psf=np.ones((3, 3, 8)), method="direct", image=np.ones((9, 9, 9))), ValueError,
         r"method='direct' is for PSFs up to 7x7x7 voxels \(even sides count one more\), got \(3, 3, 8\); use method='fft'"),
    ],
)
def test_errors(kwargs, exc, match):
    args = dict(image=_IMG, psf=_PSF, num_iter=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        rl(args.pop("image"), args.pop("psf"), args.pop("num_iter"), **args)


def test_off_centre_psf_warns_and_suggests_prepare():
    k = np.zeros((5, 5, 5), np.float32)
    k[2, 2, 0] = 1.0
    with pytest.warns(UserWarning, match=r"psf is off-centre: its centre of mass is at \(2.0, 2.0, 0.0\).*rln_fast.psf.prepare"):
        rl(np.ones((6, 7, 8), np.float32), k, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl(np.ones((6, 7, 8), np.float32), small_psf(), 1)  # a centred PSF: silent


def test_negative_psf_values_warn_and_are_clipped():
    k = small_psf().copy()
    k[0, 0, 0] = -1e-3
    with pytest.warns(UserWarning, match=r"psf has negative values \(min -0.001\); they are set to 0"):
        out = rl(blob_image(), k, 2)
    k[0, 0, 0] = 0
    np.testing.assert_allclose(out, rl(blob_image(), k, 2), rtol=1e-6)


# PSFs larger than the image -----------------------------------------------------------------

def _bertero_reference(img, psf, num_iter, bg=0.0):
    """Plain Bertero RL in float64 by direct sums (no FFT): the object on image + PSF - 1 per
    axis, H = 'valid' convolution onto the image, weights 1 / H^T 1 where H^T 1 > 1e-2."""
    from numpy.lib.stride_tricks import sliding_window_view

    img = np.asarray(img, np.float64)
    k = np.asarray(psf, np.float64) / np.sum(psf)
    p = k.shape

    def blur(x):  # (H x)[i] = sum_q k[q] x[i + p - 1 - q]
        return np.einsum("abcijk,ijk->abc", sliding_window_view(x, p), k[::-1, ::-1, ::-1])

    def back(r):  # H^T r: zero-pad r by p - 1, then correlate with the flipped PSF
        rp = np.pad(r, [(n - 1, n - 1) for n in p])
        return np.einsum("abcijk,ijk->abc", sliding_window_view(rp, p), k)

    seen = back(np.ones_like(img))
    w = np.where(seen > 1e-2, 1.0 / np.where(seen > 1e-2, seen, 1.0), 0.0)
    level = np.clip(img - bg, 0, None).mean()
    x = np.where(w > 0, level, 0.0)
    for _ in range(num_iter):
        x = x * w * back(img / np.maximum(blur(x) + bg, 1e-6 * level))
    c = [n // 2 for n in p]
    m = img.shape
    return x[c[0]:c[0] + m[0], c[1]:c[1] + m[1], c[2]:c[2] + m[2]]


@pytest.mark.parametrize("psf_shape", [(13, 3, 5), (5, 15, 17), (9, 11, 3)])
@pytest.mark.parametrize("tiled", [False, True])
def test_psf_larger_than_the_image_matches_a_float64_reference(psf_shape, tiled):
    # Deep (z: 13 planes on 6) and wide (y, x beyond the image) PSFs with Bertero edges.
    img = blob_image((6, 10, 9), offset=8.0)
    rng = np.random.default_rng(1)
    k = psf_models.gaussian(psf_shape, 1.0, sigma=(2.5, 2.0, 2.0)) + 1e-3 * rng.random(psf_shape)
    ref = _bertero_reference(img, k, 15, bg=2.0)
    out = rl(img, k, 15, acceleration=None, background=2.0, tile=(3, 10, 9) if tiled else None)
    assert np.abs(out - ref).max() <= 2e-4 * ref.max()


def test_deep_psf_on_a_40_plane_stack():
    # deconwolf's case: a 79-plane PSF for a 40-plane stack; FFT (untiled and tiled) agree.
    img = blob_image((40, 12, 10), offset=10.0)
    k = psf_models.gaussian((79, 3, 3), 1.0, sigma=(6.0, 0.8, 0.8))
    out = rl(img, k, 8, acceleration=None, background=0)
    tiled = rl(img, k, 8, acceleration=None, background=0, tile=(20, 12, 10))
    assert out.shape == img.shape and np.isfinite(out).all() and out.min() >= 0
    assert np.abs(out - tiled).max() <= 1e-3 * out.max()
    ref = _bertero_reference(img, k, 8)
    assert np.abs(out - ref).max() <= 2e-4 * ref.max()


def test_direct_path_takes_psfs_larger_than_the_image():
    img = blob_image((5, 6, 12))
    k = small_psf((7, 7, 3)) + 1e-3
    ref = _bertero_reference(img, k, 10)
    for method in ("direct", "fft"):
        out = rl(img, k, 10, method=method, acceleration=None, background=0)
        assert np.abs(out - ref).max() <= 2e-4 * ref.max(), method
    out = rl(img, k, 10, method="direct", edges="reflect")
    assert out.shape == img.shape and np.isfinite(out).all()


def test_cli_rl_with_a_psf_deeper_than_the_stack(tmp_path):
    pytest.importorskip("tifffile")
    from click.testing import CliRunner

    from rln_fast import io
    from rln_fast.cli import main

    img = blob_image((6, 10, 9), offset=8.0)
    k = psf_models.gaussian((13, 3, 5), 1.0, sigma=(2.5, 0.8, 1.0)).astype(np.float32)
    io.write(tmp_path / "img.tif", img, voxel_size=(0.3, 0.13, 0.13))
    io.write(tmp_path / "psf.tif", k, voxel_size=(0.3, 0.13, 0.13))
    r = CliRunner().invoke(main, ["deconvolve", str(tmp_path / "img.tif"), str(tmp_path / "out.tif"),
                                  "--method", "rl", "--psf", str(tmp_path / "psf.tif"), "--num-iter",
                                  "6", "--acceleration", "none", "--background", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    out, _ = io.read(tmp_path / "out.tif")
    np.testing.assert_allclose(out, rl(img, k, 6, acceleration=None, background=2.0),
                               rtol=1e-4, atol=1e-4 * float(out.max()))


def test_reflect_takes_psfs_larger_than_the_image():
    img = blob_image((6, 10, 9))
    k = psf_models.gaussian((13, 21, 3), 1.0, sigma=(2.0, 2.0, 0.8))
    out = rl(img, k, 6, edges="reflect")
    assert out.shape == img.shape and np.isfinite(out).all() and out.min() >= 0


def test_periodic_crops_a_larger_psf_and_says_so():
    img = blob_image((6, 10, 9))
    k = psf_models.gaussian((13, 5, 15), 1.0, sigma=(2.0, 1.0, 1.0))
    with pytest.warns(UserWarning, match=r"psf \(13, 5, 15\) is larger than the image \(6, 10, 9\): "
                      r"with edges='periodic' it is cropped to \(6, 5, 9\) \(\d+\.\d% of its light "
                      r"kept\); edges='bertero'"):
        out = rl(img, k, 4, edges="periodic")
    # the same as giving the cropped PSF (centre voxel kept at shape // 2)
    np.testing.assert_allclose(out, rl(img, k[6 - 3:6 + 3, :, 7 - 4:7 + 5], 4, edges="periodic"),
                               rtol=1e-5, atol=1e-5 * out.max())


# quality on real data ----------------------------------------------------------------------

def _nrmse(x, gt):
    x, gt = np.asarray(x, np.float64), np.asarray(gt, np.float64)
    s = (x * gt).sum() / (x * x).sum()  # least-squares scale: data and truth have other units
    return float(np.linalg.norm(s * x - gt) / np.linalg.norm(gt))


def test_quality_on_flowdec_bars_vs_scikit_image(shared_dir):
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("skimage")
    d = shared_dir / "data" / "flowdec"
    if not (d / "bars-25pct__data.tif").exists():
        pytest.skip("flowdec bars data not in ../shared/data")
    data = tifffile.imread(d / "bars-25pct__data.tif").astype(np.float32)
    kernel = tifffile.imread(d / "bars-25pct__kernel.tif").astype(np.float64)
    gt = tifffile.imread(d / "bars-25pct__actual.tif")
    kernel = (kernel / kernel.sum()).astype(np.float32)

    def curve(acceleration, n):
        c = []
        rl(data, kernel, n, acceleration=acceleration, callback=lambda i, e: c.append(_nrmse(e.numpy(), gt)))
        return c

    # Biggs has to reach plain RL's best within half of plain's 80 iterations: 40 are enough.
    plain, biggs = curve(None, 80), curve("biggs", 40)
    # scikit-image, every iterate of one 80-iteration run (its estimate is the first argument of
    # every other convolve call), on the PSF padded to odd sides so both use the same centre.
    import skimage.restoration.deconvolution as dec
    from skimage.restoration import richardson_lucy as sk_rl

    psf_odd = np.pad(kernel, [(0, 1 - n % 2) for n in kernel.shape])
    iterates, calls, orig = [], [0], dec.convolve

    def spy(a, *args, **kw):
        if calls[0] % 2 == 0:
            iterates.append(np.array(a))
        calls[0] += 1
        return orig(a, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dec, "convolve", spy)
        final = sk_rl(data, psf_odd, num_iter=80, clip=False, filter_epsilon=1e-12)
    sk = [_nrmse(x, gt) for x in iterates[1:] + [final]]
    assert len(sk) == 80
    best_plain, best_sk = min(plain[9:]), min(sk[9:])
    best_at = int(np.argmin(plain[9:])) + 10
    reach = next((i + 1 for i, v in enumerate(biggs) if v <= best_plain), None)
    print(f"best NRMSE (10-80 it): rln_fast plain {best_plain:.4f} at {best_at}, skimage {best_sk:.4f} "
          f"at {int(np.argmin(sk[9:])) + 10}; Biggs reaches plain's best at iteration {reach}")
    assert best_plain <= best_sk
    assert reach is not None and reach <= best_at // 2, (reach, best_at)


def _dapi_stack(shared_dir) -> np.ndarray:
    """deconwolf's DAPI demo stack (40, 201, 101) as float32; skips where it is absent."""
    tifffile = pytest.importorskip("tifffile")
    path = shared_dir / "data" / "deconwolf" / "dapi_001.tif"
    if not path.exists():
        pytest.skip("deconwolf DAPI stack not in ../shared/data")
    return tifffile.imread(path).astype(np.float32)


def test_dapi_sharper_and_no_edge_ringing_with_bertero(shared_dir):
    img = _dapi_stack(shared_dir)
    assert img.shape == (40, 201, 101)
    k = psf_models.born_wolf((31, 41, 41), (0.3, 0.13, 0.13), na=1.45, wavelength=0.461, ni=1.512)
    bg = float(np.percentile(img, 1))
    full = rl(img, k, 20, background="auto", acceleration="biggs")  # as measured

    # Sharper: mean gradient magnitude per unit intensity, and the share of lateral high
    # frequencies (above a quarter of the sampling rate) in the power spectrum.
    def sharpness(v):
        g = np.gradient(v.astype(np.float64))
        return float(np.sqrt(sum(a * a for a in g)).mean() / v.mean())

    def high_freq(v):
        p = np.abs(np.fft.rfftn(v - v.mean())) ** 2
        r = np.hypot(np.fft.fftfreq(v.shape[1])[:, None], np.fft.rfftfreq(v.shape[2])[None, :])
        return float(p[:, r > 0.25].sum() / p.sum())

    base = img - bg
    s_in, s_out = sharpness(base), sharpness(full)
    h_in, h_out = high_freq(base), high_freq(full)
    print(f"DAPI sharpness {s_in:.4f} -> {s_out:.4f}, high-frequency share {h_in:.5f} -> {h_out:.5f}")
    assert s_out > 1.5 * s_in and h_out > 1.3 * h_in

    # Edges: deconvolve a crop whose y/x borders cut through the sample, and compare its border
    # band with the same voxels of the full-field result (which saw beyond the crop).
    sy, sx = slice(40, 161), slice(25, 76)
    crop = np.ascontiguousarray(img[:, sy, sx])
    want = full[:, sy, sx]
    b = 8
    band = np.zeros(crop.shape, bool)
    band[:, :b] = band[:, -b:] = band[:, :, :b] = band[:, :, -b:] = True

    def band_error(edges):
        d = rl(crop, k, 20, background=bg, edges=edges) - want
        return float(np.sqrt((d[band] ** 2).mean() / (want[band] ** 2).mean()))

    err = {e: band_error(e) for e in ("bertero", "periodic")}
    print(f"DAPI crop border-band error vs full field: {err}")
    assert err["bertero"] < 0.2 and err["bertero"] < 0.5 * err["periodic"]


def test_dapi_default_at_half_the_iterations_matches_plain_rl(shared_dir):
    # Issue 13: the defaults (background "auto", acceleration "shb") at 10 iterations are within
    # 5 % relative L2 of plain RL at 20 on deconwolf's DAPI stack, with a deconwolf-style
    # 79-plane PSF (deeper than the 40-plane stack), and make no new zeros (Biggs with a
    # prediction clipped at 0 zeroed 55 % of the voxels here; measured with the 79x181x181 PSF:
    # shb 4.7 %, biggs 5.0 %, 0 zeros).
    img = _dapi_stack(shared_dir)
    k = psf_models.born_wolf((79, 61, 61), (0.3, 0.13, 0.13), na=1.45, wavelength=0.461, ni=1.512,
                             paraxial=True, integrate=True)
    plain = rl(img, k, 20, acceleration="none")
    fast = rl(img, k, 10)
    rel = np.linalg.norm(fast - plain) / np.linalg.norm(plain)
    zeros = lambda v: int((v <= 1e-6 * v.max()).sum())  # noqa: E731
    print(f"DAPI shb-10 vs plain-20: {rel:.4f}, zeros {zeros(fast)} vs {zeros(plain)}")
    assert rel < 0.05
    assert zeros(fast) <= zeros(plain)


def test_symmetric_and_asymmetric_psfs_take_their_otf_paths():
    # A centro-symmetric PSF has a real OTF (kept as float32 off the CPU, where that halves the
    # traffic; complex on the CPU, where torch multiplies complex by complex fastest) and H^T = H;
    # an asymmetric one the complex OTF and its conjugate.
    from rln_fast import rl as rl_mod

    img = blob_image(seed=6)
    sym = small_psf((3, 5, 5))
    asym = sym.copy()
    asym[0, 1, 2] *= 3  # still centred within a voxel
    assert rl_mod._centro_symmetric(sym) and not rl_mod._centro_symmetric(asym)
    otf = rl_mod._otf(sym, (8, 8, 8), torch.device("cpu"))
    assert otf.is_complex() and float(otf.imag.abs().max()) <= 1e-6 * float(otf.real.abs().max())
    assert rl_mod._otf(asym, (8, 8, 8), torch.device("cpu")).is_complex()
    if torch.cuda.is_available():
        assert not rl_mod._otf(sym, (8, 8, 8), torch.device("cuda")).is_complex()
    for k in (sym, asym):
        a = rl(img, k, 8, acceleration=None)
        b = rl(img, k, 8, acceleration=None, method="direct")
        assert np.abs(a - b).max() <= 1e-4 * a.max()


@pytest.mark.parametrize("psf_shape,shape", [((3, 5, 5), (8, 8, 8)), ((4, 6, 3), (7, 9, 10)),
                                             ((7, 9, 9), (7, 9, 9)), ((1, 1, 1), (2, 3, 4))])
def test_the_otf_embeds_the_psf_as_a_roll_of_it(psf_shape, shape):
    # _wrapped places the PSF's quadrants directly; it must equal the embedded PSF rolled
    # (centre voxel p // 2 to 0), for odd and even sides and a PSF as large as the job.
    from rln_fast import rl as rl_mod

    k = np.random.default_rng(3).random(psf_shape)
    embedded = torch.zeros(shape, dtype=torch.float32)
    embedded[: psf_shape[0], : psf_shape[1], : psf_shape[2]] = torch.as_tensor(k * 0.5, dtype=torch.float32)
    want = torch.roll(embedded, [-(p // 2) for p in psf_shape], dims=(0, 1, 2))
    assert torch.equal(rl_mod._wrapped(k, shape, 0.5, torch.device("cpu")), want)


# CPU FFTs through MKL's DFTI --------------------------------------------------------------

needs_dfti = pytest.mark.skipif(
    _dfti() is None, reason="this torch build exports no MKL DFTI (the CPU job uses torch.fft)")


@needs_dfti
@pytest.mark.parametrize("shape,depth", [((3, 5, 6), 3), ((7, 9, 19), 4), ((1, 12, 10), 1),
                                         ((16, 30, 42), 11)])
def test_dfti_transforms_match_torch_fft(shape, depth):
    from rln_fast import rl as rl_mod

    fft = rl_mod._cpu_fft(shape, depth)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g) - 0.3
    half = (*shape[:2], shape[2] // 2 + 1)
    ref = torch.fft.rfftn(x)
    spec = fft.r2c(x, torch.empty(half, dtype=torch.complex64))
    assert (spec - ref).abs().max() <= 1e-5 * ref.abs().max()
    # A Hermitian spectrum to invert: c2r unscaled, its input left as it was.
    spec_in = torch.fft.rfftn(torch.rand(shape, generator=g))
    before = spec_in.clone()
    out = fft.c2r(spec_in, torch.empty(shape))
    want = torch.fft.irfftn(spec_in, s=shape) * x.numel()
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(spec_in, before)
    # The box variants: r2c of a volume that is 0 beyond plane `depth`; c2r read in those planes
    # (the planes beyond are not written).
    x[depth:] = 0
    ref = torch.fft.rfftn(x)
    spec = fft.r2c_box(x, torch.full(half, 7.0, dtype=torch.complex64))
    assert (spec - ref).abs().max() <= 1e-5 * ref.abs().max()
    out = fft.c2r_box(spec_in.clone(), torch.full(shape, -5.0))
    assert (out[:depth] - want[:depth]).abs().max() <= 1e-5 * want.abs().max()
    if depth < shape[0]:
        assert (out[depth:] == -5.0).all()


@needs_dfti
@pytest.mark.parametrize("edges,acceleration,tv", [("bertero", "biggs", 0.0), ("bertero", None, 0.01),
                                                   ("periodic", None, 0.0), ("periodic", "biggs", 0.0),
                                                   ("reflect", "biggs", 0.005)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_dfti_job_matches_the_torch_fft_job(monkeypatch, edges, acceleration, tv, symmetric):
    # The CPU job with DFTI plans, its kept buffers and the 1/N in the OTF gives the torch.fft
    # job's result (the job every other device runs), on a real and on a complex OTF.
    from rln_fast import rl as rl_mod

    img = blob_image(seed=7)
    k = small_psf((3, 5, 5))
    if not symmetric:
        k = k.copy()
        k[0, 1, 2] *= 3
    kw = dict(edges=edges, acceleration=acceleration, tv=tv)
    fast = rl(img, k, 9, **kw)
    monkeypatch.setattr(rl_mod, "_cpu_fft", lambda shape, depth: None)
    plain = rl(img, k, 9, **kw)
    assert np.abs(fast - plain).max() <= 2e-5 * np.abs(plain).max()


@needs_dfti
def test_cpu_dfti_job_reuses_its_buffers():
    # After the first iterations the solver allocates no new work volumes: the update writes
    # into the volume the solver recycled.
    from rln_fast import rl as rl_mod

    img = torch.from_numpy(blob_image(seed=8))
    k = np.asarray(small_psf(), np.float64)
    job = rl_mod._FFTJob(img, k / k.sum(), "bertero", bg=0.0, eps=1e-6, tv=0.0, tv_eps=1e-3)
    x = job.initial(float(img.mean()))
    y = x.clone()
    new, _ = job.update_(y, None, None)
    job.recycle(y)
    again, _ = job.update_(new, None, None)
    assert again.data_ptr() == y.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize("stored", [True, False])
def test_bertero_start_is_exactly_flat(device, method, stored):
    """The first estimate is exactly `level` where w > 0 and 0 elsewhere, whether w is stored (the
    CPU FFT job) or evaluated per voxel (the GPU, the direct job). A start of level * (H^T 1_M) * w
    by FFT ripples by ~1e-5, which RL-TV's normalised gradient turned into a 1.8e-4 (max) gap
    between the GPU and the CPU after 4 iterations (measured on an H200, 2026-12-04)."""
    from rln_fast.rl import _DirectJob, _FFTJob, _prepare_psf

    psf = psf_models.gaussian((5, 7, 7), sigma=(1.5, 1.0, 1.0))
    img = (torch.rand(9, 14, 21, generator=torch.Generator().manual_seed(1)) + 0.2).to(device)
    k = _prepare_psf(psf, tuple(img.shape), method, "bertero")
    job = (_FFTJob if method == "fft" else _DirectJob)(img, k, "bertero", bg=0.05, eps=1e-6, tv=0.01,
                                                       tv_eps=1e-3)
    if stored and job.weights.dense is None:
        job.weights = rl_ops.store_edge_weights(job.weights, img.new_empty((1, 1, *job.shape)))
    elif not stored:
        job.weights = job.weights._replace(dense=None)
    x = job.initial(0.7)
    w = rl_ops.store_edge_weights(job.weights, x).dense
    assert x.shape == (1, 1, *job.shape) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], torch.where(w > 0, 0.7, 0.0).to(x))
    assert 0 < int((w > 0).sum()) < w.numel()  # both kinds of voxel are there


def test_the_gpu_vs_cpu_diagnostic_runs_and_finds_nothing_on_one_device():
    """scripts/diagnostics/rl_gpu_vs_cpu.py, CPU against itself: it runs, and every path agrees."""
    from pathlib import Path

    from .test_evaluation import _load_script

    mod = _load_script(Path(__file__).resolve().parents[1] / "scripts" / "diagnostics" / "rl_gpu_vs_cpu.py")
    out = mod.run("cpu")
    errors = {k: v for k, v in out.items() if isinstance(v, float)}
    assert len(errors) == 36 + 7 and all(v == 0.0 for v in errors.values()), errors
    assert out["seen*w on dev: min/max"][0] > 0.9999 and out["seen*w on dev: min/max"][1] < 1.0001
