"""napari dock widgets: Richardson–Lucy, RLN, multi-channel / time-lapse stacks and PSF
generation, each run in a thread worker.

Every widget works on ``napari.layers.Image`` layers, so the layer's ``scale`` (last three
entries, (z, y, x) in µm) prefills the voxel size; the fields stay editable, and the result
layer gets those voxel sizes and the input's ``translate``. Arguments are read and checked in
the GUI thread; the computation runs in a napari thread worker; results, warnings and errors
come back to the GUI thread as signals and become a layer or a napari notification.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
)
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal

from rln_fast.stack import AXES, check_axes, parse_selection

if TYPE_CHECKING:
    import napari

__all__ = ["RichardsonLucyWidget", "RLNWidget", "StackWidget", "PSFWidget"]

_GENERATE = "generate"  # the RL widget's PSF choice that means "Born–Wolf from the optics fields"
_DEFAULT_MODEL = "default (shipped)"
_MODEL_FILE = "model file"
_PSF_MODELS = ("born_wolf", "gibson_lanni", "gaussian", "confocal")
_STACK_METHODS = [("RLN", "rln"), ("Richardson–Lucy", "rl")]
_FEW_CHANNELS = 8  # a 4-D layer without axis labels: a first side up to this is channels


def _devices() -> list[str]:
    import torch

    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _resolve_device(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _image_3d(layer: Image | None, who: str, *, stack_hint: bool = True) -> Any:
    """The layer's full-resolution data, checked to be a 3-D (z, y, x) intensity image."""
    if layer is None:
        raise ValueError(f"{who}: choose an image layer (open a 3-D stack first)")
    if getattr(layer, "rgb", False):
        raise ValueError(f"{who}: layer {layer.name!r} is RGB; choose a 3-D (z, y, x) "
                         "single-channel image (split the channels first)")
    data = layer.data[0] if layer.multiscale else layer.data
    if data.ndim != 3:
        hint = ("; for channels or time points use the Stack (channels, time) widget"
                if stack_hint and data.ndim in (4, 5) else "")
        raise ValueError(f"{who}: layer {layer.name!r} is {data.ndim}-D with shape "
                         f"{tuple(data.shape)}; choose a 3-D (z, y, x) image layer{hint}")
    return data


def _float_box(label: str, value: float, lo: float, hi: float, step: float, tip: str) -> FloatSpinBox:
    return FloatSpinBox(label=label, value=value, min=lo, max=hi, step=step, tooltip=tip)


class _Relay(QObject):
    """Carries per-iteration progress from the worker thread to the GUI thread (queued)."""

    step = Signal(int)


@dataclass
class _Job:
    """One run: ``compute(should_stop, report)`` in the worker, ``finish(result)`` in the GUI.

    total: progress steps (``report(i)`` for i = 1..total), or None for a busy bar.
    """

    title: str
    compute: Callable[[Callable[[], bool], Callable[[int], None]], Any]
    finish: Callable[[Any], None]
    total: int | None = None


class _Panel(Container):
    """An image-layer picker with its voxel size, Run/Cancel, a progress bar and a worker.

    Subclasses add their fields and implement ``_prepare() -> _Job`` (GUI thread; raise
    ValueError for bad settings).
    """

    title = ""

    def __init__(self, viewer: napari.viewer.Viewer, *, layer_label: str = "image",
                 layer_optional: bool = False) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._worker: Any = None
        self._relay = _Relay()
        self._relay.step.connect(self._on_step)
        self.image = self._make_picker(layer_label, layer_optional)
        tip = "voxel size in µm, prefilled from the layer's scale (last three entries)"
        self.dz = _float_box("dz (µm)", 1.0, 1e-4, 1e4, 0.001, tip)
        self.dy = _float_box("dy (µm)", 1.0, 1e-4, 1e4, 0.001, tip)
        self.dx = _float_box("dx (µm)", 1.0, 1e-4, 1e4, 0.001, tip)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(min=0, max=1, value=0, label="progress")
        self.status = Label(label="status", value="idle")
        self.image.changed.connect(self._fill_voxel_size)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        events = viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved):
            ev.connect(self._on_layers_changed)

    def _make_picker(self, label: str, optional: bool) -> Any:
        return ComboBox(label=label, choices=self._layer_choices, nullable=optional)

    def _add_controls(self, *fields: Any) -> None:
        """Lays out: layer picker, voxel size, ``fields``, Run/Cancel, progress, status."""
        buttons = Container(layout="horizontal", labels=False,
                            widgets=[self.run_button, self.cancel_button])
        self.extend([self.image, self.dz, self.dy, self.dx, *fields, buttons, self.progress,
                     self.status])
        layers = self._layer_choices()
        if self.image.value is None and layers:  # an optional picker starts empty: preselect
            self.image.value = layers[0][1]
        self._fill_voxel_size(self.image.value)

    # ------------------------------------------------------------------ layers

    def _layer_choices(self, _widget: Any = None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _on_layers_changed(self, _event: Any = None) -> None:
        self.reset_choices()

    def _fill_voxel_size(self, layer: Image | None) -> None:
        if layer is None or layer.ndim < 3:
            return
        self.dz.value, self.dy.value, self.dx.value = (float(s) for s in layer.scale[-3:])

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        """(dz, dy, dx) in µm, as shown in the fields."""
        return (float(self.dz.value), float(self.dy.value), float(self.dx.value))

    # ------------------------------------------------------------------ running

    @property
    def running(self) -> bool:
        """Whether a worker is running (until its ``finished`` signal reaches the GUI)."""
        return self._worker is not None

    def _prepare(self) -> _Job:
        raise NotImplementedError

    def run(self, _value: Any = None) -> None:
        """Reads the fields, then starts the computation in a thread worker."""
        if self.running:
            return
        try:
            job = self._prepare()
        except (ValueError, TypeError, FileNotFoundError) as e:
            show_error(str(e))
            return

        def work() -> Any:
            return job.compute(lambda: worker.abort_requested, self._relay.step.emit)

        # Errors are not re-raised in the GUI thread: they become a notification (_on_error).
        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda result: self._on_returned(worker, job, result))
        worker.errored.connect(lambda exc: show_error(f"{job.title}: {exc}"))
        worker.warned.connect(lambda w: show_warning(f"{job.title}: {w[0]}"))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        # max 0 is Qt's busy indicator: for work that has no steps to count.
        self.progress.max = job.total or 0
        self.progress.value = 0
        self.status.value = f"running {job.title}…"
        worker.start()

    def cancel(self, _value: Any = None) -> None:
        """Asks the worker to stop; whatever it returns afterwards is discarded."""
        if self._worker is None:
            return
        self._worker.quit()
        self.cancel_button.enabled = False
        self.status.value = "cancelling…"

    def _on_step(self, i: int) -> None:
        if self.progress.max:
            self.progress.value = min(i, self.progress.max)

    def _on_returned(self, worker: Any, job: _Job, result: Any) -> None:
        # A result queued just before Cancel was pressed arrives after it: drop it too.
        if worker.abort_requested:
            return
        job.finish(result)

    def _on_finished(self) -> None:
        cancelled = self._worker is not None and self._worker.abort_requested
        self._worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        self.progress.max = 1
        self.progress.value = 0 if cancelled else 1
        self.status.value = "cancelled" if cancelled else "done"
        if cancelled:
            show_info(f"{self.title}: cancelled, no layer added")

    def _add_result(self, data: np.ndarray, source: Image | None, name: str, **kwargs: Any) -> None:
        if source is not None:
            kwargs.setdefault("translate", tuple(source.translate))
        self._viewer.add_image(data, name=name, scale=self.voxel_size, **kwargs)


class RichardsonLucyWidget(_Panel):
    """Richardson–Lucy deconvolution of a 3-D image layer (``rln_fast.richardson_lucy``).

    PSF: an image layer (used as it is when its scale equals the image's voxel size, else
    resampled onto the image grid by ``rln_fast.psf.prepare`` without background subtraction),
    or a widefield Born–Wolf PSF generated from NA, emission wavelength and immersion index
    as every run generates one (``rln_fast.psf.for_image``). Cancel stops after the current
    iteration; nothing is added.
    """

    title = "Richardson–Lucy"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(viewer)
        self.psf = ComboBox(label="PSF", choices=self._psf_choices,
                            tooltip="a PSF image layer, or generate a widefield Born–Wolf PSF")
        self.na = _float_box("NA", 1.4, 0.05, 1.7, 0.01, "numerical aperture")
        self.wavelength = _float_box("λ em (µm)", 0.52, 0.2, 2.0, 0.001,
                                     "emission wavelength in µm")
        self.ni = _float_box("n immersion", 1.515, 1.0, 2.0, 0.001,
                             "refractive index of the immersion medium")
        self.iterations = SpinBox(label="iterations", value=20, min=1, max=10000)
        self.acceleration = ComboBox(label="acceleration", choices=["shb", "biggs", "none"],
                                     value="shb")
        self.edges = ComboBox(label="edges", choices=["bertero", "periodic", "reflect"],
                              value="bertero")
        self.device = ComboBox(label="device", choices=_devices(), value="auto")
        self.psf.changed.connect(self._show_optics)
        self._add_controls(self.psf, self.na, self.wavelength, self.ni, self.iterations,
                           self.acceleration, self.edges, self.device)
        self._show_optics(self.psf.value)

    def _psf_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [("generate (Born–Wolf)", _GENERATE), *self._layer_choices()]

    def _show_optics(self, value: Any) -> None:
        for w in (self.na, self.wavelength, self.ni):
            w.visible = value == _GENERATE

    def _prepare(self) -> _Job:
        from rln_fast import psf as psf_models
        from rln_fast import richardson_lucy

        layer = self.image.value
        data = _image_3d(layer, self.title)
        voxel = self.voxel_size
        psf_choice = self.psf.value
        if psf_choice == _GENERATE:
            shape = tuple(data.shape)
            optics = {"na": float(self.na.value), "wavelength": float(self.wavelength.value),
                      "ni": float(self.ni.value)}

            def make_psf() -> np.ndarray:
                return psf_models.for_image(shape, voxel, **optics)
        else:
            psf_data = np.asarray(_image_3d(psf_choice, f"{self.title} PSF", stack_hint=False))
            psf_voxel = tuple(float(s) for s in psf_choice.scale[-3:])

            def make_psf() -> np.ndarray:
                if np.allclose(psf_voxel, voxel, rtol=1e-6, atol=0):
                    return psf_data
                return psf_models.prepare(psf_data, psf_voxel, voxel, background=None,
                                          image_shape=tuple(data.shape))

        num_iter = int(self.iterations.value)
        options = {"acceleration": self.acceleration.value,
                   "edges": self.edges.value, "device": _resolve_device(self.device.value)}

        def compute(should_stop: Callable[[], bool], report: Callable[[int], None]) -> np.ndarray:
            def callback(i: int, _estimate: Any) -> bool:
                report(i)
                return should_stop()

            return richardson_lucy(np.asarray(data), make_psf(), num_iter, callback=callback,
                                   progress=False, **options)

        name = f"{layer.name} RL {num_iter} it"
        return _Job(self.title, compute, lambda y: self._add_result(y, layer, name), num_iter)


class RLNWidget(_Panel):
    """RLN deconvolution of a 3-D image layer (``rln_fast.rln_deconvolve``).

    Model: the shipped default (trained for widefield data near (0.3, 0.13, 0.13) µm; see
    rln_fast/weights/README.md) or a file written by ``RLN.save`` (e.g. by ``rln-fast train``).
    The network runs in one step, so the bar is a busy indicator; Cancel discards the result
    when it arrives.
    """

    title = "RLN"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(viewer)
        self.model = ComboBox(label="model", choices=[_DEFAULT_MODEL, _MODEL_FILE],
                              value=_DEFAULT_MODEL)
        self.model_file = FileEdit(label="model file", mode="r", filter="*.pt",
                                   tooltip="an RLN saved with RLN.save (.pt)")
        self.normalize = ComboBox(label="normalize", choices=["global", "official"],
                                  value="global",
                                  tooltip="global: output in input units; official: the "
                                          "official script's per-volume normalisation")
        self.ensemble = ComboBox(label="flip ensemble", choices=[1, 2, 4, 8], value=1,
                                 tooltip="also run on the volume flipped along x, y, z and "
                                         "average: less texture, that many times the time")
        self.device = ComboBox(label="device", choices=_devices(), value="auto")
        self.model.changed.connect(self._show_file)
        self._add_controls(self.model, self.model_file, self.normalize, self.ensemble, self.device)
        self._show_file(self.model.value)

    def _show_file(self, value: str) -> None:
        self.model_file.visible = value == _MODEL_FILE

    def _prepare(self) -> _Job:
        from rln_fast import rln_deconvolve

        layer = self.image.value
        data = _image_3d(layer, self.title)
        model: Path | None = None
        if self.model.value == _MODEL_FILE:
            model = Path(self.model_file.value)
            if not model.is_file():
                raise FileNotFoundError(f"{self.title}: model file {str(model)!r} does not "
                                        "exist; choose a .pt file written by RLN.save")
        options = {"normalize": self.normalize.value, "ensemble": int(self.ensemble.value),
                   "device": _resolve_device(self.device.value)}

        def compute(should_stop: Callable[[], bool], report: Callable[[int], None]) -> np.ndarray:
            return rln_deconvolve(np.asarray(data), model, progress=False, **options)

        name = f"{layer.name} RLN" + ("" if model is None else f" ({model.stem})")
        return _Job(self.title, compute, lambda y: self._add_result(y, layer, name))


def layer_axes(layer: Image, viewer: Any = None, *, one_channel: bool = False) -> tuple[str, bool]:
    """(axes, from_labels): the layer's axes as t/c/z/y/x letters.

    From the layer's axis labels (napari's viewer axis labels, its last ``layer.ndim``, where
    layers have none), when they are such letters; else a default: "zyx" for 3-D, "tczyx" for 5-D, and for 4-D "czyx" when
    the first side is at most 8 (a few channels), else "tzyx" (a time series).
    ``one_channel``: the layer is one channel of several (opened with ``channel_axis``), so a
    4-D layer is "tzyx".
    """
    ndim = layer.ndim
    # napari >= 0.6 gives each layer its own labels (the viewer's come from the layers', so
    # another layer's could show there); older napari has the viewer's only.
    candidates = [getattr(layer, "axis_labels", None)]
    if viewer is not None and candidates[0] is None:
        labels = tuple(viewer.dims.axis_labels)
        candidates.append(labels[-ndim:] if len(labels) >= ndim else None)
    for labels in candidates:
        if labels is None or not all(isinstance(a, str) and len(a) == 1 for a in labels):
            continue
        try:
            axes = check_axes("".join(labels), ndim)
        except ValueError:
            continue
        if not (one_channel and "c" in axes):
            return axes, True
    if ndim == 4:
        first = layer.data[0].shape[0] if layer.multiscale else layer.data.shape[0]
        return ("czyx" if first <= _FEW_CHANNELS and not one_channel else "tzyx"), False
    return {3: "zyx", 5: "tczyx"}.get(ndim, AXES[-ndim:] if ndim <= 5 else ""), False


class _Cancelled(Exception):
    """Raised between volumes when Cancel was pressed."""


class _ChannelRow(Container):
    """One channel of the stack widget: deconvolve it or not, its PSF / λ / iterations (RL),
    its model (RLN)."""

    def __init__(self, index: int, name: str, psf_choices: Callable[..., list]) -> None:
        use = CheckBox(text=f"{index}: {name}", value=True,
                       tooltip="deconvolve this channel (unticked: passed through)")
        psf = ComboBox(choices=psf_choices,
                       tooltip="this channel's PSF: a PSF image layer, or Born–Wolf from its λ")
        wavelength = _float_box("λ", 0.52, 0.2, 2.0, 0.001,
                                "this channel's emission wavelength in µm")
        iterations = SpinBox(value=20, min=1, max=10000, tooltip="RL iterations")
        model = ComboBox(choices=[_DEFAULT_MODEL, _MODEL_FILE], value=_DEFAULT_MODEL,
                         tooltip="this channel's RLN model")
        model_file = FileEdit(mode="r", filter="*.pt", tooltip="an RLN saved with RLN.save (.pt)")
        super().__init__(layout="horizontal", labels=False,
                         widgets=[use, psf, wavelength, iterations, model, model_file])
        self.channel_name = name
        self.use, self.psf, self.wavelength, self.iterations = use, psf, wavelength, iterations
        self.model, self.model_file = model, model_file
        self._method = "rln"
        psf.changed.connect(lambda _v: self.show(self._method))
        model.changed.connect(lambda _v: self.show(self._method))

    def show(self, method: str) -> None:
        self._method = method
        rl = method == "rl"
        self.psf.visible = self.iterations.visible = rl
        self.wavelength.visible = rl and self.psf.value == _GENERATE
        self.model.visible = not rl
        self.model_file.visible = not rl and self.model.value == _MODEL_FILE


class StackWidget(_Panel):
    """Multi-channel and time-lapse layers through ``rln_fast.deconvolve_stack``.

    Input: one image layer with channel and/or time axes (4-D, 5-D), or several layers of the
    same shape that are the channels of one stack (as napari opens a file with
    ``channel_axis``: one layer per channel). The axes (t, c, z, y, x letters) come from the
    layer's or the viewer's axis labels when they are such letters, else from a default the
    ``axes`` field shows and lets you change. Each channel has a row: untick it to pass it
    through (or, for one layer per channel, to leave that layer out); Richardson–Lucy takes a
    PSF layer or a Born–Wolf PSF from the channel's emission λ and the shared NA and immersion
    index, and the channel's iterations; RLN the shipped model or a file. ``time`` picks
    time points ("0:50", "0,3"; empty: all). The result keeps each input layer's scale (the
    z, y, x entries from the voxel-size fields), translate, colormap and blending. The
    progress bar moves once per RL iteration, or once per volume for RLN; Cancel stops
    after the current iteration or volume and adds nothing.
    """

    title = "Stack"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(viewer, layer_label="layers")
        self.axes = LineEdit(label="axes", value="",
                             tooltip="the layer's axes: t (time), c (channel), z, y, x, e.g. "
                                     "tczyx; from its axis labels when they are such letters")
        self.method = ComboBox(label="method", choices=_STACK_METHODS, value="rln")
        self.time = LineEdit(label="time", value="",
                             tooltip="time points to deconvolve, e.g. 0:50 or 0,3 (empty: all)")
        self.na = _float_box("NA", 1.4, 0.05, 1.7, 0.01, "numerical aperture (generated PSFs)")
        self.ni = _float_box("n immersion", 1.515, 1.0, 2.0, 0.001,
                             "refractive index of the immersion medium (generated PSFs)")
        self.acceleration = ComboBox(label="acceleration", choices=["shb", "biggs", "none"],
                                     value="shb")
        self.edges = ComboBox(label="edges", choices=["bertero", "periodic", "reflect"],
                              value="bertero")
        self.normalize = ComboBox(label="normalize", choices=["global", "official"],
                                  value="global")
        self.device = ComboBox(label="device", choices=_devices(), value="auto")
        self._header = Label(value="")
        self._rows = Container(labels=False)
        self.channels = Container(label="channels", labels=False,
                                  widgets=[self._header, self._rows])
        self.axes.changed.connect(self._rebuild_rows)
        self.method.changed.connect(self._show_method)
        self._add_controls(self.axes, self.method, self.time, self.channels, self.na, self.ni,
                           self.acceleration, self.edges, self.normalize, self.device)
        layers = self._layer_choices()
        if not self.image.value and layers:
            self.image.value = [layers[0][1]]
        self._show_method(self.method.value)

    # ------------------------------------------------------------------ fields

    def _make_picker(self, label: str, optional: bool) -> Any:
        return Select(label=label, choices=self._layer_choices, allow_multiple=True,
                      tooltip="one layer with channel / time axes, or one layer per channel "
                              "(select them all, in channel order)")

    @property
    def layers(self) -> list[Image]:
        """The selected layers, in the viewer's order."""
        chosen = list(self.image.value or ())
        return [layer for layer in self._viewer.layers if layer in chosen]

    @property
    def rows(self) -> list[_ChannelRow]:
        return list(self._rows)

    def _fill_voxel_size(self, value: Any) -> None:
        layers = self.layers if value is not None else []
        if layers:
            super()._fill_voxel_size(layers[0])
            axes, _ = layer_axes(layers[0], self._viewer, one_channel=len(layers) > 1)
            if axes != self.axes.value:
                self.axes.value = axes  # rebuilds the rows
                return
        self._rebuild_rows()

    def _psf_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [("generate (Born–Wolf)", _GENERATE), *self._layer_choices()]

    def _channel_names(self) -> list[str]:
        layers = self.layers
        if len(layers) > 1:
            return [layer.name for layer in layers]
        axes = self.axes.value.strip().lower()
        if not layers or "c" not in axes or len(axes) != layers[0].ndim:
            return ["all" if layers else "-"]
        return [f"{layers[0].name} c{i}" for i in range(layers[0].data.shape[axes.index("c")])]

    def _rebuild_rows(self, _value: Any = None) -> None:
        names = self._channel_names()
        if [r.channel_name for r in self.rows] == names:
            return
        self._rows.clear()
        for i, name in enumerate(names):
            row = _ChannelRow(i, name, self._psf_choices)
            row.show(self.method.value)
            self._rows.append(row)

    def _show_method(self, method: str) -> None:
        rl = method == "rl"
        for w in (self.na, self.ni, self.acceleration, self.edges):
            w.visible = rl
        self.normalize.visible = not rl
        self._header.value = ("deconvolve · PSF · λ em (µm) · iterations" if rl
                              else "deconvolve · model")
        for row in self.rows:
            row.show(method)

    # ------------------------------------------------------------------ running

    def _checked_axes(self, layers: list[Image]) -> str:
        text = self.axes.value.strip()
        try:
            axes = check_axes(text, layers[0].ndim)
        except ValueError as e:
            raise ValueError(f"{self.title}: layer {layers[0].name!r} (shape "
                             f"{tuple(layers[0].data.shape)}): {e}") from None
        if len(layers) > 1:
            if "c" in axes:
                raise ValueError(f"{self.title}: with one layer per channel, axes={axes!r} must "
                                 "not have 'c' (each layer is one channel)")
            shapes = {tuple(layer.data.shape) for layer in layers}
            if len(shapes) > 1:
                raise ValueError(f"{self.title}: the selected layers differ in shape "
                                 f"({', '.join(map(str, sorted(shapes)))}); select one layer, "
                                 "or the channel layers of one stack")
        return axes

    def _prepare(self) -> _Job:
        from rln_fast import psf as psf_models
        from rln_fast.stack import deconvolve_stack

        layers = self.layers
        if not layers:
            raise ValueError(f"{self.title}: choose an image layer (a stack with channels or "
                             "time points, or one layer per channel)")
        for layer in layers:
            if getattr(layer, "rgb", False):
                raise ValueError(f"{self.title}: layer {layer.name!r} is RGB; choose "
                                 "intensity layers")
        axes = self._checked_axes(layers)
        datas = [layer.data[0] if layer.multiscale else layer.data for layer in layers]
        shape = tuple(datas[0].shape)
        nt = shape[axes.index("t")] if "t" in axes else 1
        time = self.time.value.strip() or None
        if time is not None and "t" not in axes:
            raise ValueError(f"{self.title}: time={time!r} given but axes={axes!r} have no "
                             "'t' axis")
        try:
            times = parse_selection(time, nt, "time point")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.title}: {e}") from None
        self._rebuild_rows()  # a no-op unless the layer's channels changed since
        rows = self.rows
        chosen = [i for i, row in enumerate(rows) if row.use.value]
        if not chosen:
            raise ValueError(f"{self.title}: tick at least one channel")
        method = self.method.value
        voxel = self.voxel_size
        vshape = tuple(shape[axes.index(a)] for a in "zyx")
        options: dict[str, Any] = {"device": _resolve_device(self.device.value)}
        settings: list[dict[str, Any]] = []  # per channel: deconvolve_stack's keywords
        if method == "rl":
            acceleration = self.acceleration.value
            options.update(acceleration=None if acceleration == "none" else acceleration,
                           edges=self.edges.value)
            na, ni = float(self.na.value), float(self.ni.value)
            for i, row in enumerate(rows):
                kw: dict[str, Any] = {"num_iter": int(row.iterations.value)}
                if row.psf.value == _GENERATE:
                    kw.update(wavelength=float(row.wavelength.value), na=na, ni=ni)
                else:
                    kw["psf_layer"] = row.psf.value
                    if i in chosen:  # checked here; read (and resampled) in the worker
                        _image_3d(row.psf.value, f"{self.title}: PSF of channel {i}",
                                  stack_hint=False)
                settings.append(kw if i in chosen else {})
        else:
            options["normalize"] = self.normalize.value
            for i, row in enumerate(rows):
                model = None
                if row.model.value == _MODEL_FILE and i in chosen:
                    model = Path(row.model_file.value)
                    if not model.is_file():
                        raise FileNotFoundError(f"{self.title}: channel {i}: model file "
                                                f"{str(model)!r} does not exist; choose a .pt "
                                                "file written by RLN.save")
                settings.append({"model": model})
        # Progress steps per volume, in the order the volumes run (RL: iterations; RLN: 1).
        if len(layers) == 1:
            steps = [settings[c].get("num_iter", 1) for _ in times for c in chosen]
        else:
            steps = [settings[c].get("num_iter", 1) for c in chosen for _ in times]

        def layer_psf(kw: dict[str, Any]) -> dict[str, Any]:
            """The keywords with a PSF layer replaced by its data (resampled when its scale
            differs from the voxel size, as the Richardson–Lucy widget does)."""
            kw = dict(kw)
            layer = kw.pop("psf_layer", None)
            if layer is not None:
                data = np.asarray(layer.data[0] if layer.multiscale else layer.data)
                psf_voxel = tuple(float(s) for s in layer.scale[-3:])
                if not np.allclose(psf_voxel, voxel, rtol=1e-6, atol=0):
                    data = psf_models.prepare(data, psf_voxel, voxel, background=None,
                                              image_shape=vshape)
                kw["psf"] = data
            return kw

        def per_channel(kws: list[dict[str, Any]]) -> dict[str, Any]:
            keys = {k for kw in kws for k in kw} - {"na", "ni"}
            out = {k: [kw.get(k) for kw in kws] for k in keys}
            out.update({k: kw[k] for kw in kws for k in ("na", "ni") if k in kw})
            return out

        # one deconvolve_stack call per input layer: (layer, data, axes, keywords, channels)
        calls: list[tuple[Image, Any, str, dict[str, Any], Any]] = []
        if len(layers) == 1:
            calls.append((layers[0], datas[0], axes, settings, chosen if "c" in axes else None))
        else:
            calls += [(layers[c], datas[c], axes, [settings[c]], None) for c in chosen]

        def compute(should_stop: Callable[[], bool], report: Callable[[int], None]) -> Any:
            done = [0]  # progress steps of the finished volumes
            volumes = [0]

            def callback(i: int, _estimate: Any) -> bool:
                report(done[0] + i)
                return should_stop()

            def volume_callback(_done: int, _total: int) -> None:
                done[0] += steps[volumes[0]]
                volumes[0] += 1
                report(done[0])
                if should_stop():
                    raise _Cancelled

            results = []
            try:
                for layer, data, call_axes, kws, channels in calls:
                    kw = per_channel([layer_psf(k) for k in kws])
                    if len(kws) == 1:
                        kw = {k: v[0] if isinstance(v, list) else v for k, v in kw.items()}
                    extra = {"callback": callback} if method == "rl" else {}
                    out = deconvolve_stack(data, call_axes, method=method, channels=channels,
                                           time=time, voxel_size=voxel, progress=False,
                                           volume_callback=volume_callback, **kw, **extra,
                                           **options)
                    results.append((layer, out))
            except _Cancelled:
                return None
            return results

        def finish(results: Any) -> None:
            if results is None:
                return
            label = "RL" if method == "rl" else "RLN"
            for layer, out in results:
                self._add_stack_result(out, layer, axes, times, f"{layer.name} {label}")

        self._volume_ends = list(np.cumsum(steps))
        return _Job(self.title, compute, finish, sum(steps))

    def _on_step(self, i: int) -> None:
        super()._on_step(i)
        ends = getattr(self, "_volume_ends", [])
        if ends and self.running:
            k = min(int(np.searchsorted(ends, i, side="right")) + 1, len(ends))
            self.status.value = f"running {self.title}… volume {k} of {len(ends)}"

    def _add_stack_result(self, data: Any, source: Image, axes: str, times: list[int],
                          name: str) -> None:
        """A layer for ``data`` with the source's scale (z, y, x from the fields), translate,
        colormap and blending; a regular time selection keeps the time axis aligned."""
        scale = [float(s) for s in source.scale]
        translate = [float(s) for s in source.translate]
        scale[-3:] = self.voxel_size
        if "t" in axes:
            t = axes.index("t")
            step = times[1] - times[0] if len(times) > 1 else 1
            if times == list(range(times[0], times[-1] + 1, step)):
                translate[t] += times[0] * scale[t]
                scale[t] *= step
        kwargs: dict[str, Any] = {"name": name, "scale": scale, "translate": translate,
                                  "colormap": source.colormap, "blending": source.blending}
        if hasattr(source, "axis_labels"):
            kwargs["axis_labels"] = source.axis_labels
        self._viewer.add_image(data, **kwargs)


class PSFWidget(_Panel):
    """A model PSF as a new layer, sampled at the voxel size of a chosen layer (or typed in).

    Models (``rln_fast.psf``): born_wolf and gibson_lanni (widefield), confocal
    (excitation × emission, pinhole in µm in the sample; 0 = infinitely small) and gaussian
    (lateral FWHM 0.51·λ/NA and axial FWHM 0.88·λ/(ni − √(ni² − NA²)), the Born–Wolf widths).
    """

    title = "PSF"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(viewer, layer_label="voxel size from", layer_optional=True)
        self.psf_model = ComboBox(label="model", choices=list(_PSF_MODELS), value="born_wolf")
        self.nz = SpinBox(label="nz", value=33, min=1, max=1025)
        self.ny = SpinBox(label="ny", value=65, min=1, max=4097)
        self.nx = SpinBox(label="nx", value=65, min=1, max=4097)
        self.na = _float_box("NA", 1.4, 0.05, 1.7, 0.01, "numerical aperture")
        self.wavelength = _float_box("λ em (µm)", 0.52, 0.2, 2.0, 0.001,
                                     "emission wavelength in µm")
        self.ex_wavelength = _float_box("λ ex (µm)", 0.488, 0.2, 2.0, 0.001,
                                        "excitation wavelength in µm (confocal)")
        self.pinhole = _float_box("pinhole (µm)", 0.0, 0.0, 100.0, 0.01,
                                  "pinhole diameter projected into the sample, µm; 0 = point")
        self.ni = _float_box("n immersion", 1.515, 1.0, 2.0, 0.001, "immersion refractive index")
        self.ns = _float_box("n sample", 1.33, 1.0, 2.0, 0.001, "sample refractive index")
        self.particle_z = _float_box("depth (µm)", 0.0, 0.0, 1000.0, 0.1,
                                     "source depth below the coverslip, µm")
        self.psf_model.changed.connect(self._show_fields)
        self._add_controls(self.psf_model, self.nz, self.ny, self.nx, self.na, self.wavelength,
                           self.ex_wavelength, self.pinhole, self.ni, self.ns, self.particle_z)
        self._show_fields(self.psf_model.value)

    def _show_fields(self, model: str) -> None:
        self.ex_wavelength.visible = self.pinhole.visible = model == "confocal"
        self.ns.visible = self.particle_z.visible = model == "gibson_lanni"

    def psf_arguments(self) -> tuple[str, tuple[int, int, int], dict[str, Any]]:
        """(function name in rln_fast.psf, shape, keyword arguments) from the fields."""
        model = self.psf_model.value
        shape = (int(self.nz.value), int(self.ny.value), int(self.nx.value))
        na, wl, ni = float(self.na.value), float(self.wavelength.value), float(self.ni.value)
        kw: dict[str, Any] = {"voxel_size": self.voxel_size}
        if model == "born_wolf":
            kw.update(na=na, wavelength=wl, ni=ni)
        elif model == "gibson_lanni":
            kw.update(na=na, wavelength=wl, ni=ni, ns=float(self.ns.value),
                      particle_z=float(self.particle_z.value))
        elif model == "confocal":
            pinhole = float(self.pinhole.value)
            kw.update(na=na, em_wavelength=wl, ex_wavelength=float(self.ex_wavelength.value),
                      ni=ni, pinhole=pinhole or None)
        else:
            if not na < ni:
                raise ValueError(f"{self.title}: NA {na:g} must be smaller than the immersion "
                                 f"index {ni:g}")
            lateral = 0.51 * wl / na
            axial = 0.88 * wl / (ni - np.sqrt(ni * ni - na * na))
            kw.update(fwhm=(axial, lateral, lateral))
        return model, shape, kw

    def _prepare(self) -> _Job:
        from rln_fast import psf as psf_models

        model, shape, kw = self.psf_arguments()
        fn = getattr(psf_models, model)

        def compute(should_stop: Callable[[], bool], report: Callable[[int], None]) -> np.ndarray:
            return fn(shape, **kw)

        name = f"PSF {model} NA {self.na.value:g} λ {self.wavelength.value:g} µm"
        return _Job(self.title, compute,
                    lambda p: self._add_result(p, None, name, colormap="inferno"))
