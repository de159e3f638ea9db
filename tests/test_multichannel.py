"""Multi-channel and time-lapse files (issue 12): every layout reads volume by volume, the
output keeps the layout and metadata, each (t, c) volume equals the single-volume result bit
for bit, and a killed run resumes (kill -9) and a 2-worker Dask cluster give the same file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from rln_fast import distributed, io
from rln_fast import psf as psf_models
from rln_fast.cli import main

zarr = pytest.importorskip("zarr")

ROOT = Path(__file__).resolve().parents[1]
VOXEL = (0.3, 0.13, 0.13)
T, C, Z, Y, X = 3, 2, 8, 16, 18
NAMES = ["DAPI", "GFP"]
RL = {"method": "rl", "tile": (8, 16, 18), "progress": False}


def _data() -> np.ndarray:
    """(t, c, z, y, x) uint16, each volume different."""
    rng = np.random.default_rng(0)
    return (rng.gamma(2.0, 40.0, (T, C, Z, Y, X)) + 5).astype(np.uint16)


def _psf(sigma: float, side: int) -> np.ndarray:
    return psf_models.gaussian((3, side, side), 1.0, sigma=(0.8, sigma, sigma))


def _write_input(path: Path, kind: str, data: np.ndarray, axes: str) -> None:
    """``data`` (t, c, z, y, x) stored with ``axes`` (a permutation of a subset: missing t or
    c take index 0) in the format ``kind``, with voxel size, channel names, time step."""
    sub = data if "c" in axes else data[:, 0]
    sub = sub if "t" in axes else sub[0]
    kept = "".join(a for a in "tczyx" if a in axes)
    arr = np.transpose(sub, [kept.index(a) for a in axes])
    if kind == "ome-tiff":
        meta = {"axes": axes.upper(), "PhysicalSizeZ": VOXEL[0], "PhysicalSizeY": VOXEL[1],
                "PhysicalSizeX": VOXEL[2], "TimeIncrement": 2.5, "TimeIncrementUnit": "min"}
        if "c" in axes:
            meta["Channel"] = {"Name": NAMES}
        tifffile.imwrite(path, arr, ome=True, metadata=meta)
    elif kind == "imagej":
        planes = int(np.prod(arr.shape[:-2]))
        meta = {"axes": axes.upper(), "spacing": VOXEL[0], "unit": "um", "finterval": 2.5,
                "tunit": "min"}
        if "c" in axes:
            meta["Labels"] = [NAMES[i % C] for i in range(planes)]
        tifffile.imwrite(path, arr, imagej=True, metadata=meta,
                         resolution=(1 / VOXEL[2], 1 / VOXEL[1]))
    elif kind.startswith("ngff"):
        version = kind[-3:]
        group = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
        group.create_array("0", data=arr)
        names = {"t": ("time", "minute"), "c": ("channel", None)}
        ax = [{"name": a, "type": names[a][0], **({"unit": names[a][1]} if names[a][1] else {})}
              if a in names else {"name": a, "type": "space", "unit": "micrometer"}
              for a in axes]
        scale = [{"t": 2.5, "c": 1.0, "z": VOXEL[0], "y": VOXEL[1], "x": VOXEL[2]}[a]
                 for a in axes]
        ms = {"axes": ax, "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": scale}]}]}
        omero = {"channels": [{"label": n, "color": "FF0000" if i else "0000FF",
                               "window": {"min": 0, "max": 500, "start": 1, "end": 400}}
                              for i, n in enumerate(NAMES)]}
        if version == "0.4":
            group.attrs.update({"multiscales": [{"version": "0.4", **ms}], "omero": omero})
        else:
            group.attrs.update({"ome": {"version": "0.5", "multiscales": [ms], "omero": omero}})
    else:  # a plain Zarr v3 array: only dimension_names
        zarr.create_array(str(path), data=arr, dimension_names=list(axes))


# ------------------------------------------------------------------------------ reading


LAYOUTS = [("ome-tiff", o) for o in ("tczyx", "tzcyx", "ctzyx", "ztcyx", "zctyx", "cztyx",
                                     "czyx", "tzyx")] + [
    ("imagej", "tzcyx"), ("imagej", "zcyx"), ("imagej", "tzyx"),
    ("ngff-0.4", "tczyx"), ("ngff-0.5", "tczyx"), ("ngff-0.5", "czyx"), ("ngff-0.4", "tzyx"),
    ("zarr", "czyx"), ("zarr", "tzcyx"), ("zarr", "ctxyz")]
_SUFFIX = {"ome-tiff": ".ome.tif", "imagej": ".tif", "ngff-0.4": ".ome.zarr",
           "ngff-0.5": ".ome.zarr", "zarr": ".zarr"}


@pytest.mark.parametrize(("kind", "axes"), LAYOUTS)
def test_every_layout_reads_volume_by_volume(tmp_path, kind, axes):
    data = _data()
    path = tmp_path / f"in{_SUFFIX[kind]}"
    _write_input(path, kind, data, axes)
    s = io.open_stack(path)
    assert s.axes == axes
    assert (s.n_time, s.n_channels) == (T if "t" in axes else 1, C if "c" in axes else 1)
    assert s.volume_shape == (Z, Y, X) and s.dtype == np.uint16
    for t in range(s.n_time):
        for c in range(s.n_channels):
            v = s.volume(t, c)
            np.testing.assert_array_equal(v[:, :, :], data[t, c])
            np.testing.assert_array_equal(v[2:5, 3:11, 1:7], data[t, c, 2:5, 3:11, 1:7])
            v.close()
    if kind == "zarr":  # a plain array says nothing but its axis names
        assert (s.voxel_size, s.channel_names, s.time_increment) == (None, None, None)
        return
    assert s.voxel_size == pytest.approx(VOXEL)
    assert s.channel_names == (NAMES if "c" in axes else None)
    if "t" in axes:
        assert (s.time_increment, s.time_unit) == (2.5, "minute")
    else:
        assert s.time_increment is None


def test_volumes_pickle_and_single_volume_api_still_refuses(tmp_path):
    import pickle

    data = _data()
    path = tmp_path / "h.tif"
    _write_input(path, "imagej", data, "tzcyx")
    v = pickle.loads(pickle.dumps(io.open_stack(path).volume(2, 1)))
    np.testing.assert_array_equal(v[:, :, :], data[2, 1])
    with pytest.raises(io.ImageIOError, match="single channel and time point.*open_stack"):
        io.read(path)
    with pytest.raises(IndexError, match="channel 2 is out of range"):
        io.open_stack(path).volume(0, 2)


def test_axes_that_are_not_t_c_z_y_x_are_refused(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((2, 3, 4, 8, 9), np.uint16))
    with pytest.raises(io.ImageIOError, match="does not say which axes are time, channel or z"):
        io.open_stack(tmp_path / "plain.tif")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    with pytest.raises(io.ImageIOError, match=r"S\(3\) that is not a time, channel or z/y/x"):
        io.open_stack(tmp_path / "rgb.tif")


# ------------------------------------------------------------------- round trips


def _single(tmp_path: Path, vol: np.ndarray, name: str, **kw) -> np.ndarray:
    """What the single-volume API gives for one volume (written as its own file)."""
    one = tmp_path / f"{name}_in.tif"
    io.write(one, vol, voxel_size=VOXEL)
    out = tmp_path / f"{name}_out.tif"
    distributed.deconvolve_file(one, out, **kw)
    return io.read(out)[0]


@pytest.mark.parametrize(("kind", "axes", "out_name", "out_axes"), [
    ("ome-tiff", "ctzyx", "o.ome.tif", "ctzyx"),
    ("imagej", "tzcyx", "o.ome.zarr", "tczyx"),
    ("ngff-0.5", "tczyx", "o.tif", "tzcyx"),
    ("ngff-0.4", "tczyx", "o.zarr", "tczyx"),
])
def test_rl_per_channel_equals_single_volume_and_keeps_metadata(tmp_path, kind, axes, out_name,
                                                                  out_axes):
    data = _data()
    path = tmp_path / f"in{_SUFFIX[kind]}"
    _write_input(path, kind, data, axes)
    k0, k1 = tmp_path / "k0.tif", tmp_path / "k1.tif"
    io.write(k0, _psf(1.0, 5), voxel_size=VOXEL)
    io.write(k1, _psf(1.6, 7), voxel_size=VOXEL)
    out = tmp_path / out_name
    ngff = "0.4" if out_name == "o.zarr" else "0.5"
    summary = distributed.deconvolve_file(path, out, psf=[k0, k1], num_iter=[2, 3], time="::2",
                                          rl_options={"background": [0.0, "auto"]}, ngff=ngff,
                                          **RL)
    assert summary["volumes"] == 4 and summary["axes"] == out_axes
    s = io.open_stack(out)
    assert s.axes == out_axes and s.dtype == np.float32
    assert (s.n_time, s.n_channels, s.volume_shape) == (2, C, (Z, Y, X))
    # Metadata, key by key.
    assert s.voxel_size == pytest.approx(VOXEL)
    assert s.channel_names == NAMES
    assert (s.time_increment, s.time_unit) == (5.0, "minute")  # every 2nd of 2.5 min
    rec = s.processing
    assert rec["time_points"] == [0, 2]
    assert [c["name"] for c in rec["channels"]] == NAMES
    assert [(c["method"], c["num_iter"], c["psf"], c["background"]) for c in rec["channels"]] == [
        ("rl", 2, str(k0), 0.0), ("rl", 3, str(k1), "auto")]
    if out_name.endswith("zarr"):
        models = pytest.importorskip(f"ome_zarr_models.v0{ngff[-1]}")
        assert models.Image.from_zarr(zarr.open_group(str(out), mode="r")) is not None
        if kind.startswith("ngff"):  # the input's omero channels (colour, window) are kept
            attrs = dict(zarr.open_group(str(out), mode="r").attrs)
            omero = attrs.get("ome", attrs)["omero"]
            assert [(ch["color"], ch["window"]["end"]) for ch in omero["channels"]] == [
                ("0000FF", 400), ("FF0000", 400)]
    # Data: each (t, c) volume bit for bit as the single-volume API.
    for t_out, t in enumerate([0, 2]):
        for c, (k, n, bg) in enumerate([(k0, 2, 0.0), (k1, 3, "auto")]):
            ref = _single(tmp_path, data[t, c], f"v{t}{c}", psf=k, num_iter=n,
                          rl_options={"background": bg}, **RL)
            np.testing.assert_array_equal(s.volume(t_out, c)[:, :, :], ref)


def test_rln_on_some_channels_copies_the_others(tmp_path, model_path):
    data = _data()
    path = tmp_path / "in.ome.tif"
    _write_input(path, "ome-tiff", data, "tczyx")
    out = tmp_path / "o.ome.zarr"
    distributed.deconvolve_file(path, out, model=model_path, channels="1", time="1",
                                tile=(8, 16, 18), progress=False)
    s = io.open_stack(out)
    assert (s.n_time, s.n_channels) == (1, C)
    assert s.time_increment == 2.5  # one time point: the input's step stays
    np.testing.assert_array_equal(s.volume(0, 0)[:, :, :], data[1, 0].astype(np.float32))
    ref = _single(tmp_path, data[1, 1], "rln", model=model_path, tile=(8, 16, 18), progress=False)
    np.testing.assert_array_equal(s.volume(0, 1)[:, :, :], ref)
    ch = s.processing["channels"]
    assert ch[0]["deconvolved"] is False and "unchanged" in ch[0]["note"]
    assert (ch[1]["method"], ch[1]["model"]) == ("rln", str(model_path))


def test_generated_psf_per_channel_from_wavelengths(tmp_path):
    data = _data()[:1]
    path = tmp_path / "in.ome.tif"
    _write_input(path, "ome-tiff", data, "czyx")
    out = tmp_path / "o.ome.tif"
    distributed.deconvolve_file(path, out, psf_model="born-wolf", na=1.0, wavelength=[0.46, 0.6],
                                psf_shape=(5, 9, 9), num_iter=2, **RL)
    s = io.open_stack(out)
    for c, wl in enumerate([0.46, 0.6]):
        k = psf_models.born_wolf((5, 9, 9), VOXEL, na=1.0, wavelength=wl)
        ref = _single(tmp_path, data[0, c], f"g{c}", psf=k, num_iter=2, **RL)
        np.testing.assert_array_equal(s.volume(0, c)[:, :, :], ref)
        assert f"emission {wl} µm" in s.processing["channels"][c]["psf"]


def test_bad_selections_and_settings_are_one_line(tmp_path):
    data = _data()
    path = tmp_path / "h.tif"
    _write_input(path, "imagej", data, "tzcyx")
    k = tmp_path / "k.tif"
    io.write(k, _psf(1.0, 5), voxel_size=VOXEL)
    out = tmp_path / "o.tif"
    cases = [
        ({"psf": k, "channels": "0,5"}, "channel selection '0,5': 5 is out of range"),
        ({"psf": k, "time": "7"}, "time point selection '7': 7 is out of range"),
        ({"psf": [k, k, k]}, "psf: 3 values given for 2 channels"),
        ({"psf": {1: k}}, "needs a PSF for channel 0"),
        ({"psf_model": "born-wolf", "na": 1.0}, "needs na= and wavelength="),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            distributed.deconvolve_file(path, out, **{**RL, **kw})
        assert sorted(p.name for p in tmp_path.iterdir()) == ["h.tif", "k.tif"]
    r = CliRunner().invoke(main, ["deconvolve", str(path), str(out), "--method", "rl", "--psf",
                                  f"{k},", "-q"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"rln-fast deconvolve: --psf '{k},': an empty entry; give one value, or one per channel "
        "separated by commas"]


# ------------------------------------------------------- kill -9, resume, Dask cluster

_KILLED = """
    import os, signal, sys
    from rln_fast import io
    from rln_fast.cli import main
    write, done = io.OutputStack.write_block, []
    def write_then_die(self, index, data):
        write(self, index, data)
        done.append(index)
        if len(done) == 5:
            os.kill(os.getpid(), signal.SIGKILL)
    io.OutputStack.write_block = write_then_die
    main(sys.argv[1:])
"""


def _command(inp: Path, out: Path, k0: Path, k1: Path) -> list[str]:
    return ["deconvolve", str(inp), str(out), "--method", "rl", "--psf", f"{k0},{k1}",
            "--num-iter", "2,3", "--tile", "4", "8", "18", "--time", "0:2", "-q"]


@pytest.fixture
def series(tmp_path):
    """A 2-channel time series (OME-TIFF, TCZYX) and one PSF per channel."""
    data = _data()
    inp = tmp_path / "series.ome.tif"
    _write_input(inp, "ome-tiff", data, "tczyx")
    k0, k1 = tmp_path / "k0.tif", tmp_path / "k1.tif"
    io.write(k0, _psf(1.0, 5), voxel_size=VOXEL)
    io.write(k1, _psf(1.6, 7), voxel_size=VOXEL)
    return inp, k0, k1


def _same_stacks(a: Path, b: Path) -> None:
    sa, sb = io.open_stack(a), io.open_stack(b)
    assert (sa.axes, sa.shape, sa.channel_names, sa.processing["channels"]) == (
        sb.axes, sb.shape, sb.channel_names, sb.processing["channels"])
    for t, c in sa.volumes():
        np.testing.assert_array_equal(sa.volume(t, c)[:, :, :], sb.volume(t, c)[:, :, :])


def test_command_killed_then_resumed_equals_an_unbroken_run(tmp_path, series, one_thread):
    # The child runs on one thread; so do the resumed run and the fresh one it is compared with.
    inp, k0, k1 = series
    out = tmp_path / "k.ome.zarr"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED),
                            *_command(inp, out, k0, k1)], env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == -9, child.stderr
    assert not out.exists()
    assert len(list((tmp_path / "k.ome.zarr.blocks").glob("*_*_*_*_*"))) == 5
    r = CliRunner().invoke(main, [*_command(inp, out, k0, k1)[:-1]])
    assert r.exit_code == 0, r.output
    assert "16 block(s) of (4, 8, 18) in 4 volumes, 5 kept from an interrupted run" in r.output
    fresh = tmp_path / "fresh.ome.zarr"
    assert CliRunner().invoke(main, _command(inp, fresh, k0, k1)).exit_code == 0
    _same_stacks(out, fresh)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("k.")) == [out.name]


def test_two_worker_cluster_equals_one_process(tmp_path, series, one_thread):
    # Two workers on 2 cores run one thread each; so does the single-process run.
    pytest.importorskip("distributed")
    inp, k0, k1 = series
    kw = {"psf": [k0, k1], "num_iter": [2, 3], "tile": (4, 8, 18), "time": "0:2",
          "progress": False, "method": "rl"}
    one, two = tmp_path / "one.tif", tmp_path / "two.tif"
    distributed.deconvolve_file(inp, one, **kw)
    summary = distributed.deconvolve_file(inp, two, scheduler="local", n_workers=2,
                                          device="cpu", **kw)
    assert summary["blocks"] == 16
    _same_stacks(one, two)
    assert json.loads(json.dumps(io.open_stack(two).processing))["time_points"] == [0, 1]


@pytest.mark.parametrize("name", ["i.tif", "i.ome.tif"])
def test_interrupted_tiff_stack_resumes_to_the_same_file(tmp_path, series, monkeypatch, name):
    inp, k0, k1 = series
    kw = {"psf": {0: k0, 1: k1}, "num_iter": 2, "tile": (4, 8, 18), "time": "1:",
          "progress": False, "method": "rl"}
    write, calls = io.OutputStack.write_block, []

    def dies_on_the_seventh(self, index, data):
        calls.append(index)
        if len(calls) == 7:
            raise KeyboardInterrupt
        write(self, index, data)

    monkeypatch.setattr(io.OutputStack, "write_block", dies_on_the_seventh)
    out = tmp_path / name
    with pytest.raises(KeyboardInterrupt) as info:
        distributed.deconvolve_file(inp, out, **kw)
    assert "6 of 16 finished blocks are kept" in info.value.__notes__[0]
    monkeypatch.setattr(io.OutputStack, "write_block", write)
    assert distributed.deconvolve_file(inp, out, **kw)["resumed_blocks"] == 6
    fresh = tmp_path / f"fresh_{name}"
    distributed.deconvolve_file(inp, fresh, **kw)
    _same_stacks(out, fresh)


def test_command_line_values_are_checked(tmp_path, series):
    inp, k0, _ = series
    for args, message in [
        (["--num-iter", "3,-1"], "--num-iter '3,-1': -1 is negative; give 0 or more"),
        (["--background", "0,dark"], "--background '0,dark': 'dark': give a number or 'auto'"),
        (["--channels", "0,x"], "channel selection '0,x': 'x' is not an integer"),
        (["--time", "0:2:0"], "time point selection '0:2:0': the step must not be 0"),
    ]:
        r = CliRunner().invoke(main, ["deconvolve", str(inp), str(tmp_path / "o.tif"), "--method",
                                      "rl", "--psf", str(k0), "-q", *args])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1, r.output
        assert lines[0].startswith(f"rln-fast deconvolve: {message}"), r.output
    assert not (tmp_path / "o.tif").exists()
