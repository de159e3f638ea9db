"""rln_fast.io: TIFF / OME-Zarr round trips, metadata against the NGFF specs, errors, atomic and
resumable block-wise output (several processes)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from rln_fast import io

zarr = pytest.importorskip("zarr")

VOXEL = (0.3, 0.104, 0.0975)
# name, write() ngff, format read back
FORMATS = [
    ("v.tif", "0.5", "imagej-tiff"),
    ("v.ome.tif", "0.5", "ome-tiff"),
    ("v.ome.zarr", "0.5", "ome-zarr-0.5"),
    ("v.zarr", "0.4", "ome-zarr-0.4"),
]
OUTPUT_FORMATS = [("o.ome.zarr", "0.5"), ("o.zarr", "0.4"), ("o.tif", "0.5"),
                  ("o.ome.tif", "0.5")]


def _volume(dtype: str, shape=(5, 17, 19), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 60000, shape).astype(dtype)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
@pytest.mark.parametrize("name,ngff,fmt", FORMATS)
def test_round_trip(tmp_path, name, ngff, fmt, dtype):
    a = _volume(dtype)
    path = tmp_path / name
    io.write(path, a, VOXEL, ngff=ngff, chunks=(2, 8, 8))
    b, meta = io.read(path)
    assert b.dtype == np.dtype(dtype) and meta["dtype"] == np.dtype(dtype)
    np.testing.assert_array_equal(b, a)
    assert meta["format"] == fmt
    assert meta["shape"] == a.shape
    assert meta["voxel_size"] == pytest.approx(VOXEL, rel=1e-6)
    assert _listing(tmp_path) == [name]  # no temporaries left


@pytest.mark.parametrize("name,ngff,fmt", FORMATS)
def test_round_trip_without_voxel_size(tmp_path, name, ngff, fmt):
    a = _volume("uint16", (3, 6, 7))
    io.write(tmp_path / name, a, ngff=ngff)
    b, meta = io.read(tmp_path / name)
    np.testing.assert_array_equal(b, a)
    assert meta["voxel_size"] is None


def test_write_accepts_torch_and_leading_singletons(tmp_path):
    torch = pytest.importorskip("torch")
    a = _volume("float32", (3, 6, 7))
    io.write(tmp_path / "t.tif", torch.from_numpy(a)[None, None])
    np.testing.assert_array_equal(io.read(tmp_path / "t.tif")[0], a)


def test_overwrite_replaces_existing_output(tmp_path):
    for fill in (1, 2):  # a directory output over a directory output
        io.write(tmp_path / "v.ome.zarr", np.full((2, 4, 4), fill, np.uint16))
    assert io.read(tmp_path / "v.ome.zarr")[0].max() == 2
    assert _listing(tmp_path) == ["v.ome.zarr"]


# ----------------------------------------------------------------- TIFF metadata from others


@pytest.mark.parametrize("unit,scale", [("micron", 1.0), ("um", 1.0), ("\\u00B5m", 1.0),
                                        ("nm", 1e-3), ("mm", 1e3)])
def test_imagej_voxel_size_from_tifffile(tmp_path, unit, scale):
    a = _volume("uint16", (4, 8, 9))
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(1 / 0.25, 1 / 0.125),
                     metadata={"axes": "ZYX", "spacing": 2.5, "unit": unit})
    b, meta = io.read(tmp_path / "ij.tif")
    np.testing.assert_array_equal(b, a)
    assert meta["format"] == "imagej-tiff"
    assert meta["voxel_size"] == pytest.approx((2.5 * scale, 0.125 * scale, 0.25 * scale))


def test_imagej_without_unit_or_spacing_has_no_voxel_size(tmp_path):
    a = _volume("uint16", (4, 8, 9))
    tifffile.imwrite(tmp_path / "a.tif", a, imagej=True, resolution=(4, 8),
                     metadata={"axes": "ZYX", "spacing": 2.5})
    tifffile.imwrite(tmp_path / "b.tif", a, imagej=True, resolution=(4, 8),
                     metadata={"axes": "ZYX", "unit": "um"})
    assert io.read(tmp_path / "a.tif")[1]["voxel_size"] is None
    assert io.read(tmp_path / "b.tif")[1]["voxel_size"] is None


def test_ome_voxel_size_from_tifffile(tmp_path):
    a = _volume("float32", (4, 8, 9))
    tifffile.imwrite(tmp_path / "a.ome.tif", a, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 0.5, "PhysicalSizeZUnit": "µm",
        "PhysicalSizeY": 110.0, "PhysicalSizeYUnit": "nm", "PhysicalSizeX": 0.105})
    b, meta = io.read(tmp_path / "a.ome.tif")
    np.testing.assert_array_equal(b, a)
    assert meta["format"] == "ome-tiff"
    assert meta["voxel_size"] == pytest.approx((0.5, 0.11, 0.105))  # X unit: the µm default


def test_ome_without_z_size_has_no_voxel_size(tmp_path):
    tifffile.imwrite(tmp_path / "a.ome.tif", _volume("uint16", (4, 8, 9)),
                     metadata={"axes": "ZYX", "PhysicalSizeY": 0.1, "PhysicalSizeX": 0.1})
    assert io.read(tmp_path / "a.ome.tif")[1]["voxel_size"] is None


@pytest.mark.filterwarnings("ignore:<tifffile.TiffWriter.write> data with shape")
@pytest.mark.parametrize("shape", [(4, 5, 6), (10, 5, 6)])
def test_plain_tiff_is_a_volume(tmp_path, shape):
    # tifffile stores a plain (4, y, x) array as planar RGBA; it is still read as 4 planes.
    a = _volume("uint16", shape)
    tifffile.imwrite(tmp_path / "p.tif", a)
    b, meta = io.read(tmp_path / "p.tif")
    np.testing.assert_array_equal(b, a)
    assert meta["format"] == "tiff" and meta["voxel_size"] is None


# ------------------------------------------------------------------------ NGFF metadata


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _check_axes_and_dataset(ms: dict, scale) -> None:
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert [a["type"] for a in ms["axes"]] == ["space"] * 3
    assert [a["unit"] for a in ms["axes"]] == ["micrometer"] * 3
    assert len(ms["datasets"]) == 1
    ds = ms["datasets"][0]
    assert ds["path"] == "0"
    transforms = ds["coordinateTransformations"]
    assert transforms[0]["type"] == "scale"  # the first (and only) transform is the scale
    assert len(transforms) == 1
    assert len(transforms[0]["scale"]) == 3
    assert transforms[0]["scale"] == pytest.approx(list(scale))


def test_ngff_05_metadata(tmp_path):
    path = tmp_path / "v.ome.zarr"
    io.write(path, _volume("uint16", (10, 20, 30)), VOXEL, chunks=(5, 20, 16))
    group = _json(path / "zarr.json")
    assert group["zarr_format"] == 3 and group["node_type"] == "group"
    ome = group["attributes"]["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert "version" not in ms  # 0.5 moved it up to "ome"
    _check_axes_and_dataset(ms, VOXEL)
    array = _json(path / "0" / "zarr.json")
    assert array["zarr_format"] == 3 and array["node_type"] == "array"
    assert array["shape"] == [10, 20, 30]
    assert array["dimension_names"] == ["z", "y", "x"]  # 0.5: must match the axes
    assert array["chunk_grid"]["configuration"]["chunk_shape"] == [5, 20, 16]  # the shard
    shard = array["codecs"][0]
    assert shard["name"] == "sharding_indexed"
    inner = shard["configuration"]["chunk_shape"]
    assert all(s % c == 0 for s, c in zip([5, 20, 16], inner, strict=True))
    assert not (path / ".zattrs").exists() and not (path / ".zgroup").exists()


def test_ngff_04_metadata(tmp_path):
    path = tmp_path / "v.zarr"
    io.write(path, _volume("float32", (10, 20, 30)), VOXEL, ngff="0.4", chunks=(5, 20, 16))
    assert _json(path / ".zgroup")["zarr_format"] == 2
    ms = _json(path / ".zattrs")["multiscales"][0]
    assert ms["version"] == "0.4"
    _check_axes_and_dataset(ms, VOXEL)
    array = _json(path / "0" / ".zarray")
    assert array["zarr_format"] == 2
    assert array["shape"] == [10, 20, 30] and array["chunks"] == [5, 20, 16]
    assert array["dimension_separator"] == "/"  # required by 0.4
    assert not (path / "zarr.json").exists()


def test_ngff_without_voxel_size_has_unitless_unit_scale(tmp_path):
    io.write(tmp_path / "v.ome.zarr", _volume("uint16", (2, 4, 4)))
    ms = _json(tmp_path / "v.ome.zarr" / "zarr.json")["attributes"]["ome"]["multiscales"][0]
    assert all("unit" not in a for a in ms["axes"])
    assert ms["datasets"][0]["coordinateTransformations"] == [{"type": "scale",
                                                               "scale": [1.0, 1.0, 1.0]}]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic, inside the models
@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_ngff_metadata_validates(tmp_path, ngff):
    models = pytest.importorskip(f"ome_zarr_models.v0{ngff[-1]}")
    path = tmp_path / "v.ome.zarr"
    io.write(path, _volume("uint16", (6, 8, 8)), VOXEL, ngff=ngff)
    image = models.Image.from_zarr(zarr.open_group(str(path), mode="r"))
    assert image is not None


def test_ngff_scale_units_and_multiscale_transform(tmp_path):
    path = tmp_path / "n.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("s0", shape=(3, 4, 5), dtype="uint8")
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "z", "type": "space", "unit": "nanometer"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "millimeter"}],
        "datasets": [{"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": [500.0, 0.1, 0.0002]},
            {"type": "translation", "translation": [3.0, 4.0, 5.0]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [2.0, 1.0, 1.0]}]}]}
    assert io.read(path)[1]["voxel_size"] == pytest.approx((1.0, 0.1, 0.2))


# -------------------------------------------------------------------------------- squeezing


def test_squeeze_imagej_hyperstack(tmp_path):
    a = _volume("uint16", (1, 4, 1, 6, 7))
    tifffile.imwrite(tmp_path / "h.tif", a, imagej=True, metadata={"axes": "TZCYX"})
    b, meta = io.read(tmp_path / "h.tif")
    assert meta["shape"] == (4, 6, 7)
    np.testing.assert_array_equal(b, a[0, :, 0])


def test_squeeze_ome_tiff(tmp_path):
    a = _volume("float32", (1, 1, 4, 6, 7))
    tifffile.imwrite(tmp_path / "h.ome.tif", a, metadata={"axes": "TCZYX"})
    np.testing.assert_array_equal(io.read(tmp_path / "h.ome.tif")[0], a[0, 0])


def test_squeeze_ngff_tczyx(tmp_path):
    a = _volume("uint16", (1, 1, 4, 6, 7))
    path = tmp_path / "h.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=a.shape, dtype=a.dtype)[...] = a
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
        *({"name": n, "type": "space", "unit": "micrometer"} for n in "zyx")],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 0.5, 0.2, 0.1]}]}]}]
    b, meta = io.read(path)
    np.testing.assert_array_equal(b, a[0, 0])
    assert meta["voxel_size"] == pytest.approx((0.5, 0.2, 0.1))
    assert meta["format"] == "ome-zarr-0.4"


def test_plain_zarr_array(tmp_path):
    a = _volume("float32", (1, 1, 4, 6, 7))
    zarr.create_array(str(tmp_path / "p.zarr"), shape=a.shape, dtype=a.dtype)[...] = a
    b, meta = io.read(tmp_path / "p.zarr")
    np.testing.assert_array_equal(b, a[0, 0])
    assert meta["format"] == "zarr" and meta["voxel_size"] is None


# ---------------------------------------------------------------------------------- errors


def _read_error(path) -> str:
    with pytest.raises(io.ImageIOError) as info:
        io.read(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_error_2d(tmp_path):
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((8, 9), np.uint16))
    assert "2-D image" in _read_error(tmp_path / "flat.tif")


@pytest.mark.parametrize("axes", ["CYX", "TYX"])
def test_a_plain_stack_labelled_channels_or_frames_is_a_z_stack(tmp_path, axes):
    a = np.arange(4 * 8 * 9, dtype=np.uint16).reshape(4, 8, 9)
    tifffile.imwrite(tmp_path / "s.tif", a, imagej=True, metadata={"axes": axes})
    np.testing.assert_array_equal(io.read(tmp_path / "s.tif")[0], a)


def test_error_several_channels(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((4, 2, 8, 9), np.uint16), imagej=True,
                     metadata={"axes": "ZCYX"})
    assert "single channel and time point" in _read_error(tmp_path / "c.tif")


def test_error_several_time_points(tmp_path):
    tifffile.imwrite(tmp_path / "t.ome.tif", np.zeros((3, 1, 4, 8, 9), np.uint16),
                     metadata={"axes": "TCZYX"})
    assert "single channel and time point" in _read_error(tmp_path / "t.ome.tif")


def test_error_rgb(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    assert "not one 3-D volume" in _read_error(tmp_path / "rgb.tif")


@pytest.mark.parametrize("name", ["none.tif", "none.ome.zarr"])
def test_error_missing(tmp_path, name):
    assert "no such file" in _read_error(tmp_path / name)


def test_error_not_an_image(tmp_path):
    (tmp_path / "notes.tif").write_text("these are notes, not pixels\n")
    assert "not a TIFF image" in _read_error(tmp_path / "notes.tif")
    (tmp_path / "empty.zarr").mkdir()
    assert "not a Zarr array" in _read_error(tmp_path / "empty.zarr")


def test_error_unknown_suffix(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    assert "unknown file type" in _read_error(tmp_path / "a.png")
    with pytest.raises(io.ImageIOError, match="unknown output type"):
        io.write(tmp_path / "a.png", np.zeros((2, 2, 2)))


def test_error_zarr_group_without_ngff(tmp_path):
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array("x", shape=(2, 2, 2),
                                                                      dtype="u1")
    assert "without OME-NGFF multiscales" in _read_error(tmp_path / "g.zarr")


def test_error_ngff_version(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(2, 2, 2), dtype="u1")
    group.attrs["multiscales"] = [{"version": "0.3", "axes": ["z", "y", "x"],
                                   "datasets": [{"path": "0"}]}]
    assert "version 0.3 is not supported" in _read_error(tmp_path / "g.zarr")


def test_error_overwrite_false(tmp_path):
    io.write(tmp_path / "v.tif", np.zeros((2, 3, 3), np.uint16))
    with pytest.raises(io.ImageIOError, match="already exists"):
        io.write(tmp_path / "v.tif", np.ones((2, 3, 3), np.uint16), overwrite=False)
    assert io.read(tmp_path / "v.tif")[0].max() == 0


def test_error_missing_folder(tmp_path):
    target = tmp_path / "nowhere" / "v.tif"
    with pytest.raises(io.ImageIOError, match=f"folder {tmp_path / 'nowhere'} does not exist"):
        io.write(target, np.zeros((2, 3, 3), np.uint16))
    with pytest.raises(io.ImageIOError, match="does not exist"):
        io.create_output(target, (2, 3, 3), "uint16", (1, 3, 3))


def test_error_unwritable_folder(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path
                        else real_access(p, mode))
    with pytest.raises(io.ImageIOError, match=f"folder {tmp_path} is not writable"):
        io.write(tmp_path / "v.ome.zarr", np.zeros((2, 3, 3), np.uint16))
    assert _listing(tmp_path) == []


def test_error_permission_during_write(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tifffile, "imwrite", denied)
    with pytest.raises(io.ImageIOError, match=f"folder {tmp_path} is not writable"):
        io.write(tmp_path / "v.tif", np.zeros((2, 3, 3), np.uint16))


def test_error_bad_arguments(tmp_path):
    with pytest.raises(io.ImageIOError, match="ImageJ TIFF holds"):
        io.write(tmp_path / "v.tif", np.zeros((2, 3, 3), np.float64))
    with pytest.raises(io.ImageIOError, match="must be 3-D"):
        io.write(tmp_path / "v.ome.tif", np.zeros((3, 3)))
    with pytest.raises(io.ImageIOError, match="voxel_size must be three positive"):
        io.write(tmp_path / "v.ome.tif", np.zeros((2, 3, 3)), voxel_size=(1, 0, 1))
    with pytest.raises(io.ImageIOError, match="ngff must be one of"):
        io.write(tmp_path / "v.ome.zarr", np.zeros((2, 3, 3)), ngff="0.6")
    assert _listing(tmp_path) == []


# --------------------------------------------------------------------- atomicity, disk full


def _failing_tiff_write(error):
    real = tifffile.imwrite

    def imwrite(path, data, **kwargs):
        real(path, data[:1], **kwargs)  # a partial file exists when the failure comes
        raise error

    return imwrite


_ZARR_META = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


def _failing_zarr_store(monkeypatch, error, after=1):
    from zarr.storage import LocalStore

    real_set, calls = LocalStore.set, []

    async def set_(self, key, value, *args, **kwargs):
        calls.append(key)
        chunks = [c for c in calls if c.startswith("0/") and not c.endswith(_ZARR_META)]
        if key in chunks and len(chunks) > after:
            raise error
        return await real_set(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", set_)


@pytest.mark.parametrize("name", ["v.tif", "v.ome.zarr"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, name):
    if name.endswith(".tif"):
        monkeypatch.setattr(tifffile, "imwrite", _failing_tiff_write(RuntimeError("boom")))
    else:
        _failing_zarr_store(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        io.write(tmp_path / name, _volume("uint16", (8, 16, 16)), chunks=(2, 8, 8))
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("name", ["v.tif", "v.ome.zarr"])
def test_failed_overwrite_keeps_old_output(tmp_path, monkeypatch, name):
    old = _volume("uint16", (8, 16, 16), seed=1)
    io.write(tmp_path / name, old)
    if name.endswith(".tif"):
        monkeypatch.setattr(tifffile, "imwrite", _failing_tiff_write(KeyboardInterrupt()))
    else:
        # Ctrl-C arrives in the main thread, between zarr's chunk writes.
        real_setitem = zarr.Array.__setitem__

        def setitem(self, key, value):
            real_setitem(self, np.s_[:2], value[:2])
            raise KeyboardInterrupt

        monkeypatch.setattr(zarr.Array, "__setitem__", setitem)
    with pytest.raises(KeyboardInterrupt):
        io.write(tmp_path / name, _volume("uint16", (8, 16, 16)), chunks=(2, 8, 8))
    monkeypatch.undo()
    assert _listing(tmp_path) == [name]
    np.testing.assert_array_equal(io.read(tmp_path / name)[0], old)


@pytest.mark.parametrize("name", ["v.ome.tif", "v.ome.zarr", "v.zarr"])
def test_disk_full_on_write(tmp_path, monkeypatch, name):
    full = OSError(errno.ENOSPC, "No space left on device")
    if name.endswith(".tif"):
        monkeypatch.setattr(tifffile, "imwrite", _failing_tiff_write(full))
    else:
        _failing_zarr_store(monkeypatch, full)
    with pytest.raises(io.ImageIOError, match=f"no space left on device writing {tmp_path / name}; "
                       "free space"):
        io.write(tmp_path / name, _volume("uint16", (8, 16, 16)), chunks=(2, 8, 8),
                 ngff="0.4" if name == "v.zarr" else "0.5")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("name", ["o.tif", "o.ome.zarr"])
def test_disk_full_on_write_block(tmp_path, monkeypatch, name):
    a = _volume("uint16", (4, 8, 8))
    out = io.create_output(tmp_path / name, a.shape, a.dtype, (2, 8, 8))
    out.write_block((0, 0, 0), a[:2])
    full = OSError(errno.ENOSPC, "No space left on device")
    if name.endswith(".tif"):
        def flush(self):
            raise full
        monkeypatch.setattr(np.memmap, "flush", flush)
    else:
        _failing_zarr_store(monkeypatch, full, after=0)
    with pytest.raises(io.ImageIOError, match="no space left on device writing"):
        out.write_block((1, 0, 0), a[2:])
    assert out.done_blocks() == {(0, 0, 0)}  # the failed block is not recorded


# ------------------------------------------------------------------------------ open_volume


def _check_boxes(vol, a, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(12):
        lo = [int(rng.integers(0, n)) for n in a.shape]
        hi = [int(rng.integers(lo_ + 1, n + 1)) for lo_, n in zip(lo, a.shape, strict=True)]
        box = tuple(slice(s, e) for s, e in zip(lo, hi, strict=True))
        got = vol[box]
        assert type(got) is np.ndarray and got.dtype == a.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got, a[box])
    np.testing.assert_array_equal(vol[:, :, :], a)
    np.testing.assert_array_equal(vol[:, 3:, :-2], a[:, 3:, :-2])


def test_open_volume_contiguous(tmp_path):
    a = _volume("uint16", (6, 20, 23))
    io.write(tmp_path / "v.tif", a, VOXEL)
    with io.open_volume(tmp_path / "v.tif") as vol:
        # Read box by box with positioned reads: never loaded, never mapped.
        assert isinstance(vol._src["data"], io._ContiguousReader)
        assert vol.shape == a.shape and vol.dtype == a.dtype and vol.format == "imagej-tiff"
        assert vol.voxel_size == pytest.approx(VOXEL)
        _check_boxes(vol, a)


def test_open_volume_contiguous_squeezed_axes(tmp_path):
    a = _volume("uint16", (5, 12, 13))
    tifffile.imwrite(tmp_path / "h.tif", a[None, :, None], imagej=True,
                     metadata={"axes": "TZCYX"})
    with io.open_volume(tmp_path / "h.tif") as vol:
        assert vol.shape == a.shape
        _check_boxes(vol, a)


def test_truncated_file_is_an_error(tmp_path):
    a = _volume("uint16", (6, 20, 23))
    io.write(tmp_path / "v.tif", a, VOXEL)
    with io.open_volume(tmp_path / "v.tif") as vol:
        offset = vol._src["data"].offset
    # A reader told the file holds 10 planes where 6 (and the TIFF's tags) are.
    reader = io._ContiguousReader(tmp_path / "v.tif", offset, (10, 20, 23), np.uint16)
    try:
        np.testing.assert_array_equal(reader[0:3, 0:20, 0:23], a[:3])
        with pytest.raises(io.ImageIOError, match="ends early"):
            reader[0:10, 0:20, 0:23]
    finally:
        reader.close()


def test_open_volume_big_endian_contiguous(tmp_path):
    a = _volume("float32", (4, 9, 10)).astype(">f4")
    tifffile.imwrite(tmp_path / "be.tif", a, byteorder=">", photometric="minisblack")
    with io.open_volume(tmp_path / "be.tif") as vol:
        assert vol.dtype == np.dtype("float32")
        _check_boxes(vol, a)


@pytest.mark.parametrize("dtype,byteorder", [("uint16", "<"), ("float32", ">")])
def test_open_volume_page_per_plane(tmp_path, dtype, byteorder):
    # Each plane its own uncompressed page with its tags in between (as deconwolf and many
    # acquisition programs write): read plane by plane with positioned reads, without zarr.
    a = _volume(dtype, (5, 21, 19))
    with tifffile.TiffWriter(tmp_path / "p.tif", byteorder=byteorder) as tw:
        for plane in a:
            tw.write(plane, contiguous=False, metadata=None)
    with io.open_volume(tmp_path / "p.tif") as vol:
        reader = vol._src["data"]
        assert isinstance(reader, io._ContiguousReader) and len(reader.planes) == 5
        assert vol.shape == a.shape and vol.dtype == np.dtype(dtype)
        _check_boxes(vol, a)
    np.testing.assert_array_equal(io.read(tmp_path / "p.tif")[0], a)


def test_page_per_plane_truncated_is_an_error(tmp_path):
    a = _volume("uint16", (4, 20, 23))
    with tifffile.TiffWriter(tmp_path / "p.tif") as tw:
        for plane in a:
            tw.write(plane, contiguous=False, metadata=None)
    with io.open_volume(tmp_path / "p.tif") as vol:
        planes = vol._src["data"].planes
    reader = io._ContiguousReader(tmp_path / "p.tif", 0, (5, 20, 23), np.uint16,
                                  planes=[*planes, os.path.getsize(tmp_path / "p.tif") - 100])
    try:
        np.testing.assert_array_equal(reader[1:4, 3:20, 2:23], a[1:4, 3:20, 2:23])
        with pytest.raises(io.ImageIOError, match="ends early"):
            reader[0:5, 0:20, 0:23]
    finally:
        reader.close()


@pytest.mark.parametrize("kwargs", [{"compression": "zlib"}, {"tile": (16, 16)},
                                    {"compression": "zlib", "pages": True}])
def test_open_volume_aszarr(tmp_path, kwargs):
    a = _volume("float32", (5, 40, 37))
    if kwargs.pop("pages", False):  # compressed planes as pages of their own
        with tifffile.TiffWriter(tmp_path / "c.tif") as tw:
            for plane in a:
                tw.write(plane, contiguous=False, metadata=None, **kwargs)
    else:
        tifffile.imwrite(tmp_path / "c.tif", a, photometric="minisblack", **kwargs)
    with io.open_volume(tmp_path / "c.tif") as vol:
        assert isinstance(vol._src["data"], zarr.Array)  # decoded through tifffile.aszarr
        _check_boxes(vol, a)


@pytest.mark.parametrize("name,ngff", [("v.ome.zarr", "0.5"), ("v.zarr", "0.4")])
def test_open_volume_zarr(tmp_path, name, ngff):
    a = _volume("uint16", (7, 20, 23))
    io.write(tmp_path / name, a, VOXEL, ngff=ngff, chunks=(3, 8, 8))
    with io.open_volume(tmp_path / name) as vol:
        _check_boxes(vol, a)


def test_volume_rejects_strided_boxes(tmp_path):
    io.write(tmp_path / "v.tif", np.zeros((2, 4, 4), np.uint16))
    with io.open_volume(tmp_path / "v.tif") as vol:
        with pytest.raises(ValueError, match="step 1"):
            vol[::2, :, :]
        with pytest.raises(TypeError, match="3 slices"):
            vol[0]


@pytest.mark.parametrize("name", ["v.tif", "c.tif", "v.ome.zarr"])
def test_volume_pickles_and_reopens_lazily(tmp_path, name):
    a = _volume("uint16", (4, 16, 16))
    if name == "c.tif":
        tifffile.imwrite(tmp_path / name, a, compression="zlib", photometric="minisblack")
    else:
        io.write(tmp_path / name, a, VOXEL)
    vol = io.open_volume(tmp_path / name)
    copy = pickle.loads(pickle.dumps(vol))
    vol.close()
    assert copy._src is None
    assert (copy.shape, copy.dtype, copy.voxel_size, copy.format, copy.path) == \
        (vol.shape, vol.dtype, vol.voxel_size, vol.format, vol.path)
    np.testing.assert_array_equal(copy[1:3, 2:9, 5:16], a[1:3, 2:9, 5:16])
    copy.close()


def test_tiff_without_zarr_installed(tmp_path):
    # The GPU machines have no zarr: TIFF must work with it missing.
    code = ("import sys; sys.modules['zarr'] = None\n"
            "import numpy as np\nfrom rln_fast import io\n"
            f"p = {str(tmp_path / 'v.tif')!r}\n"
            "a = np.arange(60, dtype=np.uint16).reshape(3, 4, 5)\n"
            "io.write(p, a, (1, 1, 1))\n"
            "with io.open_volume(p) as v: assert (v[:, 1:3, :] == a[:, 1:3, :]).all()\n"
            "assert 'dask' not in sys.modules\n")
    env = dict(os.environ, PYTHONPATH=str(Path(io.__file__).parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ---------------------------------------------------------------------------- create_output


def _write_blocks(out_pickle: bytes, a: np.ndarray, blocks: list) -> int:
    out = pickle.loads(out_pickle)
    for index in blocks:
        out.write_block(index, a[out.block_slices(index)])
    return os.getpid()


@pytest.fixture(scope="module")
def spawn_pool():
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        yield pool


def _direct_and_blockwise_equal(direct: Path, blockwise: Path) -> None:
    a, meta_a = io.read(direct)
    b, meta_b = io.read(blockwise)
    np.testing.assert_array_equal(b, a)
    assert meta_a == meta_b
    if direct.suffix == ".zarr":
        for meta in ("zarr.json", ".zattrs", ".zgroup", "0/zarr.json", "0/.zarray"):
            if (direct / meta).exists():
                assert _json(direct / meta) == _json(blockwise / meta)
    else:
        with tifffile.TiffFile(direct) as t1, tifffile.TiffFile(blockwise) as t2:
            assert t1.series[0].axes == t2.series[0].axes
            assert t1.imagej_metadata == t2.imagej_metadata


@pytest.mark.parametrize("name,ngff", OUTPUT_FORMATS)
def test_blocks_from_two_processes_equal_direct_write(tmp_path, spawn_pool, name, ngff):
    a = _volume("float32", (7, 20, 23))
    block = (3, 8, 8)
    direct = tmp_path / "direct" / name
    direct.parent.mkdir()
    io.write(direct, a, VOXEL, ngff=ngff, chunks=block)
    out = io.create_output(tmp_path / name, a.shape, a.dtype, block, voxel_size=VOXEL,
                           ngff=ngff, fingerprint={"model": "x"})
    assert out.n_blocks == (3, 3, 3)
    order = out.block_indices()
    np.random.default_rng(1).shuffle(order)
    halves = [order[0::2], order[1::2]]
    jobs = [spawn_pool.apply_async(_write_blocks, (pickle.dumps(out), a, h)) for h in halves]
    pids = [job.get(timeout=120) for job in jobs]
    assert os.getpid() not in pids
    assert out.done_blocks() == set(out.block_indices())
    assert not (tmp_path / name).exists()  # only finalize puts it there
    out.finalize()
    assert _listing(tmp_path) == ["direct", name]
    _direct_and_blockwise_equal(direct, tmp_path / name)


def test_block_layout():
    out = io.OutputVolume(Path("x.ome.zarr"), (7, 20, 23), np.dtype("f4"), (3, 8, 8),
                          "ome-zarr-0.5", None)
    assert out.n_blocks == (3, 3, 3)
    assert out.block_indices()[:2] == [(0, 0, 0), (0, 0, 1)] and len(out.block_indices()) == 27
    assert out.block_slices((2, 1, 2)) == (slice(6, 7), slice(8, 16), slice(16, 23))
    with pytest.raises(IndexError):
        out.block_slices((3, 0, 0))


@pytest.mark.parametrize("name,ngff", OUTPUT_FORMATS)
def test_resume_keeps_finished_blocks(tmp_path, name, ngff):
    a = _volume("uint16", (4, 16, 16))
    path = tmp_path / name
    with pytest.raises(RuntimeError):
        with io.create_output(path, a.shape, a.dtype, (2, 8, 8), ngff=ngff,
                              fingerprint={"run": 1}) as out:
            for index in out.block_indices()[:5]:
                out.write_block(index, a[out.block_slices(index)])
            raise RuntimeError("worker lost")
    assert not path.exists()
    assert (tmp_path / f"{name}.partial").exists() and (tmp_path / f"{name}.blocks").is_dir()

    out = io.create_output(path, a.shape, a.dtype, (2, 8, 8), ngff=ngff, fingerprint={"run": 1})
    finished = set(out.block_indices()[:5])
    assert out.done_blocks() == finished
    assert all(out.is_done(i) for i in finished)
    for index in out.block_indices():
        if not out.is_done(index):
            out.write_block(index, a[out.block_slices(index)])
    out.finalize()
    np.testing.assert_array_equal(io.read(path)[0], a)  # the kept blocks hold their data
    assert _listing(tmp_path) == [name]


@pytest.mark.parametrize("change", ["fingerprint", "block", "dtype", "no-resume"])
@pytest.mark.parametrize("name", ["o.ome.zarr", "o.tif"])
def test_mismatch_starts_over(tmp_path, name, change):
    a = _volume("uint16", (4, 16, 16))
    path = tmp_path / name
    out = io.create_output(path, a.shape, a.dtype, (2, 8, 8), fingerprint={"run": 1})
    for index in out.block_indices()[:3]:
        out.write_block(index, a[out.block_slices(index)])
    out.abort()
    kwargs = {"fingerprint": {"run": 1}, "block": (2, 8, 8), "dtype": a.dtype, "resume": True}
    kwargs.update({"fingerprint": {"fingerprint": {"run": 2}}, "block": {"block": (4, 8, 8)},
                   "dtype": {"dtype": np.float32}, "no-resume": {"resume": False}}[change])
    out = io.create_output(path, a.shape, kwargs.pop("dtype"), kwargs.pop("block"), **kwargs)
    assert out.done_blocks() == set()
    partial = tmp_path / f"{name}.partial"
    stale = (zarr.open_array(str(partial / "0"), mode="r")[...] if name.endswith(".zarr")
             else tifffile.imread(partial))
    assert stale.shape == a.shape and not stale.any()  # the old blocks' data is gone
    for index in out.block_indices():
        out.write_block(index, np.ones_like(a[out.block_slices(index)]))
    out.finalize()
    b = io.read(path)[0]
    assert b.dtype == out.dtype and (b == 1).all()


def test_fingerprint_must_be_json(tmp_path):
    with pytest.raises(io.ImageIOError, match="JSON-serialisable"):
        io.create_output(tmp_path / "o.ome.zarr", (2, 2, 2), "f4", (1, 2, 2),
                         fingerprint={"psf": object()})


@pytest.mark.parametrize("name", ["o.ome.zarr", "o.tif"])
def test_finalize_with_missing_blocks(tmp_path, name):
    path = tmp_path / name
    out = io.create_output(path, (4, 16, 16), "float32", (2, 8, 8))
    for index in out.block_indices()[:6]:
        out.write_block(index, np.ones((2, 8, 8), np.float32))
    with pytest.raises(io.ImageIOError, match=f"cannot finish {path}: 2 of 8 blocks are not "
                       "written"):
        out.finalize()
    assert not path.exists()
    assert len(io.create_output(path, (4, 16, 16), "float32", (2, 8, 8)).done_blocks()) == 6


def test_finalize_replaces_existing_output_only_at_the_end(tmp_path):
    path = tmp_path / "o.ome.zarr"
    io.write(path, np.full((2, 8, 8), 7, np.uint16))
    out = io.create_output(path, (2, 8, 8), np.uint16, (2, 8, 8))
    out.write_block((0, 0, 0), np.full((2, 8, 8), 3, np.uint16))
    assert io.read(path)[0].max() == 7
    out.finalize()
    assert io.read(path)[0].max() == 3
    assert _listing(tmp_path) == ["o.ome.zarr"]


def test_abort_without_record_deletes_everything(tmp_path):
    out = io.create_output(tmp_path / "o.tif", (2, 8, 8), np.uint16, (1, 8, 8))
    out.write_block((0, 0, 0), np.zeros((1, 8, 8)))
    out.abort(keep_record=False)
    assert _listing(tmp_path) == []


def test_write_block_shape_is_checked(tmp_path):
    out = io.create_output(tmp_path / "o.ome.zarr", (3, 8, 8), np.uint16, (2, 8, 8))
    with pytest.raises(io.ImageIOError, match=r"block \(1, 0, 0\) must have shape \(1, 8, 8\)"):
        out.write_block((1, 0, 0), np.zeros((2, 8, 8)))
    assert not out.is_done((1, 0, 0))


def test_output_volume_pickles(tmp_path):
    out = io.create_output(tmp_path / "o.tif", (3, 8, 8), np.float32, (2, 8, 8),
                           voxel_size=VOXEL)
    copy = pickle.loads(pickle.dumps(out))
    assert (copy.path, copy.shape, copy.dtype, copy.block, copy.n_blocks, copy.format) == \
        (out.path, out.shape, out.dtype, out.block, out.n_blocks, out.format)
    copy.write_block((1, 0, 0), np.full((1, 8, 8), 5, np.float32))
    assert out.is_done((1, 0, 0))
    out.write_block((0, 0, 0), np.full((2, 8, 8), 4, np.float32))
    out.finalize()
    b, meta = io.read(tmp_path / "o.tif")
    assert b[0].max() == 4 and b[2].min() == 5
    assert meta["voxel_size"] == pytest.approx(VOXEL)


# ------------------------------------------------------------- multi-volume outputs (stacks)

STACK_OUTPUTS = [("s.ome.tif", "0.5", o) for o in ("tczyx", "tzcyx", "ctzyx", "ztcyx", "zctyx",
                                                   "cztyx")] + [
    ("s.tif", "0.5", "tzcyx"), ("s.ome.zarr", "0.5", "tczyx"), ("s.zarr", "0.4", "tczyx")]


def _fill(out: io.OutputStack, ref: np.ndarray) -> None:
    for t, c, *ijk in out.block_indices():
        view = pickle.loads(pickle.dumps(out.volume(t, c)))  # as a Dask worker gets it
        view.write_block(ijk, ref[t, c][view.block_slices(ijk)])


@pytest.mark.parametrize(("name", "ngff", "axes"), STACK_OUTPUTS)
def test_stack_output_round_trip_and_metadata(tmp_path, name, ngff, axes):
    ref = _volume("float32", (3, 2, 5, 9, 11)).reshape(3, 2, 5, 9, 11)
    record = {"channels": [{"channel": 0, "method": "rl"}, {"channel": 1, "deconvolved": False}]}
    # The input's order is asked for; formats that cannot hold it use their own.
    out = io.create_stack_output(tmp_path / name, "ztcyx" if axes == "tczyx" and "ome.tif" not in
                                 name else axes, 3, 2, (5, 9, 11), np.float32, (2, 4, 11),
                                 voxel_size=VOXEL, channel_names=["a", "b"], time_increment=1.5,
                                 time_unit="ms", processing=record, ngff=ngff)
    assert out.axes == axes
    _fill(out, ref)
    out.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    s = io.open_stack(tmp_path / name)
    assert (s.axes, s.n_time, s.n_channels, s.volume_shape) == (axes, 3, 2, (5, 9, 11))
    assert s.voxel_size == pytest.approx(VOXEL)
    assert (s.channel_names, s.time_increment, s.time_unit) == (["a", "b"], 1.5, "millisecond")
    assert s.processing == record
    for t, c in s.volumes():
        np.testing.assert_array_equal(s.volume(t, c)[:, :, :], ref[t, c])
    if name.endswith("zarr"):
        models = pytest.importorskip(f"ome_zarr_models.v0{ngff[-1]}")
        assert models.Image.from_zarr(zarr.open_group(str(tmp_path / name), mode="r"))


def test_stack_output_resumes_its_blocks_and_starts_over_on_other_settings(tmp_path):
    ref = _volume("float32", (2, 2, 4, 8, 8)).reshape(2, 2, 4, 8, 8)
    path = tmp_path / "s.ome.zarr"

    def create(fp):
        return io.create_stack_output(path, "tczyx", 2, 2, (4, 8, 8), np.float32, (2, 8, 8),
                                      fingerprint=fp)

    out = create({"run": 1})
    out.volume(1, 0).write_block((1, 0, 0), ref[1, 0, 2:])
    out.volume(0, 1).write_block((0, 0, 0), ref[0, 1, :2])
    with pytest.raises(io.ImageIOError, match="6 of 8 blocks are not written"):
        out.finalize()
    out.abort(keep_record=True)
    out = create({"run": 1})
    assert out.done_blocks() == {(1, 0, 1, 0, 0), (0, 1, 0, 0, 0)}
    assert out.volume(1, 0).done_blocks() == {(1, 0, 0)} and out.volume(1, 1).done_blocks() == set()
    out.abort(keep_record=True)
    out = create({"run": 2})
    assert out.done_blocks() == set()
    with pytest.raises(io.ImageIOError, match=r"block \(0, 1, 0, 0, 0\) must have shape"):
        out.write_block((0, 1, 0, 0, 0), np.zeros((4, 8, 8)))
    with pytest.raises(IndexError, match="no volume t=2"):
        out.volume(2, 0)
    _fill(out, ref)
    out.finalize()
    np.testing.assert_array_equal(io.open_stack(path).volume(1, 1)[:, :, :], ref[1, 1])


def test_stack_output_keeps_the_safety_rules(tmp_path):
    mine = tmp_path / "s.ome.zarr"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(io.ImageIOError, match="replaces only its own outputs"):
        io.create_stack_output(mine, "czyx", 1, 2, (2, 4, 4), np.float32, (2, 4, 4))
    assert (mine / "notes.txt").read_text() == "mine"
    with pytest.raises(io.ImageIOError, match="ImageJ TIFF holds uint8"):
        io.create_stack_output(tmp_path / "s.tif", "czyx", 1, 2, (2, 4, 4), np.float64, (2, 4, 4))
    with pytest.raises(io.ImageIOError, match="no t or c axis for 2 time points"):
        io.create_stack_output(tmp_path / "s.ome.tif", "czyx", 2, 2, (2, 4, 4), np.float32,
                               (2, 4, 4))
    with pytest.raises(io.ImageIOError, match="3 channel names for 2 channels"):
        io.create_stack_output(tmp_path / "s.ome.tif", "czyx", 1, 2, (2, 4, 4), np.float32,
                               (2, 4, 4), channel_names=["a", "b", "c"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ome.zarr"]
