"""rln_fast.stack: axis names, (t, c) selections and per-channel settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rln_fast.stack import check_axes, parse_selection, per_channel


@pytest.mark.parametrize("axes, ndim, want", [("zyx", 3, "zyx"), ("CZYX", 4, "czyx"),
                                             ("tczyx", 5, "tczyx"), ("zcyx", 4, "zcyx"),
                                             ("ctzyx", 5, "ctzyx"), ("yxz", 3, "yxz")])
def test_check_axes_accepts(axes, ndim, want):
    assert check_axes(axes, ndim) == want


@pytest.mark.parametrize("axes, ndim, match", [
    ("qzyx", 4, "unknown axis letter"),
    ("czzx", 4, "more than once"),
    ("tcyx", 4, "no 'z' axis"),
    ("czyx", 5, "names 4 axes but the data has 5"),
])
def test_check_axes_refuses(axes, ndim, match):
    with pytest.raises(ValueError, match=match):
        check_axes(axes, ndim)
    with pytest.raises(TypeError, match="must be a string"):
        check_axes(None, 3)


@pytest.mark.parametrize("sel, want", [
    (None, [0, 1, 2, 3, 4, 5]), (2, [2]), (-1, [5]), ("0,2", [0, 2]), ("2,0,2", [0, 2]),
    ("0:3", [0, 1, 2]), ("::2", [0, 2, 4]), ("4:", [4, 5]), ("0:2,5", [0, 1, 5]),
    ("-2:", [4, 5]), ([3, 1], [1, 3]), (np.array([1, 2]), [1, 2]), (slice(1, 3), [1, 2]),
    (range(0, 6, 3), [0, 3]), ("0:50", [0, 1, 2, 3, 4, 5]),
])
def test_parse_selection(sel, want):
    assert parse_selection(sel, 6, "channel") == want


@pytest.mark.parametrize("sel, err, match", [
    ("7", ValueError, r"7 is out of range; the input has 6 time points"),
    ("a", ValueError, "'a' is not an integer"),
    ("1:2:0", ValueError, "step must not be 0"),
    ("1:2:3:4", ValueError, "not a slice"),
    ("5:2", ValueError, "picks none"),
    ([0.5], TypeError, "not an integer"),
    (1.5, TypeError, "selection must be"),
])
def test_parse_selection_refuses(sel, err, match):
    with pytest.raises(err, match=match):
        parse_selection(sel, 6, "time point")


def test_per_channel_one_value_for_all():
    psf = np.ones((3, 3, 3))
    assert per_channel(5, 3, "num_iter") == [5, 5, 5]
    assert per_channel("auto", 2, "background") == ["auto", "auto"]
    assert per_channel(Path("a.tif"), 2, "psf") == [Path("a.tif")] * 2
    assert all(p is psf for p in per_channel(psf, 2, "psf"))  # an array is one PSF
    assert per_channel(None, 2, "model") == [None, None]


def test_per_channel_lists_and_dicts():
    assert per_channel([10, 20], 2, "num_iter") == [10, 20]
    assert per_channel((1.0, "auto", 3.0), 3, "background") == [1.0, "auto", 3.0]
    assert per_channel({1: "b.tif"}, 3, "psf") == [None, "b.tif", None]
    assert per_channel({-1: 7}, 2, "num_iter") == [None, 7]
    # One per selected channel (the run deconvolves only those), or one per channel.
    assert per_channel([10, 30], 3, "num_iter", [0, 2]) == [10, None, 30]
    assert per_channel([1, 2, 3], 3, "num_iter", [0, 2]) == [1, 2, 3]
    with pytest.raises(ValueError, match="3 values given for 2 channels"):
        per_channel([1, 2, 3], 2, "num_iter")
    with pytest.raises(ValueError, match="channel 2 is out of range"):
        per_channel({2: 1}, 2, "num_iter")
    with pytest.raises(TypeError, match="keys must be channel indices"):
        per_channel({"0": 1}, 2, "num_iter")


# --------------------------------------------------------------------------- deconvolve_stack

import rln_fast as rf  # noqa: E402
from rln_fast.stack import deconvolve_stack  # noqa: E402

VOXEL = (0.3, 0.13, 0.13)
SHAPES = {"t": 2, "c": 2, "z": 6, "y": 10, "x": 12}


def _stack(axes: str, seed: int = 0) -> np.ndarray:
    """A positive random stack with ``axes``; sides differ so that a wrong transpose fails."""
    rng = np.random.default_rng(seed)
    return (rng.random(tuple(SHAPES[a] for a in axes)) * 100 + 5).astype(np.float32)


def _volume(arr, axes: str, t: int, c: int) -> np.ndarray:
    """The (z, y, x) volume (t, c) of ``arr``, as its own contiguous array."""
    index = tuple(t if a == "t" else c if a == "c" else slice(None) for a in axes)
    rest = [a for a in axes if a in "zyx"]
    return np.ascontiguousarray(np.asarray(arr[index]).transpose([rest.index(a) for a in "zyx"]))


def _pairs(axes: str, nt: int | None = None):
    for t in range(nt if nt is not None else SHAPES["t"] if "t" in axes else 1):
        for c in range(SHAPES["c"] if "c" in axes else 1):
            yield t, c


PSF = rf.psf.gaussian((3, 5, 5), VOXEL, sigma=(0.4, 0.2, 0.2))


@pytest.mark.parametrize("axes", ["tczyx", "ctzyx", "czyx", "zcyx", "tzyx", "yxzc", "zyx"])
def test_rl_each_volume_equals_richardson_lucy(axes):
    arr = _stack(axes)
    out = deconvolve_stack(arr, axes, method="rl", psf=PSF, num_iter=3, progress=False)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == arr.shape
    for t, c in _pairs(axes):
        expected = rf.richardson_lucy(_volume(arr, axes, t, c), PSF, 3, progress=False)
        np.testing.assert_array_equal(_volume(out, axes, t, c), expected)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    import torch

    model = rf.RLN()
    model.reset_parameters(generator=torch.Generator().manual_seed(3))
    path = tmp_path_factory.mktemp("model") / "mine.pt"
    model.save(path)
    return path


@pytest.mark.parametrize("axes", ["tczyx", "zcyx", "tzyx"])
def test_rln_each_volume_equals_rln_deconvolve(axes, small_model):
    arr = _stack(axes, seed=1)
    out = deconvolve_stack(arr, axes, model=small_model, device="cpu", progress=False)
    for t, c in _pairs(axes):
        expected = rf.rln_deconvolve(_volume(arr, axes, t, c), small_model, device="cpu",
                                     progress=False)
        np.testing.assert_array_equal(_volume(out, axes, t, c), expected)


def test_rln_per_channel_models_and_options(small_model):
    arr = _stack("czyx", seed=2)
    out = deconvolve_stack(arr, "czyx", model=[None, small_model], normalize="official",
                           device="cpu", progress=False)
    default = rf.rln_deconvolve(arr[0], normalize="official", device="cpu", progress=False)
    mine = rf.rln_deconvolve(arr[1], small_model, normalize="official", device="cpu",
                             progress=False)
    np.testing.assert_array_equal(out[0], default)
    np.testing.assert_array_equal(out[1], mine)
    # the two channels really ran different models
    assert not np.allclose(rf.rln_deconvolve(arr[1], normalize="official", device="cpu",
                                             progress=False), mine)


def test_rln_ensemble_option_reaches_each_volume(small_model):
    arr = _stack("czyx", seed=4)
    out = deconvolve_stack(arr, "czyx", model=small_model, ensemble=2, device="cpu",
                           progress=False)
    for c in range(arr.shape[0]):
        expected = rf.rln_deconvolve(arr[c], small_model, ensemble=2, device="cpu",
                                     progress=False)
        np.testing.assert_array_equal(out[c], expected)
    single = rf.rln_deconvolve(arr[0], small_model, device="cpu", progress=False)
    assert not np.allclose(out[0], single)


def test_torch_in_torch_out():
    import torch

    arr = _stack("tczyx", seed=3)
    x = torch.from_numpy(arr)
    out = deconvolve_stack(x, "tczyx", method="rl", psf=PSF, num_iter=2, channels=1,
                           progress=False)
    assert isinstance(out, torch.Tensor) and out.device == x.device
    assert out.dtype == torch.float32 and tuple(out.shape) == arr.shape
    for t in range(2):
        expected = rf.richardson_lucy(x[t, 1].contiguous(), PSF, 2, progress=False)
        assert isinstance(expected, torch.Tensor)
        assert torch.equal(out[t, 1], expected)
        assert torch.equal(out[t, 0], x[t, 0])  # passed through


def test_skipped_channels_pass_through_and_time_selects():
    arr = (_stack("ctzyx", seed=4) * 10).astype(np.uint16)
    out = deconvolve_stack(arr, "ctzyx", method="rl", psf=PSF, num_iter=2, channels=[0],
                           time="1:", progress=False)
    assert out.shape == (2, 1, 6, 10, 12) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1, 0], arr[1, 1].astype(np.float32))
    expected = rf.richardson_lucy(arr[0, 1], PSF, 2, progress=False)
    np.testing.assert_array_equal(out[0, 0], expected)
    assert not np.array_equal(out[0, 0], arr[0, 1].astype(np.float32))


def test_rl_per_channel_settings_and_psf_files(tmp_path):
    arr = _stack("tczyx", seed=5)
    wide = rf.psf.gaussian((5, 7, 7), VOXEL, sigma=(0.6, 0.3, 0.3))
    path = tmp_path / "wide.tif"
    rf.io.write(path, wide, voxel_size=VOXEL)
    out = deconvolve_stack(arr, "tczyx", method="rl", psf=[PSF, path], num_iter={0: 4},
                           background=[0.0, None], voxel_size=VOXEL, edges="periodic",
                           acceleration=None, progress=False)
    for t in range(2):
        np.testing.assert_array_equal(
            out[t, 0], rf.richardson_lucy(arr[t, 0], PSF, 4, background=0.0, edges="periodic",
                                          acceleration=None, progress=False))
        np.testing.assert_array_equal(  # channel 1: the API's defaults (20, "auto")
            out[t, 1], rf.richardson_lucy(arr[t, 1], rf.io.read(path)[0], edges="periodic",
                                          acceleration=None, progress=False))


def test_rl_psf_from_wavelengths():
    arr = _stack("czyx", seed=6)
    out = deconvolve_stack(arr, "czyx", method="rl", wavelength=[0.461, 0.52], na=1.3,
                           voxel_size=VOXEL, num_iter=2, progress=False)
    assert rf.psf.generated_shape((6, 10, 12)) == (5, 9, 11)
    for c, wl in enumerate((0.461, 0.52)):
        psf = rf.psf.for_image((6, 10, 12), VOXEL, na=1.3, wavelength=wl, ni=1.515)
        np.testing.assert_array_equal(out[c], rf.richardson_lucy(arr[c], psf, 2, progress=False))


class _Lazy:
    """An array-like that is not numpy (as dask or zarr), counting the voxels read."""

    def __init__(self, arr):
        self.arr, self.shape, self.ndim, self.dtype = arr, arr.shape, arr.ndim, arr.dtype
        self.reads: list[int] = []

    def __getitem__(self, index):
        block = self.arr[index]
        self.reads.append(block.size)
        return block


def test_array_like_is_read_one_volume_at_a_time():
    arr = _stack("tczyx", seed=7)
    lazy = _Lazy(arr)
    calls = []
    out = deconvolve_stack(lazy, "tczyx", method="rl", psf=PSF, num_iter=2, channels=0,
                           progress=False, volume_callback=lambda *a: calls.append(a))
    assert isinstance(out, np.ndarray)
    assert max(lazy.reads) == 6 * 10 * 12 and len(lazy.reads) == 4
    assert calls == [(1, 2), (2, 2)]
    np.testing.assert_array_equal(out[1, 0], rf.richardson_lucy(arr[1, 0], PSF, 2,
                                                                progress=False))


def test_dask_array_gives_numpy():
    da = pytest.importorskip("dask.array")
    arr = _stack("zcyx", seed=9)
    out = deconvolve_stack(da.from_array(arr, chunks=(6, 1, 10, 12)), "zcyx", method="rl",
                           psf=PSF, num_iter=2, progress=False)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, deconvolve_stack(arr, "zcyx", method="rl", psf=PSF,
                                                        num_iter=2, progress=False))


def test_volume_callback_exception_stops_the_run():
    arr = _stack("tczyx", seed=8)

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deconvolve_stack(arr, method="rl", psf=PSF, num_iter=1, progress=False,
                         volume_callback=stop)


def test_exported_lazily():
    assert rf.deconvolve_stack is deconvolve_stack
    assert "deconvolve_stack" in rf.__all__


@pytest.mark.parametrize("kwargs, err, match", [
    ({"axes": "czyx"}, ValueError, r"^deconvolve_stack: axes='czyx' names 4 axes but the data "
                                   "has 5"),
    ({"axes": "tcqyx"}, ValueError, "unknown axis letter"),
    ({"method": "wiener"}, ValueError, "method must be 'rln' or 'rl'"),
    ({"method": "rl"}, ValueError, "channel 0 has no PSF; Richardson–Lucy needs psf="),
    ({"method": "rl", "psf": {1: PSF}}, ValueError, "channel 0 has no PSF"),
    ({"method": "rl", "psf": [PSF] * 3}, ValueError, "psf: 3 values given for 2 channels"),
    ({"method": "rl", "psf": PSF, "num_iter": [1, 2, 3]}, ValueError,
     "num_iter: 3 values given for 2 channels"),
    ({"method": "rl", "wavelength": 0.5}, ValueError, "needs na= and voxel_size="),
    ({"method": "rl", "wavelength": 0.5, "psf": PSF}, ValueError, "both a PSF and a "
                                                                  "wavelength"),
    ({"psf": PSF}, ValueError, "psf= applies to method='rl' only"),
    ({"na": 1.4, "wavelength": 0.5}, ValueError, "wavelength=, na= apply to method='rl' only"),
    ({"method": "rl", "wavelength": [0.5, 0.5], "na": 1.6, "voxel_size": VOXEL}, ValueError,
     "channel 0: Born–Wolf PSF: .*na"),
    ({"method": "rl", "psf": PSF, "model": "m.pt"}, ValueError, "model= applies to "
                                                                "method='rln' only"),
    ({"method": "rl", "psf": PSF, "normalize": "global"}, TypeError,
     "unknown option.*'normalize' for method='rl'"),
    ({"acceleration": "shb"}, TypeError, "unknown option.*'acceleration' for method='rln'"),
    ({"method": "rl", "psf": PSF, "channels": "5"}, ValueError, "channel selection '5': 5 is "
                                                                 "out of range"),
    ({"method": "rl", "psf": PSF, "time": "3:"}, ValueError, "picks none"),
    ({"method": "rl", "psf": "absent.tif"}, FileNotFoundError, "absent.tif"),
    ({"voxel_size": (1, 2)}, ValueError, "voxel_size must be three positive numbers"),
])
def test_deconvolve_stack_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        deconvolve_stack(_stack("tczyx"), **{"progress": False, **kwargs})


def test_deconvolve_stack_error_names_the_volume():
    arr = _stack("tczyx")
    arr[1, 0, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"^deconvolve_stack: volume t=1, c=0: rln_deconvolve: "
                                         "volume contains NaN"):
        deconvolve_stack(arr, device="cpu", progress=False)


def test_deconvolve_stack_selection_needs_the_axis():
    with pytest.raises(ValueError, match="time='0' given but axes='czyx' has no 't' axis"):
        deconvolve_stack(_stack("czyx"), "czyx", method="rl", psf=PSF, time="0")
    with pytest.raises(TypeError, match="array must be a numpy array"):
        deconvolve_stack([[1.0]], "zyx")
