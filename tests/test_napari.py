"""The napari plugin: widgets against the API, progress and cancel, errors, manifest, samples.

Runs headless. With an OpenGL context (a display or Xvfb) the widgets are docked in a full
viewer from napari's ``make_napari_viewer``; without one (QT_QPA_PLATFORM=offscreen on a bare
CI machine: vispy cannot draw) they run against napari's ``ViewerModel``, which holds the same
layer list, so every test still runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")
npe2 = pytest.importorskip("npe2")

import rln_fast as rf  # noqa: E402
from rln_fast import demo  # noqa: E402
from rln_fast.napari import _sample_data  # noqa: E402
from rln_fast.napari._widgets import (  # noqa: E402
    PSFWidget,
    RichardsonLucyWidget,
    RLNWidget,
    StackWidget,
    layer_axes,
)

MANIFEST = Path(rf.__file__).parent / "napari.yaml"
VOXEL = (0.3, 0.13, 0.13)
TRANSLATE = (1.0, 2.0, 3.0)
TIMEOUT_MS = 60_000

_GL: dict[str, bool] = {}


def _has_opengl() -> bool:
    if "ok" not in _GL:
        from qtpy.QtGui import QOpenGLContext

        _GL["ok"] = bool(QOpenGLContext().create())
    return _GL["ok"]


@pytest.fixture
def viewer(request, qtbot):
    if _has_opengl():
        return request.getfixturevalue("make_napari_viewer")()
    from napari.components import ViewerModel

    return ViewerModel()


@pytest.fixture
def dock(viewer, qtbot):
    def add(widget):
        if hasattr(viewer, "window"):
            viewer.window.add_dock_widget(widget)
        else:
            qtbot.addWidget(widget.native)
        return widget

    return add


@pytest.fixture
def notifications():
    from napari.utils.notifications import notification_manager

    got = []
    notification_manager.notification_ready.connect(got.append)
    yield got
    notification_manager.notification_ready.disconnect(got.append)


def _volume(shape=(16, 32, 32), seed=0) -> np.ndarray:
    """A positive, blurred random volume: structure for RL to sharpen, no zeros."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.random(shape) ** 4 * 1000.0, 1.0) + 10.0
    return vol.astype(np.float32)


def _wait(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


def _shown(field, panel) -> bool:
    """Whether ``field`` shows when ``panel`` does (headless, the panel itself is not shown)."""
    return field.native.isVisibleTo(panel.native)


def _errors(got) -> list[str]:
    return [str(n.message) for n in got if n.severity == "error"]


# --------------------------------------------------------------------------- Richardson-Lucy


def test_rl_widget_generated_psf_equals_api(viewer, dock, qtbot):
    img = _volume()
    layer = viewer.add_image(img, name="cells", scale=VOXEL, translate=TRANSLATE)
    w = dock(RichardsonLucyWidget(viewer))
    assert w.image.value is layer
    assert w.voxel_size == pytest.approx(VOXEL)
    w.iterations.value = 4
    w.na.value, w.wavelength.value, w.ni.value = 1.3, 0.6, 1.515
    w.device.value = "cpu"
    steps = []
    w.progress.changed.connect(steps.append)

    w.run()
    assert w.running and w.progress.max == 4 and not w.run_button.enabled
    _wait(qtbot, w)

    assert steps[:4] == [1, 2, 3, 4]
    out = viewer.layers["cells RL 4 it"]
    # As every run generates one: the image's odd sides (15, 31, 31), cropped to the support.
    assert rf.psf.generated_shape(img.shape) == (15, 31, 31)
    psf = rf.psf.for_image(img.shape, VOXEL, na=1.3, wavelength=0.6, ni=1.515)
    expected = rf.richardson_lucy(img, psf, 4, acceleration="shb", edges="bertero",
                                  device="cpu", progress=False)
    np.testing.assert_array_equal(out.data, expected)
    assert tuple(out.scale) == pytest.approx(VOXEL)
    assert tuple(out.translate) == pytest.approx(TRANSLATE)
    assert w.run_button.enabled and not w.cancel_button.enabled


@pytest.mark.parametrize("psf_scale", [VOXEL, (0.15, 0.065, 0.065)], ids=["same", "resampled"])
def test_rl_widget_psf_layer_equals_api(viewer, dock, qtbot, psf_scale):
    img = _volume(seed=1)
    viewer.add_image(img, name="cells", scale=VOXEL)
    psf = rf.psf.gaussian((9, 11, 11), psf_scale, sigma=(0.5, 0.15, 0.15))
    psf_layer = viewer.add_image(psf, name="bead", scale=psf_scale)
    w = dock(RichardsonLucyWidget(viewer))
    w.image.value = viewer.layers["cells"]
    w.psf.value = psf_layer
    assert not _shown(w.na, w)  # the optics fields are for the generated PSF only
    w.iterations.value = 3
    w.acceleration.value = "none"
    w.edges.value = "periodic"
    w.device.value = "cpu"
    w.run()
    _wait(qtbot, w)

    if psf_scale == VOXEL:
        used = psf
    else:
        used = rf.psf.prepare(psf, psf_scale, VOXEL, background=None, image_shape=img.shape)
    expected = rf.richardson_lucy(img, used, 3, acceleration=None, edges="periodic",
                                  device="cpu", progress=False)
    np.testing.assert_array_equal(viewer.layers["cells RL 3 it"].data, expected)


def test_rl_widget_edited_voxel_size_sets_output_scale(viewer, dock, qtbot):
    img = _volume(seed=2)
    viewer.add_image(img, name="a", scale=(1.0, 1.0, 1.0))
    b = viewer.add_image(img, name="b", scale=(0.5, 0.1, 0.1))
    w = dock(RichardsonLucyWidget(viewer))
    w.image.value = b
    assert w.voxel_size == pytest.approx((0.5, 0.1, 0.1))
    w.dz.value = 0.4
    w.iterations.value = 1
    w.device.value = "cpu"
    w.run()
    _wait(qtbot, w)
    out = viewer.layers["b RL 1 it"]
    assert tuple(out.scale) == pytest.approx((0.4, 0.1, 0.1))
    psf = rf.psf.for_image(img.shape, (0.4, 0.1, 0.1), na=1.4, wavelength=0.52, ni=1.515)
    np.testing.assert_array_equal(
        out.data, rf.richardson_lucy(img, psf, 1, device="cpu", progress=False))


def test_rl_widget_cancel_stops_and_adds_nothing(viewer, dock, qtbot, notifications):
    viewer.add_image(_volume(seed=3), name="cells", scale=VOXEL)
    w = dock(RichardsonLucyWidget(viewer))
    w.iterations.value = 10000
    w.device.value = "cpu"
    steps = []
    w.progress.changed.connect(steps.append)
    w.run()
    qtbot.waitUntil(lambda: w.progress.value >= 2, timeout=TIMEOUT_MS)
    w.cancel()
    _wait(qtbot, w)
    assert [layer.name for layer in viewer.layers] == ["cells"]
    assert max(steps) < 10000
    assert w.status.value == "cancelled"
    assert any("cancelled" in str(n.message) for n in notifications)


# --------------------------------------------------------------------------- RLN


def test_rln_widget_default_model_equals_api(viewer, dock, qtbot):
    img = _volume(seed=4)
    viewer.add_image(img, name="cells", scale=VOXEL, translate=TRANSLATE)
    w = dock(RLNWidget(viewer))
    w.device.value = "cpu"
    assert not _shown(w.model_file, w)
    w.run()
    assert w.progress.max == 0  # busy: one network pass has no steps to count
    _wait(qtbot, w)
    out = viewer.layers["cells RLN"]
    np.testing.assert_array_equal(out.data, rf.rln_deconvolve(img, device="cpu", progress=False))
    assert tuple(out.scale) == pytest.approx(VOXEL)
    assert tuple(out.translate) == pytest.approx(TRANSLATE)


def test_rln_widget_model_file_equals_api(viewer, dock, qtbot, tmp_path):
    import torch

    model = rf.RLN()
    model.reset_parameters(generator=torch.Generator().manual_seed(7))
    path = tmp_path / "mine.pt"
    model.save(path)
    img = _volume(seed=5)
    viewer.add_image(img, name="cells", scale=VOXEL)
    w = dock(RLNWidget(viewer))
    w.model.value = "model file"
    assert _shown(w.model_file, w)
    w.model_file.value = path
    w.normalize.value = "official"
    w.ensemble.value = 2
    w.device.value = "cpu"
    w.run()
    _wait(qtbot, w)
    expected = rf.rln_deconvolve(img, path, normalize="official", ensemble=2, device="cpu",
                                 progress=False)
    default = rf.rln_deconvolve(img, normalize="official", ensemble=2, device="cpu",
                                progress=False)
    single = rf.rln_deconvolve(img, path, normalize="official", device="cpu", progress=False)
    out = viewer.layers["cells RLN (mine)"].data
    np.testing.assert_array_equal(out, expected)
    assert not np.allclose(out, default)  # the file's model was used, not the shipped one
    assert not np.allclose(out, single)  # and the ensemble


def test_rln_widget_cancel_discards_result(viewer, dock, qtbot, notifications):
    viewer.add_image(_volume(seed=6), name="cells", scale=VOXEL)
    w = dock(RLNWidget(viewer))
    w.device.value = "cpu"
    w.run()
    w.cancel()
    _wait(qtbot, w)
    assert [layer.name for layer in viewer.layers] == ["cells"]
    assert w.status.value == "cancelled"


# --------------------------------------------------------------------------- stacks

SCALE4 = (2.0, *VOXEL)  # a 4-D layer's scale: its first axis, then (z, y, x) in µm


def _stack(shape, seed=0) -> np.ndarray:
    return np.stack([_volume(shape[-3:], seed=seed + i) for i in range(int(np.prod(shape[:-3])))]
                    ).reshape(shape)


def test_layer_axes_from_labels_or_a_default(viewer):
    a = viewer.add_image(np.zeros((3, 4, 8, 8), np.float32), name="few")
    b = viewer.add_image(np.zeros((12, 4, 8, 8), np.float32), name="many")
    c = viewer.add_image(np.zeros((2, 3, 4, 8, 8), np.float32), name="five")
    d = viewer.add_image(np.zeros((4, 8, 8, 3), np.float32), name="labelled",
                         axis_labels=("z", "y", "x", "c"))
    assert layer_axes(a, viewer) == ("czyx", False)  # a few: channels
    assert layer_axes(b, viewer) == ("tzyx", False)  # many: time points
    assert layer_axes(a, viewer, one_channel=True) == ("tzyx", False)
    assert layer_axes(c, viewer) == ("tczyx", False)
    assert layer_axes(d, viewer) == ("zyxc", True)
    assert layer_axes(a, viewer) == ("czyx", False)  # d's labels are not a's
    # napari without per-layer labels: the viewer's last ndim labels
    from types import SimpleNamespace

    viewer.dims.axis_labels = ("t", "z", "c", "y", "x")
    old = SimpleNamespace(ndim=4, data=np.zeros((3, 2, 8, 8)), multiscale=False)
    assert layer_axes(old, viewer) == ("zcyx", True)


def test_stack_widget_multichannel_rl_equals_api(viewer, dock, qtbot):
    img = _stack((2, 8, 16, 16))
    layer = viewer.add_image(img, name="cells", scale=SCALE4, translate=(0.0, *TRANSLATE),
                             colormap="magma", axis_labels=("c", "z", "y", "x"))
    bead = rf.psf.gaussian((5, 7, 7), VOXEL, sigma=(0.4, 0.2, 0.2))
    psf_layer = viewer.add_image(bead, name="bead", scale=VOXEL)
    w = dock(StackWidget(viewer))
    assert w.layers == [layer] and w.axes.value == "czyx"
    assert w.voxel_size == pytest.approx(VOXEL)
    w.method.value = "rl"
    ch0, ch1 = w.rows
    assert _shown(ch0.psf, w) and not _shown(ch0.model, w) and _shown(w.na, w)
    ch0.wavelength.value, ch0.iterations.value = 0.46, 3
    ch1.psf.value, ch1.iterations.value = psf_layer, 2
    assert _shown(ch0.wavelength, w) and not _shown(ch1.wavelength, w)
    w.na.value = 1.3
    w.device.value = "cpu"
    steps = []
    w.progress.changed.connect(steps.append)
    w.run()
    assert w.progress.max == 5  # 3 + 2 iterations
    _wait(qtbot, w)

    assert steps[:5] == [1, 2, 3, 4, 5]
    assert w.status.value == "done"
    out = viewer.layers["cells RL"]
    expected = rf.deconvolve_stack(img, "czyx", method="rl", psf=[None, bead],
                                   wavelength=[0.46, None], na=1.3, ni=1.515, voxel_size=VOXEL,
                                   num_iter=[3, 2], device="cpu", progress=False)
    np.testing.assert_array_equal(out.data, expected)
    psf0 = rf.psf.for_image(img.shape[1:], VOXEL, na=1.3, wavelength=0.46, ni=1.515)
    np.testing.assert_array_equal(out.data[0], rf.richardson_lucy(img[0], psf0, 3,
                                                                  progress=False))
    assert tuple(out.scale) == pytest.approx(SCALE4)
    assert tuple(out.translate) == pytest.approx((0.0, *TRANSLATE))
    assert out.colormap.name == "magma" and tuple(out.axis_labels) == ("c", "z", "y", "x")


def test_stack_widget_time_series_rln_selects_time(viewer, dock, qtbot):
    img = _stack((6, 8, 16, 16), seed=10)
    viewer.add_image(img, name="embryo", scale=SCALE4, axis_labels=("t", "z", "y", "x"))
    w = dock(StackWidget(viewer))
    assert w.axes.value == "tzyx" and len(w.rows) == 1
    w.time.value = "1:5:2"
    w.device.value = "cpu"
    statuses = []  # the status after each progress step (slots run in connection order)
    w._relay.step.connect(lambda _i: statuses.append(w.status.value))
    w.run()
    assert w.progress.max == 2  # one step per volume
    _wait(qtbot, w)
    # step 1: volume 1 ended, volume 2 runs; step 2: the last volume ended
    assert statuses == ["running Stack… volume 2 of 2", "running Stack… volume 2 of 2"]
    out = viewer.layers["embryo RLN"]
    assert out.data.shape == (2, 8, 16, 16)
    for j, t in enumerate((1, 3)):
        np.testing.assert_array_equal(out.data[j],
                                      rf.rln_deconvolve(img[t], device="cpu", progress=False))
    # time points 1 and 3 of a 2-unit step: the output's time axis stays aligned
    assert tuple(out.scale) == pytest.approx((4.0, *VOXEL))
    assert tuple(out.translate)[0] == pytest.approx(2.0)


def test_stack_widget_channel_layers_keep_colours(viewer, dock, qtbot, tmp_path):
    import torch

    model = rf.RLN()
    model.reset_parameters(generator=torch.Generator().manual_seed(7))
    path = tmp_path / "mine.pt"
    model.save(path)
    img = _stack((3, 8, 16, 16), seed=20)
    layers = viewer.add_image(img, channel_axis=0, name=["dapi", "gfp", "rfp"],
                              colormap=["blue", "green", "red"], scale=VOXEL)
    w = dock(StackWidget(viewer))
    w.image.value = layers
    assert w.axes.value == "zyx"
    assert [r.channel_name for r in w.rows] == ["dapi", "gfp", "rfp"]
    w.rows[1].use.value = False  # leave gfp out
    w.rows[2].model.value = "model file"
    assert _shown(w.rows[2].model_file, w) and not _shown(w.rows[0].model_file, w)
    w.rows[2].model_file.value = path
    w.normalize.value = "official"
    w.device.value = "cpu"
    w.run()
    assert w.progress.max == 2
    _wait(qtbot, w)
    names = [layer.name for layer in viewer.layers]
    assert names == ["dapi", "gfp", "rfp", "dapi RLN", "rfp RLN"]
    dapi, rfp = viewer.layers["dapi RLN"], viewer.layers["rfp RLN"]
    opts = {"normalize": "official", "device": "cpu", "progress": False}
    np.testing.assert_array_equal(dapi.data, rf.rln_deconvolve(img[0], **opts))
    np.testing.assert_array_equal(rfp.data, rf.rln_deconvolve(img[2], path, **opts))
    assert (dapi.colormap.name, rfp.colormap.name) == ("blue", "red")
    assert dapi.blending == layers[0].blending
    assert tuple(rfp.scale) == pytest.approx(VOXEL)


def test_stack_widget_unticked_channel_passes_through(viewer, dock, qtbot, notifications):
    img = (_stack((2, 8, 16, 16), seed=30)).astype(np.uint16)
    viewer.add_image(img, name="cells", scale=SCALE4, axis_labels=("c", "z", "y", "x"))
    w = dock(StackWidget(viewer))
    w.method.value = "rl"
    w.rows[0].use.value = False
    w.rows[1].iterations.value = 2
    w.device.value = "cpu"
    w.run()
    _wait(qtbot, w)
    assert _errors(notifications) == []
    out = viewer.layers["cells RL"].data
    np.testing.assert_array_equal(out[0], img[0].astype(np.float32))
    psf = rf.psf.for_image(img.shape[1:], VOXEL, na=1.4, wavelength=0.52, ni=1.515)
    np.testing.assert_array_equal(out[1], rf.richardson_lucy(img[1], psf, 2, progress=False))


def test_stack_widget_cancel_adds_nothing(viewer, dock, qtbot, notifications):
    viewer.add_image(_stack((2, 8, 16, 16), seed=40), name="cells", scale=SCALE4,
                     axis_labels=("c", "z", "y", "x"))
    w = dock(StackWidget(viewer))
    w.method.value = "rl"
    for row in w.rows:
        row.iterations.value = 10000
    w.device.value = "cpu"
    w.run()
    qtbot.waitUntil(lambda: w.progress.value >= 2, timeout=TIMEOUT_MS)
    w.cancel()
    _wait(qtbot, w)
    assert [layer.name for layer in viewer.layers] == ["cells"]
    assert w.status.value == "cancelled"
    assert w.progress.value == 0


@pytest.mark.parametrize("setup, match", [
    (lambda v, w: setattr(w.axes, "value", "tczyx"), "axes='tczyx' names 5 axes but the data "
                                                     "has 4"),
    (lambda v, w: setattr(w.time, "value", "0"), "time='0' given but axes='czyx' have no 't'"),
    (lambda v, w: [setattr(r.use, "value", False) for r in w.rows], "tick at least one channel"),
    (lambda v, w: setattr(w.image, "value", [v.layers[0], v.add_image(np.ones((4, 8, 8)))]),
     "the selected layers differ in shape"),
    (lambda v, w: (setattr(w.method, "value", "rl"), setattr(w.rows[1].psf, "value",
                                                             v.layers[0])),
     "PSF of channel 1: layer 'cells' is 4-D with shape (2, 8, 16, 16); choose a 3-D"),
])
def test_stack_widget_bad_settings_are_notifications(viewer, dock, notifications, setup, match):
    viewer.add_image(_stack((2, 8, 16, 16)), name="cells", axis_labels=("c", "z", "y", "x"))
    w = dock(StackWidget(viewer))
    setup(viewer, w)
    n = len(viewer.layers)
    w.run()
    assert not w.running
    errors = _errors(notifications)
    assert len(errors) == 1 and errors[0].startswith("Stack: ") and match in errors[0]
    assert len(viewer.layers) == n


def test_4d_layer_in_the_rl_widget_points_to_the_stack_widget(viewer, dock, notifications):
    viewer.add_image(np.ones((2, 4, 8, 8), np.float32), name="cells")
    w = dock(RichardsonLucyWidget(viewer))
    w.run()
    assert "use the Stack (channels, time) widget" in _errors(notifications)[0]


# --------------------------------------------------------------------------- PSF


def _gaussian_fwhm(na, wl, ni):
    axial = 0.88 * wl / (ni - np.sqrt(ni**2 - na**2))
    return (axial, 0.51 * wl / na, 0.51 * wl / na)


@pytest.mark.parametrize("model", ["born_wolf", "gibson_lanni", "gaussian", "confocal"])
def test_psf_widget_equals_api(viewer, dock, qtbot, model):
    viewer.add_image(np.zeros((4, 8, 8), np.float32), name="stack", scale=VOXEL)
    w = dock(PSFWidget(viewer))
    assert w.voxel_size == pytest.approx(VOXEL)
    w.psf_model.value = model
    w.nz.value, w.ny.value, w.nx.value = 7, 15, 13
    w.na.value, w.wavelength.value, w.ni.value = 1.2, 0.51, 1.33
    w.ns.value, w.particle_z.value = 1.45, 2.0
    w.ex_wavelength.value, w.pinhole.value = 0.47, 0.25
    assert _shown(w.pinhole, w) == (model == "confocal")
    assert _shown(w.particle_z, w) == (model == "gibson_lanni")
    w.run()
    _wait(qtbot, w)
    shape = (7, 15, 13)
    expected = {
        "born_wolf": lambda: rf.psf.born_wolf(shape, VOXEL, na=1.2, wavelength=0.51, ni=1.33),
        "gibson_lanni": lambda: rf.psf.gibson_lanni(shape, VOXEL, na=1.2, wavelength=0.51,
                                                    ni=1.33, ns=1.45, particle_z=2.0),
        "gaussian": lambda: rf.psf.gaussian(shape, VOXEL, fwhm=_gaussian_fwhm(1.2, 0.51, 1.33)),
        "confocal": lambda: rf.psf.confocal(shape, VOXEL, na=1.2, em_wavelength=0.51,
                                            ex_wavelength=0.47, ni=1.33, pinhole=0.25),
    }[model]()
    out = viewer.layers[f"PSF {model} NA 1.2 λ 0.51 µm"]
    np.testing.assert_array_equal(out.data, expected)
    assert tuple(out.scale) == pytest.approx(VOXEL)


def test_psf_widget_without_layer_uses_typed_voxel_size(viewer, dock, qtbot):
    w = dock(PSFWidget(viewer))
    assert w.image.value is None
    w.dz.value, w.dy.value, w.dx.value = 0.2, 0.1, 0.1
    w.nz.value, w.ny.value, w.nx.value = 5, 9, 9
    w.run()
    _wait(qtbot, w)
    (out,) = viewer.layers
    expected = rf.psf.born_wolf((5, 9, 9), (0.2, 0.1, 0.1), na=1.4, wavelength=0.52, ni=1.515)
    np.testing.assert_array_equal(out.data, expected)
    assert tuple(out.scale) == pytest.approx((0.2, 0.1, 0.1))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("widget", [RichardsonLucyWidget, RLNWidget])
def test_2d_layer_is_a_notification_not_a_crash(viewer, dock, notifications, widget):
    viewer.add_image(np.ones((32, 32), np.float32), name="flat")
    w = dock(widget(viewer))
    w.run()
    assert not w.running
    errors = _errors(notifications)
    assert len(errors) == 1 and "'flat' is 2-D" in errors[0] and "3-D (z, y, x)" in errors[0]
    assert len(viewer.layers) == 1


def test_no_layer_is_a_notification(viewer, dock, notifications):
    w = dock(RLNWidget(viewer))
    w.run()
    assert not w.running
    assert "choose an image layer" in _errors(notifications)[0]


def test_worker_error_is_a_notification(viewer, dock, qtbot, notifications):
    viewer.add_image(_volume(), name="cells", scale=VOXEL)
    # (A PSF larger than the image is fine since issue 13; an all-zero one is not.)
    empty = viewer.add_image(np.zeros((5, 9, 9), np.float32), name="empty psf", scale=VOXEL)
    w = dock(RichardsonLucyWidget(viewer))
    w.psf.value = empty
    w.device.value = "cpu"
    w.run()
    _wait(qtbot, w)
    errors = _errors(notifications)
    assert len(errors) == 1
    assert errors[0].startswith("Richardson–Lucy: ") and "psf must sum to > 0" in errors[0]
    assert len(viewer.layers) == 2 and w.run_button.enabled


def test_missing_model_file_is_a_notification(viewer, dock, notifications, tmp_path):
    viewer.add_image(_volume(), name="cells")
    w = dock(RLNWidget(viewer))
    w.model.value = "model file"
    w.model_file.value = tmp_path / "absent.pt"
    w.run()
    assert not w.running
    assert "absent.pt" in _errors(notifications)[0]


def test_layer_choices_follow_the_viewer(viewer, dock):
    w = dock(RichardsonLucyWidget(viewer))
    assert w.image.choices == ()
    a = viewer.add_image(_volume(), name="a", scale=(2.0, 1.0, 1.0))
    assert w.image.choices == (a,) and w.image.value is a
    assert w.voxel_size == (2.0, 1.0, 1.0)
    assert a in w.psf.choices
    viewer.layers.remove(a)
    assert w.image.choices == ()


# --------------------------------------------------------------------------- manifest, samples


def test_manifest_validates_and_imports():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()
    assert manifest.name == "rln-fast"
    widgets = {w.display_name for w in manifest.contributions.widgets}
    assert widgets == {"Richardson–Lucy", "RLN", "Stack (channels, time)", "PSF"}
    assert {s.key for s in manifest.contributions.sample_data} == {"phantom", "demo"}


def test_pyproject_registers_the_manifest():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '[project.entry-points."napari.manifest"]' in text
    assert 'rln-fast = "rln_fast:napari.yaml"' in text
    # npe2 resolves "module:file" in the module's folder without importing it.
    from importlib.util import find_spec

    (folder,) = find_spec("rln_fast").submodule_search_locations
    assert (Path(folder) / "napari.yaml").is_file()


def test_sample_phantom_opens_through_the_manifest(viewer):
    pm = npe2.PluginManager.instance()
    pm.discover()
    try:
        pm.get_manifest("rln-fast")
        installed = True
    except KeyError:  # an editable install made before the entry point existed
        installed = False
    if installed:
        viewer.open_sample("rln-fast", "phantom")
    else:
        from napari.layers import Layer
        from npe2.manifest.utils import import_python_name

        manifest = npe2.PluginManifest.from_file(MANIFEST)
        (sample,) = [s for s in manifest.contributions.sample_data if s.key == "phantom"]
        (cmd,) = [c for c in manifest.contributions.commands if c.id == sample.command]
        for data, meta, kind in import_python_name(cmd.python_name)():
            viewer.add_layer(Layer.create(data, meta, kind))
    names = [layer.name for layer in viewer.layers]
    assert names == ["phantom input", "phantom truth", "phantom PSF"]
    raw, gt, psf = (layer.data for layer in viewer.layers)
    assert raw.shape == gt.shape == (32, 64, 64) and psf.shape == (17, 33, 33)
    assert np.isfinite(raw).all() and raw.min() >= 0
    assert psf.sum() == pytest.approx(1.0, rel=1e-5)
    # the input is the blurred, noisy truth (×5 photon scale), not the truth itself
    assert raw.sum() == pytest.approx(5 * gt.sum(), rel=0.02)
    assert np.corrcoef(raw.ravel(), gt.ravel())[0, 1] < 0.99
    for layer in viewer.layers:
        assert tuple(layer.scale) == pytest.approx(demo.VOXEL_SIZE)
    assert not viewer.layers["phantom truth"].visible


def test_sample_demo_is_the_demo_volume():
    layers = _sample_data.demo_volume()
    (raw, meta, kind), (gt, _, _), (psf, _, _) = layers
    assert kind == "image" and meta["name"] == "demo input"
    assert raw.shape == gt.shape == demo.SHAPE and psf.shape == demo.PSF_SHAPE
    ref_psf = rf.psf.born_wolf(demo.PSF_SHAPE, demo.VOXEL_SIZE, **demo.PSF_ARGS)
    ref_gt, ref_raw = rf.synth.phantom_pair(ref_psf, demo.SHAPE, seed=demo.SEED)
    np.testing.assert_array_equal(raw, ref_raw)
    np.testing.assert_array_equal(gt, ref_gt)
