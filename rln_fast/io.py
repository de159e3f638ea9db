"""Volume I/O: TIFF (plain, ImageJ, OME) and OME-Zarr (NGFF 0.4 / 0.5): whole, lazy, block-wise.

Axes are always (z, y, x) and voxel sizes (dz, dy, dx) in µm. ``read``/``write`` move whole
volumes; ``open_volume`` reads boxes without loading the file; ``create_output`` writes a volume
block by block from one or many processes, atomically and resumably (``<path>.partial`` plus a
block record ``<path>.blocks/``, renamed into place by ``finalize``).

Multi-channel and time-lapse files (axes t, c, z, y, x in the orders the formats allow):
``open_stack`` reads them volume by volume (``Stack.volume(t, c)`` is a lazy (z, y, x)
``Volume``) with their channel names and time step; ``create_stack_output`` writes one block
by block, every (t, c) volume its own blocks, with the same resume and safety rules.

Format names (``meta["format"]``, ``Volume.format``, ``OutputVolume.format``): "tiff" (plain),
"imagej-tiff", "ome-tiff", "zarr" (a plain array), "ome-zarr-0.4", "ome-zarr-0.5".

zarr and dask are imported inside functions: a machine without zarr can still use TIFF.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ImageIOError", "OutputStack", "OutputVolume", "Stack", "Volume", "check_not_inside",
           "claim_output", "create_output", "create_stack_output", "open_stack", "open_volume",
           "read", "stack_output_axes", "write"]

NGFF_VERSIONS = ("0.4", "0.5")
# ImageJ stores 8-bit, 16-bit (signed or not) and 32-bit float only (tifffile enforces it).
_IMAGEJ_DTYPES = tuple(np.dtype(c) for c in "BHhf")
# Inner chunks of a Zarr v3 shard: the largest divisor of the block axis up to this size.
_MAX_INNER_CHUNK = 64
_MIN_INNER_CHUNK = 8
_DEFAULT_SHARD = 256
_DEFAULT_CHUNK_V2 = 64

# Length units seen in OME-XML, ImageJ descriptions and NGFF axes, as µm per unit.
_UM_PER_UNIT = {
    "micrometer": 1.0, "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0,
    "nanometer": 1e-3, "nm": 1e-3, "picometer": 1e-6, "pm": 1e-6,
    "angstrom": 1e-4, "å": 1e-4, "millimeter": 1e3, "mm": 1e3,
    "centimeter": 1e4, "cm": 1e4, "meter": 1e6, "m": 1e6,
}
# TIFF ResolutionUnit tag: 2 inch, 3 centimetre (1 = none).
_UM_PER_RESOLUTION_UNIT = {2: 25400.0, 3: 1e4}

# Axis letters (tifffile's codes, NGFF names upper-cased). Singletons of the non-spatial ones
# are squeezed first; "?" marks an axis whose meaning the file does not say.
_SPATIAL = "ZYX"
_GENERIC = "?QI"


class ImageIOError(ValueError):
    """A volume could not be read or written; the message says what, which file, what to do."""


# ------------------------------------------------------------------------------------ helpers


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _to_um(unit: Any) -> float | None:
    if not isinstance(unit, str):
        return None
    u = unit.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").lower()
    return _UM_PER_UNIT.get(u)


def _check_voxel_size(voxel_size: Any, context: str,
                      error: type[Exception] = ImageIOError) -> tuple[float, float, float] | None:
    """``voxel_size`` as three positive finite floats (dz, dy, dx), or None; otherwise
    ``error`` with a message that starts with ``context`` (who asks)."""
    if voxel_size is None:
        return None
    try:
        v = tuple(float(s) for s in voxel_size)
    except (TypeError, ValueError):
        v = ()
    if len(v) != 3 or not all(math.isfinite(s) and s > 0 for s in v):
        raise error(f"{context}: voxel_size must be three positive numbers (dz, dy, dx) in µm, "
                    f"got {voxel_size!r}")
    return v



def _check_ngff(ngff: Any, where: Path) -> str:
    version = str(ngff)
    if version not in NGFF_VERSIONS:
        raise ImageIOError(f"writing {where}: ngff must be one of {', '.join(NGFF_VERSIONS)}, "
                           f"got {ngff!r}")
    return version


def _is_zarr(path: Path) -> bool:
    return any(p.suffix.lower() == ".zarr" for p in (path, *path.parents))


def _output_format(path: Path, ngff: str) -> str:
    name = path.name.lower()
    if name.endswith((".ome.tif", ".ome.tiff")):
        return "ome-tiff"
    if name.endswith((".tif", ".tiff")):
        return "imagej-tiff"
    if name.endswith(".zarr"):
        return f"ome-zarr-{ngff}"
    raise ImageIOError(f"cannot write {path}: unknown output type; end the name in .tif, "
                       ".tiff, .ome.tif, .ome.tiff, .zarr or .ome.zarr")


def _to_numpy(arr: Any) -> np.ndarray:
    if hasattr(arr, "detach") and hasattr(arr, "cpu"):  # torch, any device
        arr = arr.detach().cpu().numpy()
    elif hasattr(arr, "__cuda_array_interface__") and hasattr(arr, "get"):  # cupy
        arr = arr.get()
    return np.asarray(arr)


def _as_volume(arr: Any, where: Path) -> np.ndarray:
    data = _to_numpy(arr)
    while data.ndim > 3 and data.shape[0] == 1:  # (N=1, C=1, z, y, x) from a model
        data = data[0]
    if data.ndim != 3:
        raise ImageIOError(f"writing {where}: the array must be 3-D (z, y, x), got shape "
                           f"{data.shape}")
    return data


def _check_imagej_dtype(dtype: np.dtype, where: Path) -> None:
    if dtype not in _IMAGEJ_DTYPES:
        raise ImageIOError(
            f"writing {where}: ImageJ TIFF holds uint8, uint16, int16 or float32, got {dtype}; "
            "cast the array (e.g. to float32) or write .ome.tif / .ome.zarr")


def _check_tiff_size(fmt: str, shape: Sequence[int], dtype: np.dtype, where: Path) -> None:
    """ImageJ TIFF is classic TIFF: a plane (one strip) must stay under 4 GiB. OME-TIFF
    switches to BigTIFF by itself (tifffile does it above ~4 GB)."""
    plane = int(shape[-1]) * int(shape[-2]) * np.dtype(dtype).itemsize
    if fmt == "imagej-tiff" and plane >= 2**32:
        raise ImageIOError(f"cannot write {where}: one z-plane is {plane / 2**30:.1f} GiB and "
                           "ImageJ TIFF holds planes under 4 GiB; write .ome.tif (BigTIFF) or "
                           ".ome.zarr")


def _check_folder(path: Path) -> None:
    folder = path.absolute().parent
    if not folder.is_dir():
        raise ImageIOError(f"cannot write {path}: folder {folder} does not exist; create it or "
                           "choose another output path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ImageIOError(f"cannot write {path}: folder {folder} is not writable; choose "
                           "another output folder")


def _write_error(e: OSError, path: Path) -> ImageIOError:
    folder = path.absolute().parent
    if e.errno == errno.ENOSPC:
        return ImageIOError(f"no space left on device writing {path}; free space on that disk "
                            "or write the output elsewhere")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ImageIOError(f"cannot write {path}: folder {folder} is not writable; choose "
                            "another output folder")
    return ImageIOError(f"cannot write {path}: {_one_line(e)}; check the output folder {folder}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` onto ``final``; an existing ``final`` disappears only once ``tmp`` is there."""
    if final.exists() and (final.is_dir() or tmp.is_dir()):
        # rename(2) cannot replace a directory, so the old output steps aside first and comes
        # back if the move fails; ``final`` never holds partial data.
        old = final.with_name(f"{final.name}.{os.getpid()}.old")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        _remove(old)
    else:
        os.replace(tmp, final)


# Written into every Zarr output rln_fast makes; a Zarr folder without it (or with anything
# but what rln_fast put there) is not replaced unless the caller says overwrite.
_MARKER = ".rln_fast"
_ZARR_OWN = {_MARKER, "zarr.json", ".zgroup", ".zattrs", ".zmetadata", "0"}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_tiff_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _is_own_output(path: Path, fmt: str) -> bool:
    """Whether ``path`` holds what rln_fast writes for ``fmt``: a TIFF file for a TIFF output,
    a Zarr folder carrying rln_fast's marker and nothing else for a Zarr output."""
    if path.is_symlink():
        return False
    if fmt.startswith("ome-zarr"):
        if not path.is_dir() or not (path / _MARKER).is_file():
            return False
        try:
            return {e.name for e in os.scandir(path)} <= _ZARR_OWN
        except OSError:
            return False
    return path.is_file() and _is_tiff_file(path)


def _is_own_record(record: Path) -> bool:
    """A block record rln_fast made: a folder of block files and its fingerprint only."""
    if record.is_symlink() or not record.is_dir():
        return False
    try:
        names = [e.name for e in os.scandir(record)]
    except OSError:
        return False
    return all(_BLOCK_NAME.match(n) or _STACK_BLOCK_NAME.match(n)
               or n.startswith("fingerprint.json") for n in names)


def _check_replaceable(path: Path, fmt: str, overwrite: bool, record: bool = False) -> None:
    """Refuse (one line) to replace ``path`` unless it is rln_fast's own output (or block
    record) or ``overwrite``."""
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    if _is_own_record(path) if record else _is_own_output(path, fmt):
        return
    kind = "folder" if path.is_dir() and not path.is_symlink() else "file"
    ours = ("an rln_fast block record" if record else "an rln_fast Zarr output"
            if fmt.startswith("ome-zarr") else "a TIFF file")
    raise ImageIOError(f"cannot write {path}: a {kind} that is not {ours} is there and rln_fast "
                       "replaces only its own outputs; move it away or pass overwrite "
                       "(--overwrite) to replace it")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def check_not_inside(outputs: Sequence[Path], inputs: Sequence[Any]) -> None:
    """Refuse when an output path is an input, lies inside one, or holds one (after ``..`` and
    symbolic links are resolved): writing there would destroy the input."""
    for inp in inputs:
        if inp is None or not isinstance(inp, (str, os.PathLike)):
            continue
        real_in = _real(Path(inp))
        for out in outputs:
            real_out = _real(Path(out))
            if real_out == real_in:
                why = "is the input"
            elif real_in in real_out.parents:
                why = "lies inside the input"
            elif real_out in real_in.parents:
                why = "contains the input"
            else:
                continue
            raise ImageIOError(f"cannot write {out}: it {why} {inp}; choose an output path "
                               "outside the input")


# ------------------------------------------------------------------------------ one writer


def _lock_info(lock: Path) -> dict | None:
    try:
        info = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "pid" in info else None


def _holder(info: dict | None) -> str:
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}")


class _Lock:
    """``<output>.lock``: one writer per output. The file names its owner (pid, host, start
    time); the exclusion itself is an flock(2) on it, which the kernel drops when the owner
    dies, so the lock of a killed run (kill -9 included) is taken over by the next one.
    Within one process the lock is shared (counted): that process is the one writer."""

    _held: dict[str, _Lock] = {}

    @classmethod
    def take(cls, lock: Path, target: Path) -> _Lock:
        key = str(_real(lock))
        held = cls._held.get(key)
        if held is not None and held._fd is not None:
            held._count += 1
            return held
        new = cls(lock, target)
        cls._held[key] = new
        return new

    def __init__(self, lock: Path, target: Path) -> None:
        import fcntl
        import socket
        import time

        self.path, self._count = lock, 1
        while True:
            if lock.exists() and not lock.is_symlink() and lock.stat().st_size \
                    and _lock_info(lock) is None:
                raise ImageIOError(f"cannot write {target}: {lock} is there and is not an "
                                   "rln_fast lock; move it away")
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise _write_error(e, lock) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise ImageIOError(
                    f"cannot write {target}: another run is writing it ({_holder(_lock_info(lock))}"
                    f"); wait for it to finish, or stop it (a killed run's lock is taken over)"
                    ) from None
            try:  # the file may have been released and removed between open and flock
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except OSError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd: int | None = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        self._count -= 1
        if self._count > 0:
            return
        fd, self._fd = self._fd, None
        _Lock._held.pop(str(_real(self.path)), None)
        if fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(fd)

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)  # the kernel drops the flock; the file stays, free for the next run


# ------------------------------------------------------------------------------------ layout


def _squeeze_dims(shape: tuple[int, ...], axes: str, where: Path) -> tuple[int, int, int]:
    """The three dimensions of ``shape`` that hold (z, y, x), after dropping singleton extras."""
    nd = len(shape)
    if nd < 3:
        raise ImageIOError(f"cannot read {where}: it is a {nd}-D image of shape {shape}, not a "
                           "3-D volume (z, y, x); give a z-stack")
    keep = list(range(nd))
    for droppable in (lambda a: a not in _SPATIAL and a not in _GENERIC,
                      lambda a: a in _GENERIC):
        for d in range(nd):
            if len(keep) > 3 and shape[d] == 1 and droppable(axes[d]):
                keep.remove(d)
    kept = "".join(axes[d] for d in keep)
    # A file that is one plain stack (3-D in all) is a z-stack whatever its first axis is
    # called: ImageJ and tifffile label such stacks as channels or frames by default.
    first = "Z" + _GENERIC + ("CT" if nd == 3 else "")
    spatial_ok = (len(keep) == 3 and kept[0] in first and kept[1] in "Y" + _GENERIC
                  and kept[2] in "X" + _GENERIC)
    if not spatial_ok:
        raise ImageIOError(
            f"cannot read {where}: a {nd}-D image of shape {shape} (axes {axes}) is not one 3-D "
            "volume (z, y, x); read and open_volume take a single channel and time point: "
            "open it with rln_fast.io.open_stack (rln-fast deconvolve takes such stacks)")
    return keep[0], keep[1], keep[2]


def _stack_dims(shape: tuple[int, ...], axes: str, where: Path) -> tuple[tuple[int, int, int],
                                                                        dict[str, int], str]:
    """For a multi-volume file: the dims of (z, y, x), the dims of t and c (when present) and
    the kept axes in file order (lower case), after dropping singletons of other axes."""
    nd = len(shape)
    if nd < 3:
        raise ImageIOError(f"cannot read {where}: it is a {nd}-D image of shape {shape}, not a "
                           "stack of 3-D volumes (z, y, x); give a z-stack")
    keep = [d for d in range(nd) if shape[d] > 1 or axes[d] in "TCZYX"]
    while len(keep) < 3:  # tiny files: bring singleton axes back, innermost first
        keep = sorted({*keep, max(set(range(nd)) - set(keep))})
    letters = [axes[d] for d in keep]
    if len(keep) == 3 and letters[0] not in "ZYX":  # one plain stack, as _squeeze_dims says
        letters[0] = "Z"
    if len(keep) == 3 and set(letters[1:]) <= set("YX" + _GENERIC):
        letters[1:] = ["Y", "X"]
    unknown = [f"{axes[d]}({shape[d]})" for d, a in zip(keep, letters, strict=True)
               if a not in "TCZYX"]
    if any(a in _GENERIC for a in letters):
        raise ImageIOError(
            f"cannot read {where}: a {nd}-D image of shape {shape} whose file does not say "
            "which axes are time, channel or z (a plain TIFF or an unnamed Zarr array); save "
            "it as OME-TIFF, an ImageJ hyperstack or OME-Zarr, or give the Zarr array "
            "dimension_names")
    if unknown:
        raise ImageIOError(
            f"cannot read {where}: axes {axes} of shape {shape} hold {', '.join(unknown)} that "
            "is not a time, channel or z/y/x axis; rln_fast reads t, c, z, y and x (save the "
            "file with that axis as channels, time points or its own files)")
    try:
        from rln_fast.stack import check_axes

        low = check_axes("".join(letters), len(keep))
    except ValueError as e:
        raise ImageIOError(f"cannot read {where}: axes {axes} of shape {shape}: {e}") from None
    zyx = tuple(keep[low.index(a)] for a in "zyx")
    tc = {a: keep[low.index(a)] for a in "tc" if a in low}
    return (zyx[0], zyx[1], zyx[2]), tc, low


def _index(keep: Sequence[int], ndim: int, box: tuple[slice, slice, slice],
           fixed: dict[int, int] | None = None) -> tuple:
    full: list[Any] = [0] * ndim
    for d, i in (fixed or {}).items():
        full[d] = int(i)
    for d, s in zip(keep, box, strict=True):
        full[d] = s
    return tuple(full)


def _normalise_box(key: Any, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    if not isinstance(key, tuple) or len(key) != 3 or not all(isinstance(s, slice) for s in key):
        raise TypeError(f"a Volume is indexed by 3 slices (z, y, x), got {key!r}")
    box = []
    for s, n in zip(key, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"Volume slices must have step 1, got {s!r}")
        box.append(slice(start, max(start, stop)))
    return box[0], box[1], box[2]


# ------------------------------------------------------------------------------- TIFF reading


def _ome_voxel_size(xml: str) -> tuple[float, float, float] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for ax in "ZYX":
        value = pixels.get(f"PhysicalSize{ax}")
        factor = _to_um(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
        if value is None or factor is None:
            return None
        sizes.append(float(value) * factor)
    return sizes[0], sizes[1], sizes[2]


def _imagej_voxel_size(tif: Any) -> tuple[float, float, float] | None:
    ij = tif.imagej_metadata or {}
    spacing = ij.get("spacing")
    page = tif.pages.first
    xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
    if spacing is None or xres is None or yres is None:
        return None
    factor = _to_um(ij.get("unit"))
    if factor is None:  # ImageJ without a unit: the TIFF resolution unit, if any
        factor = _UM_PER_RESOLUTION_UNIT.get(int(page.tags.valueof("ResolutionUnit", 1)))
    if factor is None:
        return None
    # XResolution/YResolution are pixels per unit, as (numerator, denominator).
    (xn, xd), (yn, yd) = xres.value, yres.value
    if not (xn and yn and xd and yd):
        return None
    return float(spacing) * factor, yd / yn * factor, xd / xn * factor


class _ContiguousReader:
    """Box reads of an uncompressed array in a file with positioned reads: one contiguous
    block from ``offset``, or (``planes``) one contiguous (y, x) plane per entry, at those byte
    offsets, in the order of the leading axes (a multi-page TIFF whose pages are uncompressed
    planes with their tags in between).

    A memory map would do the same, but every page it touches stays in the process's
    resident set until unmapped: streaming a 4 GB file through a map shows 4 GB of RSS. Here
    each read copies just its rows and nothing stays mapped. Indexing takes what ``_index``
    builds: 0 for the squeezed singleton axes, a step-1 slice for each of z, y, x.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: Any,
                 planes: Sequence[int] | None = None) -> None:
        self.path, self.offset = path, offset
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.planes = planes
        self._fd: int | None = None

    def __getitem__(self, key: tuple) -> np.ndarray:
        boxes = [k for k in key if isinstance(k, slice)]
        dims = [d for d, k in enumerate(key) if isinstance(k, slice)]
        if dims[1:] != [len(key) - 2, len(key) - 1]:
            raise ImageIOError(f"cannot read {self.path}: y and x are not the last axes")
        (z0, z1, _), (y0, y1, _), (x0, x1, _) = (b.indices(self.shape[d])
                                                 for b, d in zip(boxes, dims, strict=True))
        nx = self.shape[-1]
        strides = np.cumprod((1, *self.shape[:0:-1]))[::-1]  # elements per step of each axis
        base = sum(int(k) * int(st) for k, st in zip(key, strides, strict=True)
                   if not isinstance(k, slice))
        size = self.dtype.itemsize
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((max(z1 - z0, 0), max(y1 - y0, 0), max(x1 - x0, 0)), self.dtype)
        rows = max(y1 - y0, 0)
        plane = self.shape[-1] * self.shape[-2]
        for i, z in enumerate(range(z0, z1)):
            at = base + z * int(strides[dims[0]])  # the plane's first element
            if self.planes is None:
                start = self.offset + (at + y0 * nx) * size
            else:
                start = self.planes[at // plane] + y0 * nx * size
            want = rows * nx * size
            buf = os.pread(self._fd, want, start)
            if len(buf) != want:
                raise ImageIOError(f"cannot read {self.path}: the file ends early (truncated?)")
            out[i] = np.frombuffer(buf, self.dtype).reshape(rows, nx)[:, x0:x1]
        return out

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _plane_offsets(series: Any, shape: tuple[int, ...]) -> list[int] | None:
    """The byte offset of each (y, x) plane when every page of the series is one: uncompressed,
    in strips stored back to back, one sample per pixel of the series' dtype (deconwolf's and
    many acquisition programs' multi-page TIFFs); else None (zarr reads it)."""
    if len(shape) < 2:
        return None
    dtype = np.dtype(series.dtype)
    out = []
    try:
        pages = list(series.pages)
        if len(pages) != math.prod(shape[:-2]):
            return None
        plane = shape[-2] * shape[-1] * dtype.itemsize
        for page in pages:
            kf = page.keyframe  # the page whose tags a frame shares (a page's is itself)
            if (kf.compression != 1 or kf.is_tiled or kf.samplesperpixel != 1
                    or tuple(kf.shape) != tuple(shape[-2:]) or np.dtype(kf.dtype) != dtype
                    or kf.bitspersample != 8 * dtype.itemsize or not page.is_contiguous
                    or not page.dataoffsets or sum(page.databytecounts) != plane):
                return None
            out.append(int(page.dataoffsets[0]))
    except Exception:  # noqa: BLE001 - anything unusual (frames, damaged tags): the general reader
        return None
    return out


def _truncated(path: Path, what: str) -> ImageIOError:
    return ImageIOError(f"cannot read {path}: the file ends early ({what}); it is truncated "
                        "(an interrupted copy or save?): copy or save it again")


def _open_tiff(path: Path, stack: bool = False) -> dict:
    import logging

    import tifffile

    # tifffile logs what it finds wrong in a damaged file; the checks below say it in one line.
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return _open_tiff_quietly(path, tifffile, stack)
    finally:
        log.setLevel(level)


def _open_tiff_quietly(path: Path, tifffile: Any, stack: bool) -> dict:
    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, EOFError, struct.error) as e:
        raise ImageIOError(f"cannot read {path}: not a TIFF image ({_one_line(e)}); give a "
                           ".tif/.tiff image file") from e
    try:
        if not tif.series:
            raise ImageIOError(f"cannot read {path}: the TIFF holds no image; give a TIFF "
                               "with a z-stack")
        series = tif.series[0]
        shape = tuple(int(n) for n in series.shape)
        size = os.path.getsize(path)
        images = (tif.imagej_metadata or {}).get("images") if tif.is_imagej else None
        planes = math.prod(shape[:-3] if series.axes.endswith("S") else shape[:-2])
        if isinstance(images, int) and images > planes:
            raise _truncated(path, f"its ImageJ header announces {images} images, the file "
                                   f"holds {planes}")
        if series.dataoffset is not None:
            need = int(series.dataoffset) + math.prod(shape) * np.dtype(series.dtype).itemsize
            if need > size:
                raise _truncated(path, f"the image data needs {need} bytes, the file has "
                                       f"{size}")
        else:
            for page in (tif.pages.first, tif.pages[-1]):
                ends = [int(o) + int(n) for o, n in zip(getattr(page, "dataoffsets", ()),
                                                        getattr(page, "databytecounts", ()),
                                                        strict=False)]
                if ends and max(ends) > size:
                    raise _truncated(path, f"image data runs to byte {max(ends)}, the file has "
                                           f"{size}")
        if tif.is_ome:
            fmt, axes = "ome-tiff", series.axes
            voxel = _ome_voxel_size(tif.ome_metadata or "")
        elif tif.is_imagej:
            fmt, axes = "imagej-tiff", series.axes
            voxel = _imagej_voxel_size(tif)
        else:
            # A plain TIFF says nothing reliable about its leading axes (tifffile even guesses
            # planar RGB for a 4-plane stack); only interleaved samples (RGB) are believed.
            fmt, voxel = "tiff", None
            tail = "YXS" if series.axes.endswith("S") and len(shape) >= 3 else "YX"
            axes = "?" * (len(shape) - len(tail)) + tail
        if stack:
            keep, tc, kept_axes = _stack_dims(shape, axes, path)
        else:
            keep, tc, kept_axes = _squeeze_dims(shape, axes, path), {}, "zyx"
        meta = {"ome": tif.ome_metadata if tif.is_ome else None,
                "imagej": dict(tif.imagej_metadata or {}) if tif.is_imagej else None}
        if series.dataoffset is not None:  # contiguous, uncompressed: read boxes directly
            dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
            data = _ContiguousReader(path, int(series.dataoffset), shape, dtype)
            tif.close()
            closers: list[Any] = [data]
        elif (planes := _plane_offsets(series, shape)) is not None:
            dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
            data = _ContiguousReader(path, 0, shape, dtype, planes=planes)
            tif.close()
            closers = [data]
        else:
            zarr = _import_zarr(path, "to read this compressed or tiled TIFF")

            store = series.aszarr(level=0)
            data = zarr.open_array(store, mode="r")
            closers = [store, tif]
    except BaseException:
        tif.close()
        raise
    return {"data": data, "keep": keep, "ndim": len(shape), "format": fmt,
            "shape": tuple(shape[d] for d in keep),
            "dtype": np.dtype(series.dtype).newbyteorder("="), "voxel_size": voxel,
            "closers": closers, "tc": tc, "axes": kept_axes, "full_shape": shape, "meta": meta}


# ------------------------------------------------------------------------------- Zarr reading


def _ngff_axes(axes: list, n: int) -> tuple[str, list[float | None]]:
    """Axis letters and µm-per-unit factors (None: not a length) from NGFF ``axes``."""
    letters, factors = [], []
    for ax in axes:
        name = ax.get("name", "") if isinstance(ax, dict) else str(ax)
        kind = ax.get("type") if isinstance(ax, dict) else None
        letter = name.upper() if name.upper() in "TCZYX" and len(name) == 1 else None
        if letter is None:
            letter = {"time": "T", "channel": "C", "space": "?"}.get(kind or "", "?")
        letters.append(letter)
        factors.append(_to_um(ax.get("unit")) if isinstance(ax, dict) else None)
    if len(letters) != n:
        letters, factors = ["?"] * n, [None] * n
    return "".join(letters), factors


def _ngff_scale(transforms: Any, n: int) -> list[float]:
    scale = [1.0] * n
    for t in transforms or []:
        if isinstance(t, dict) and t.get("type") == "scale" and len(t.get("scale", ())) == n:
            scale = [a * float(b) for a, b in zip(scale, t["scale"], strict=True)]
    return scale


def _import_zarr(path: Path, why: str) -> Any:
    try:
        import zarr
    except ImportError:
        raise ImageIOError(f"{path}: zarr is needed {why} but is not installed; "
                           "pip install 'rln-fast[zarr]' (or write a .tif)") from None
    return zarr


def _open_zarr(path: Path, stack: bool = False) -> dict:
    zarr = _import_zarr(path, "to read Zarr")

    try:
        node = zarr.open(store=str(path), mode="r")
    except (zarr.errors.BaseZarrError, OSError, ValueError, KeyError) as e:
        raise ImageIOError(f"cannot read {path}: not a Zarr array or OME-Zarr image "
                           f"({_one_line(e)}); give an .ome.zarr folder or a Zarr array") from e
    voxel: tuple[float, float, float] | None = None
    if isinstance(node, zarr.Array):
        arr, fmt = node, "zarr"
        names = getattr(node.metadata, "dimension_names", None)
        axes = ("".join(str(a).upper() if a and str(a).upper() in "TCZYX" else "?"
                        for a in names) if names and len(names) == node.ndim else "?" * node.ndim)
        factors: list[float | None] = [None] * node.ndim
        scale = [1.0] * node.ndim
        attrs, ms = {}, {}
    else:
        attrs = dict(node.attrs)
        if "ome" in attrs:
            ome = attrs["ome"]
            version, multiscales = str(ome.get("version")), ome.get("multiscales")
        else:
            multiscales = attrs.get("multiscales")
            version = str(multiscales[0].get("version")) if multiscales else "None"
        if not multiscales:
            raise ImageIOError(f"cannot read {path}: a Zarr group without OME-NGFF multiscales "
                               "metadata; give the path of the array inside it (e.g. "
                               f"{path / '0'})")
        if version not in NGFF_VERSIONS:
            raise ImageIOError(f"cannot read {path}: OME-NGFF version {version} is not "
                               f"supported (only {', '.join(NGFF_VERSIONS)}); convert it to "
                               "NGFF 0.4 or 0.5")
        ms = multiscales[0]
        try:
            ds = ms["datasets"][0]
            arr = node[ds["path"]]
        except (KeyError, IndexError, TypeError, zarr.errors.BaseZarrError) as e:
            raise ImageIOError(f"cannot read {path}: the OME-NGFF multiscales metadata names no "
                               f"readable dataset ({_one_line(e)}); check the file") from e
        fmt = f"ome-zarr-{version}"
        axes, factors = _ngff_axes(ms.get("axes", []), arr.ndim)
        # A multiscale-level scale, if any, applies on top of the dataset's own.
        outer = _ngff_scale(ms.get("coordinateTransformations"), arr.ndim)
        scale = [a * b for a, b in zip(_ngff_scale(ds.get("coordinateTransformations"),
                                                   arr.ndim), outer, strict=True)]
    shape = tuple(int(n) for n in arr.shape)
    if stack:
        keep, tc, kept_axes = _stack_dims(shape, axes, path)
    else:
        keep, tc, kept_axes = _squeeze_dims(shape, axes, path), {}, "zyx"
    if all(factors[d] is not None for d in keep):
        voxel = tuple(scale[d] * factors[d] for d in keep)  # type: ignore[operator,assignment]
    meta = {"attrs": attrs, "multiscale": ms, "scale": scale,
            "units": [a.get("unit") if isinstance(a, dict) else None
                      for a in (ms.get("axes", []) if len(ms.get("axes", [])) == len(shape)
                                else [None] * len(shape))]}
    return {"data": arr, "keep": keep, "ndim": len(shape), "format": fmt,
            "shape": tuple(shape[d] for d in keep),
            "dtype": np.dtype(arr.dtype).newbyteorder("="), "voxel_size": voxel, "closers": [],
            "tc": tc, "axes": kept_axes, "full_shape": shape, "meta": meta}


def _open_source(path: Path, stack: bool = False) -> dict:
    if _is_zarr(path):
        if not path.exists():
            raise ImageIOError(f"cannot read {path}: no such file or folder; check the path")
        return _open_zarr(path, stack)
    if path.name.lower().endswith((".tif", ".tiff")):
        if not path.is_file():
            raise ImageIOError(f"cannot read {path}: no such file; check the path")
        return _open_tiff(path, stack)
    raise ImageIOError(f"cannot read {path}: unknown file type; rln_fast reads .tif, .tiff, "
                       ".ome.tif, .zarr and .ome.zarr")


# -------------------------------------------------------------------------------- public read


class Volume:
    """A volume on disk read box by box; never loads the whole file.

    ``shape`` (z, y, x), ``dtype`` (native byte order), ``voxel_size`` (dz, dy, dx) µm or None,
    ``format``, ``path``. ``vol[z0:z1, y0:y1, x0:x1]`` returns a numpy copy of that box.
    Pickling keeps the path and metadata; the file is reopened on the first read.
    """

    def __init__(self, path: str | os.PathLike, *, _where: tuple[int, int] | None = None,
                 _src: dict | None = None) -> None:
        self.path = Path(path)
        # _where: (t, c) of one volume of a stack (see open_stack); None: a single volume.
        self._where = _where
        src = _src if _src is not None else _open_source(self.path, _where is not None)
        self._src: dict | None = src
        self.shape: tuple[int, int, int] = src["shape"] if _where is None else tuple(
            src["full_shape"][d] for d in src["keep"])
        self.dtype: np.dtype = src["dtype"]
        self.voxel_size: tuple[float, float, float] | None = src["voxel_size"]
        self.format: str = src["format"]

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        box = _normalise_box(key, self.shape)
        if self._src is None:
            self._src = _open_source(self.path, self._where is not None)
        src = self._src
        fixed = {}
        if self._where is not None:
            fixed = {src["tc"][a]: i for a, i in zip("tc", self._where, strict=True)
                     if a in src["tc"]}
        part = src["data"][_index(src["keep"], src["ndim"], box, fixed)]
        keep = list(src["keep"])
        if keep != sorted(keep):  # z, y, x stored in another order (a plain Zarr array)
            part = np.transpose(part, [sorted(keep).index(d) for d in keep])
        return np.array(part, dtype=self.dtype, copy=True)

    def close(self) -> None:
        src, self._src = self._src, None
        for c in (src or {}).get("closers", []):
            c.close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "shape": self.shape, "dtype": self.dtype.str,
                "voxel_size": self.voxel_size, "format": self.format, "where": self._where}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self.shape, self.dtype = tuple(state["shape"]), np.dtype(state["dtype"])
        self.voxel_size, self.format = state["voxel_size"], state["format"]
        self._where = state.get("where")
        self._src = None

    def __repr__(self) -> str:
        where = "" if self._where is None else f", t={self._where[0]}, c={self._where[1]}"
        return (f"Volume({str(self.path)!r}{where}, shape={self.shape}, dtype={self.dtype}, "
                f"voxel_size={self.voxel_size}, format={self.format!r})")


def open_volume(path: str | os.PathLike) -> Volume:
    """Open a TIFF or (OME-)Zarr volume lazily; see :class:`Volume`.

    Singleton leading axes (t=1, c=1) are squeezed to (z, y, x); 2-D images, several channels
    or time points, missing files and non-images raise :class:`ImageIOError`.
    """
    return Volume(path)


# Time units: the NGFF (UDUNITS-2) name each spelling stands for, and how OME and ImageJ write it.
_TIME_UNITS = {
    "s": "second", "sec": "second", "second": "second", "seconds": "second",
    "ms": "millisecond", "msec": "millisecond", "millisecond": "millisecond",
    "µs": "microsecond", "us": "microsecond", "microsecond": "microsecond",
    "ns": "nanosecond", "nanosecond": "nanosecond",
    "min": "minute", "minute": "minute", "minutes": "minute",
    "h": "hour", "hr": "hour", "hour": "hour", "hours": "hour", "d": "day", "day": "day",
}
_OME_TIME = {"second": "s", "millisecond": "ms", "microsecond": "µs", "nanosecond": "ns",
             "minute": "min", "hour": "h", "day": "d"}
_IMAGEJ_TIME = {"second": "sec", "millisecond": "ms", "microsecond": "us", "nanosecond": "ns",
                "minute": "min", "hour": "hour", "day": "day"}


def _time_unit(unit: Any, default: str | None = "second") -> str | None:
    if not isinstance(unit, str) or not unit.strip():
        return default
    u = unit.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    return _TIME_UNITS.get(u, _TIME_UNITS.get(u.lower(), u))


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _stack_metadata(src: dict) -> dict:
    """Channel names, time increment and unit, and the processing record, from the format's
    own metadata (OME-XML, ImageJ description, NGFF attributes)."""
    meta, n_c = src["meta"], src["full_shape"][src["tc"]["c"]] if "c" in src["tc"] else 1
    names: list[str] | None = None
    dt, unit, record, channels = None, None, None, None
    if meta.get("ome"):
        try:
            root = ET.fromstring(meta["ome"])
        except ET.ParseError:
            root = None
        image = next((el for el in (root.iter() if root is not None else ())
                      if el.tag.rsplit("}", 1)[-1] == "Image"), None)
        pixels = next((el for el in (image.iter() if image is not None else ())
                       if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
        if pixels is not None:
            dt = _positive(pixels.get("TimeIncrement"))
            unit = _time_unit(pixels.get("TimeIncrementUnit")) if dt else None
            found = [el.get("Name") for el in pixels if el.tag.rsplit("}", 1)[-1] == "Channel"]
            if len(found) == n_c and all(found):
                names = [str(n) for n in found]
        desc = next((el.text for el in (image.iter() if image is not None else ())
                     if el.tag.rsplit("}", 1)[-1] == "Description"), None)
        record = _parse_record(desc)
    elif meta.get("imagej") is not None:
        ij = meta["imagej"]
        dt = _positive(ij.get("finterval"))
        unit = _time_unit(ij.get("tunit")) if dt else None
        labels = ij.get("Labels")
        if isinstance(labels, (list, tuple)) and len(labels) >= n_c and all(labels[:n_c]):
            names = [str(n) for n in labels[:n_c]]  # planes run c fastest in ImageJ's TZCYX
        record = _parse_record(ij.get("Info"))
    elif meta.get("multiscale") is not None or meta.get("attrs") is not None:
        attrs = meta.get("attrs") or {}
        if "t" in src["tc"]:
            d = src["tc"]["t"]
            dt = _positive(meta["scale"][d]) if meta.get("scale") else None
            unit = _time_unit(meta["units"][d], None) if dt and meta.get("units") else None
            if dt and unit is None and meta["units"][d] is None:
                dt = None  # a scale without a unit says nothing about time
        omero = (attrs.get("ome", attrs) or {}).get("omero") or {}
        found = omero.get("channels") if isinstance(omero, dict) else None
        if isinstance(found, list) and len(found) == n_c:
            channels = found
            labels = [c.get("label") if isinstance(c, dict) else None for c in found]
            if all(labels):
                names = [str(n) for n in labels]
        record = attrs.get("rln_fast") if isinstance(attrs.get("rln_fast"), dict) else None
    if "t" not in src["tc"]:  # a time step without time points means nothing here
        dt, unit = None, None
    return {"channel_names": names, "time_increment": dt, "time_unit": unit,
            "processing": record, "omero_channels": channels}


def _parse_record(text: Any) -> dict | None:
    """The processing record rln_fast writes as JSON into a description, or None."""
    if not isinstance(text, str) or "rln_fast" not in text:
        return None
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return found.get("rln_fast") if isinstance(found, dict) else None


class Stack:
    """A multi-channel and/or time-lapse file read volume by volume; never loads the whole file.

    ``axes``: the file's axes in its own order, lower case, some of t, c and always z, y, x
    (singletons of other axes dropped; a file without a t or c axis has none). ``shape``:
    the sizes of those axes. ``n_time``, ``n_channels`` (1 when the axis is absent),
    ``volume_shape`` (z, y, x), ``dtype``, ``voxel_size`` (dz, dy, dx) µm or None,
    ``channel_names`` (list or None), ``time_increment`` with ``time_unit`` (an NGFF name
    such as "second"; both None when the file does not say), ``processing`` (the record of
    an rln_fast output, else None), ``format``, ``path``. ``volume(t, c)`` is one (z, y, x)
    :class:`Volume` (box reads, picklable, opened on its first read).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        src = _open_source(self.path, stack=True)
        try:
            self.format: str = src["format"]
            self.axes: str = src["axes"]
            full = src["full_shape"]
            self._tc = dict(src["tc"])
            self.shape = tuple(full[d] for d in sorted([*src["keep"], *self._tc.values()]))
            self.volume_shape: tuple[int, int, int] = tuple(full[d] for d in src["keep"])
            self.n_time = full[self._tc["t"]] if "t" in self._tc else 1
            self.n_channels = full[self._tc["c"]] if "c" in self._tc else 1
            self.dtype: np.dtype = src["dtype"]
            self.voxel_size: tuple[float, float, float] | None = src["voxel_size"]
            extra = _stack_metadata(src)
            self.channel_names: list[str] | None = extra["channel_names"]
            self.time_increment: float | None = extra["time_increment"]
            self.time_unit: str | None = extra["time_unit"]
            self.processing: dict | None = extra["processing"]
            self._omero_channels = extra["omero_channels"]
            self._state = {k: src[k] for k in ("format", "dtype", "voxel_size")}
        finally:
            for c in src.get("closers", []):
                c.close()

    def volume(self, t: int = 0, c: int = 0) -> Volume:
        """Time point ``t``, channel ``c`` as a lazy (z, y, x) :class:`Volume`."""
        for what, i, n in (("time point", t, self.n_time), ("channel", c, self.n_channels)):
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
                raise IndexError(f"{self.path}: {what} {i!r} is out of range (0..{n - 1})")
        vol = Volume.__new__(Volume)
        vol.__setstate__({"path": str(self.path), "shape": self.volume_shape,
                          "dtype": self.dtype.str, "voxel_size": self.voxel_size,
                          "format": self.format, "where": (int(t), int(c))})
        return vol

    def volumes(self) -> list[tuple[int, int]]:
        """Every (t, c) pair, t outer."""
        return [(t, c) for t in range(self.n_time) for c in range(self.n_channels)]

    def close(self) -> None:
        """Nothing stays open between reads of a Stack; each Volume closes its own file."""

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Stack({str(self.path)!r}, axes={self.axes!r}, shape={self.shape}, "
                f"dtype={self.dtype}, voxel_size={self.voxel_size}, format={self.format!r})")


def open_stack(path: str | os.PathLike) -> Stack:
    """Open a multi-channel / time-lapse TIFF (OME-TIFF in any DimensionOrder, ImageJ
    hyperstack TZCYX) or Zarr (OME-Zarr 0.4/0.5: t, c before z, y, x; a plain Zarr array with
    ``dimension_names``) lazily; see :class:`Stack`. A single volume opens too (one t, one c).
    Axes other than t, c, z, y, x (unless singleton), or a plain TIFF with more than three
    dimensions (its axes are not written down), raise :class:`ImageIOError`."""
    return Stack(path)


def read(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a whole volume: ``(array (z, y, x), meta)``.

    ``meta``: ``voxel_size`` (dz, dy, dx) in µm or None when the file does not say,
    ``format``, ``shape``, ``dtype``. Formats as for :func:`open_volume`.
    """
    with open_volume(path) as vol:
        arr = vol[:, :, :]
        meta = {"voxel_size": vol.voxel_size, "format": vol.format, "shape": vol.shape,
                "dtype": vol.dtype}
    return arr, meta


# ------------------------------------------------------------------------------- writing


def _tiff_kwargs(fmt: str, voxel: tuple[float, float, float] | None, axes: str = "zyx",
                 meta: dict | None = None, shape: Sequence[int] | None = None) -> dict:
    """tifffile keywords for a volume, or (with ``axes``, ``meta`` and ``shape``) a stack:
    channel names, time increment and the processing record (JSON) as the format keeps them."""
    meta = meta or {}
    dt, unit = meta.get("time_increment"), meta.get("time_unit") or "second"
    names, record = meta.get("channel_names"), meta.get("processing")
    if fmt == "imagej-tiff":
        kw: dict[str, Any] = {"imagej": True, "metadata": {"axes": axes.upper()}}
        if voxel is not None:
            kw["metadata"].update(spacing=voxel[0], unit="um")
            kw["resolution"] = (1.0 / voxel[2], 1.0 / voxel[1])
        if dt and "t" in axes:
            kw["metadata"]["finterval"] = float(dt)
            if unit != "second":
                kw["metadata"]["tunit"] = _IMAGEJ_TIME.get(unit, unit)
        if names and "c" in axes and shape is not None:
            # One label per plane; ImageJ's planes run c fastest (TZCYX).
            planes = math.prod(shape[:-2])
            kw["metadata"]["Labels"] = [str(names[i % len(names)]) for i in range(planes)]
        if record is not None:
            kw["metadata"]["Info"] = json.dumps({"rln_fast": record})
    else:
        kw = {"ome": True, "metadata": {"axes": axes.upper()}}
        if voxel is not None:
            for ax, size in zip("ZYX", voxel, strict=True):
                kw["metadata"][f"PhysicalSize{ax}"] = size
                kw["metadata"][f"PhysicalSize{ax}Unit"] = "µm"
        if dt and "t" in axes:
            kw["metadata"]["TimeIncrement"] = float(dt)
            kw["metadata"]["TimeIncrementUnit"] = _OME_TIME.get(unit, unit)
        if names and "c" in axes:
            kw["metadata"]["Channel"] = {"Name": [str(n) for n in names]}
        if record is not None:
            kw["metadata"]["Description"] = json.dumps({"rln_fast": record})
    kw["photometric"] = "minisblack"
    return kw


# Default omero channel colours (hex RGB) when the input has none: blue, green, red, ...
_COLOURS = ("0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00", "FFFFFF")


def _ngff_attributes(voxel: tuple[float, float, float] | None, ngff: str, name: str,
                     axes: str = "zyx", meta: dict | None = None) -> dict:
    # Without a voxel size the scale is 1 and the axes carry no unit: readers then know the
    # size is unknown instead of taking 1 µm for a measurement.
    meta = meta or {}
    dt, unit = meta.get("time_increment"), meta.get("time_unit") or "second"
    spatial = iter([float(v) for v in voxel] if voxel else [1.0, 1.0, 1.0])
    ngff_axes, scale = [], []
    for a in axes:
        if a == "t":
            ngff_axes.append({"name": "t", "type": "time", **({"unit": unit} if dt else {})})
            scale.append(float(dt) if dt else 1.0)
        elif a == "c":
            ngff_axes.append({"name": "c", "type": "channel"})
            scale.append(1.0)
        else:
            ngff_axes.append({"name": a, "type": "space",
                              **({"unit": "micrometer"} if voxel else {})})
            scale.append(next(spatial))
    multiscale = {"name": name, "axes": ngff_axes,
                  "datasets": [{"path": "0", "coordinateTransformations":
                                [{"type": "scale", "scale": scale}]}]}
    extra: dict[str, Any] = {}
    if "c" in axes and meta.get("n_channels"):
        given = meta.get("omero_channels") or []
        names = meta.get("channel_names") or []
        channels = []
        for i in range(int(meta["n_channels"])):
            ch = dict(given[i]) if i < len(given) and isinstance(given[i], dict) else {}
            ch.setdefault("color", _COLOURS[i % len(_COLOURS)])
            ch.setdefault("window", {"min": 0.0, "max": 65535.0, "start": 0.0, "end": 65535.0})
            ch.setdefault("active", True)
            if i < len(names):
                ch["label"] = str(names[i])
            channels.append(ch)
        extra["omero"] = {"channels": channels}
    record = {"rln_fast": meta["processing"]} if meta.get("processing") is not None else {}
    if ngff == "0.4":
        return {"multiscales": [{"version": "0.4", **multiscale}], **extra, **record}
    return {"ome": {"version": "0.5", "multiscales": [multiscale], **extra}, **record}


def _inner_chunk(n: int) -> int:
    best = max(d for d in range(1, min(n, _MAX_INNER_CHUNK) + 1) if n % d == 0)
    return best if best >= _MIN_INNER_CHUNK else n


def _create_zarr(tmp: Path, name: str, shape: tuple[int, ...], dtype: np.dtype,
                 block: tuple[int, ...], voxel: tuple[float, float, float] | None,
                 ngff: str, axes: str = "zyx", meta: dict | None = None) -> Any:
    """An empty OME-Zarr image at ``tmp`` with array "0"; each ``block`` is one shard (0.5) or
    one chunk (0.4), so writers of distinct blocks never share a file."""
    zarr = _import_zarr(tmp, "to write OME-Zarr")

    stem = re.sub(r"(\.ome)?\.zarr$", "", name, flags=re.IGNORECASE)
    if ngff == "0.4":
        import numcodecs

        group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        # Blosc and "/" keys: what NGFF 0.4 asks for and what older readers decode.
        arr = group.create_array(
            "0", shape=shape, dtype=dtype, chunks=block, fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"},
            compressors=numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE))
    else:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        arr = group.create_array(
            "0", shape=shape, dtype=dtype, shards=block,
            chunks=tuple(_inner_chunk(b) for b in block), fill_value=0,
            dimension_names=list(axes))
    group.attrs.update(_ngff_attributes(voxel, ngff, stem, axes, meta))
    (tmp / _MARKER).write_text("written by rln_fast; it replaces this folder only while this "
                               "file is here and nothing but its image is\n")
    return arr


def write(path: str | os.PathLike, arr: Any, voxel_size: Sequence[float] | None = None, *,
          ngff: str = "0.5", chunks: Sequence[int] | None = None, overwrite: bool = True) -> None:
    """Write a (z, y, x) volume; the format follows the suffix.

    .tif/.tiff: ImageJ TIFF (uint8, uint16, int16, float32), voxel size as ImageJ spacing/unit
    and X/YResolution. .ome.tif/.ome.tiff: OME-TIFF with PhysicalSize{X,Y,Z} in µm.
    .zarr/.ome.zarr: OME-Zarr, NGFF 0.5 (Zarr v3, sharded) or ``ngff="0.4"`` (Zarr v2), voxel
    size (dz, dy, dx) µm as the dataset's "scale". ``chunks``: Zarr storage block, the shard
    (0.5, inner chunks ≤ 64 per axis) or chunk (0.4); default 256 / 64 per axis.

    Atomic: the data goes to a temporary sibling that replaces ``path`` only when complete; on
    any failure ``path`` is untouched and the temporary removed. An existing ``path`` is
    replaced only when it is rln_fast's kind of output (a TIFF file for a TIFF path, a Zarr
    folder rln_fast wrote and nothing was added to), never when ``overwrite`` is False.
    """
    path = Path(path)
    ngff = _check_ngff(ngff, path)
    fmt = _output_format(path, ngff)
    data = _as_volume(arr, path)
    voxel = _check_voxel_size(voxel_size, f"writing {path}")
    if fmt == "imagej-tiff":
        _check_imagej_dtype(data.dtype, path)
    if not overwrite and (path.exists() or path.is_symlink()):
        raise ImageIOError(f"cannot write {path}: it already exists; remove it or allow "
                           "overwriting")
    _check_replaceable(path, fmt, False)
    _check_tiff_size(fmt, data.shape, data.dtype, path)
    _check_folder(path)
    if chunks is None:
        cap = _DEFAULT_CHUNK_V2 if ngff == "0.4" else _DEFAULT_SHARD
        block = tuple(max(1, min(n, cap)) for n in data.shape)
    else:
        block = _check_block(chunks, path, "chunk shape")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    _remove(tmp)
    try:
        if fmt.startswith("ome-zarr"):
            zarr_arr = _create_zarr(tmp, path.name, data.shape, data.dtype, block, voxel, ngff)
            zarr_arr[...] = data
        else:
            import tifffile

            tifffile.imwrite(tmp, data, **_tiff_kwargs(fmt, voxel))
        _replace(tmp, path)
    except OSError as e:
        raise _write_error(e, path) from e
    finally:
        if fmt.startswith("ome-zarr") and tmp.exists():
            _drain_zarr()  # a failed write leaves sibling chunk writes in flight
        _remove(tmp)


def _drain_zarr() -> None:
    """Wait for the chunk writes still running on zarr's event loop.

    When one chunk write fails, zarr raises at once while the other writes of the same call
    go on in the background; removing the temporary folder before they end lets them
    recreate it. zarr's loop is internal API, so anything unexpected here is ignored.
    """
    try:
        import asyncio

        from zarr.core.sync import sync

        async def others() -> None:
            me = asyncio.current_task()
            await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not me),
                                 return_exceptions=True)

        sync(others(), timeout=30)
    except Exception:  # noqa: BLE001 - best effort: the removal that follows still runs
        pass


# ------------------------------------------------------------------------ block-wise output


def _check_block(block: Any, where: Path, what: str = "block shape") -> tuple[int, int, int]:
    try:
        b = tuple(int(n) for n in block)
    except (TypeError, ValueError):
        b = ()
    if len(b) != 3 or min(b) < 1:
        raise ImageIOError(f"writing {where}: the {what} must be three positive integers "
                           f"(z, y, x), got {block!r}")
    return b[0], b[1], b[2]


def _block_name(index: Sequence[int]) -> str:
    return "_".join(str(int(i)) for i in index)


_BLOCK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)$")


class OutputVolume:
    """A (z, y, x) output written block by block, by one or many processes, resumably.

    Data goes to ``<path>.partial``; each finished block leaves a file in ``<path>.blocks/``
    after its data is flushed. Blocks own disjoint storage (one Zarr shard / chunk each, or
    disjoint bytes of a memory-mapped TIFF), so distinct blocks may be written concurrently.
    TIFF outputs rely on a shared memory map: concurrent writers must be on one machine.
    Made by :func:`create_output`, which takes ``<path>.lock`` for this process (the one run
    writing this output; its workers share it); ``finalize`` and ``abort`` release it.
    Pickling keeps the path and layout (workers reopen), not the lock.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: np.dtype,
                 block: tuple[int, int, int], fmt: str,
                 voxel_size: tuple[float, float, float] | None) -> None:
        self.path = path
        self.shape, self.dtype, self.block = shape, dtype, block
        self.format, self.voxel_size = fmt, voxel_size
        self.n_blocks = tuple(-(-n // b) for n, b in zip(shape, block, strict=True))
        self._partial = path.with_name(path.name + ".partial")
        self._record = path.with_name(path.name + ".blocks")
        self._lock_path = path.with_name(path.name + ".lock")
        self._lock: _Lock | None = None
        self.overwrite = False
        self._offset: int | None = None  # byte offset of TIFF data
        self._zarr: Any = None

    # -- layout
    def block_indices(self) -> list[tuple[int, int, int]]:
        nz, ny, nx = self.n_blocks
        return [(i, j, k) for i in range(nz) for j in range(ny) for k in range(nx)]

    def block_slices(self, index: Sequence[int]) -> tuple[slice, slice, slice]:
        idx = tuple(int(i) for i in index)
        if len(idx) != 3 or not all(0 <= i < n for i, n in zip(idx, self.n_blocks, strict=True)):
            raise IndexError(f"block index {tuple(index)} outside the grid {self.n_blocks}")
        s = tuple(slice(i * b, min((i + 1) * b, n))
                  for i, b, n in zip(idx, self.block, self.shape, strict=True))
        return s[0], s[1], s[2]

    # -- record
    def is_done(self, index: Sequence[int]) -> bool:
        return (self._record / _block_name(index)).exists()

    def done_blocks(self) -> set[tuple[int, int, int]]:
        if not self._record.is_dir():
            return set()
        found = (_BLOCK_NAME.match(p.name) for p in self._record.iterdir())
        return {(int(m[1]), int(m[2]), int(m[3])) for m in found if m}

    def _fingerprint(self, user: Any) -> dict:
        full = {"user": user, "shape": list(self.shape), "dtype": self.dtype.str,
                "block": list(self.block), "format": self.format,
                "voxel_size": list(self.voxel_size) if self.voxel_size else None}
        try:
            return json.loads(json.dumps(full))
        except (TypeError, ValueError) as e:
            raise ImageIOError(f"writing {self.path}: the fingerprint must be JSON-serialisable "
                               f"({_one_line(e)})") from e

    def _record_matches(self, expected: dict) -> bool:
        try:
            found = json.loads((self._record / "fingerprint.json").read_text())
        except (OSError, ValueError):
            return False
        return found == expected and self._partial.exists()

    def _start_over(self, expected: dict) -> None:
        _remove(self._partial)
        _remove(self._record)
        self._record.mkdir()
        self._create_storage()
        # The fingerprint comes last: a record without it is never resumed.
        tmp = self._record / "fingerprint.json.tmp"
        tmp.write_text(json.dumps(expected))
        os.replace(tmp, self._record / "fingerprint.json")

    def _create_storage(self) -> None:
        """The empty partial output: a Zarr array, or a TIFF with its space reserved."""
        if self.format.startswith("ome-zarr"):
            ngff = self.format.rsplit("-", 1)[1]
            self._zarr = _create_zarr(self._partial, self.path.name, self.shape, self.dtype,
                                      self.block, self.voxel_size, ngff)
        else:
            self._create_tiff(self.shape, _tiff_kwargs(self.format, self.voxel_size))

    def _create_tiff(self, shape: tuple[int, ...], kwargs: dict) -> None:
        import tifffile

        mm = tifffile.memmap(self._partial, shape=shape, dtype=self.dtype, **kwargs)
        self._offset = int(mm.offset)
        del mm
        # Reserve the disk space now: a full disk then fails here, as an error, instead of
        # killing a worker with SIGBUS when it touches an unbacked page of the map.
        if hasattr(os, "posix_fallocate"):
            with open(self._partial, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)

    def _tiff_offset(self) -> int:
        if self._offset is None:
            import tifffile

            with tifffile.TiffFile(self._partial) as tif:
                self._offset = int(tif.series[0].dataoffset)
        return self._offset

    # -- writing
    def write_block(self, index: Sequence[int], data: Any) -> None:
        """Store ``data`` as block ``index`` ((i, j, k); (t, c, i, j, k) in an OutputStack) —
        the block's (z, y, x) box shape, smaller at the edges —, cast to ``dtype``, then record
        the block as done."""
        key, box = self._locate(index)
        want = tuple(s.stop - s.start for s in box)
        arr = _to_numpy(data)
        if arr.shape != want:
            raise ImageIOError(f"writing {self.path}: block {tuple(index)} must have shape "
                               f"{want}, got {arr.shape}")
        arr = arr.astype(self.dtype, copy=False)
        try:
            if self.format.startswith("ome-zarr"):
                if self._zarr is None:
                    zarr = _import_zarr(self.path, "to write OME-Zarr")

                    self._zarr = zarr.open_array(str(self._partial / "0"), mode="r+")
                self._zarr[key] = arr
            else:
                self._write_tiff_block(key, box, arr)
            (self._record / _block_name(index)).touch()
        except OSError as e:
            raise _write_error(e, self._partial) from e

    def _locate(self, index: Sequence[int]) -> tuple[tuple, tuple[slice, slice, slice]]:
        """Block ``index``'s key in the stored array and its (z, y, x) box."""
        box = self.block_slices(index)
        return box, box

    def _write_tiff_block(self, key: tuple, box: tuple[slice, slice, slice],
                          arr: np.ndarray) -> None:
        # Map only the z-planes of this block: the flush then covers just them.
        _, ny, nx = self.shape
        plane = ny * nx * self.dtype.itemsize
        mm = np.memmap(self._partial, dtype=self.dtype, mode="r+",
                       offset=self._tiff_offset() + box[0].start * plane,
                       shape=(box[0].stop - box[0].start, ny, nx))
        try:
            mm[:, box[1], box[2]] = arr
            mm.flush()
        finally:
            del mm

    # -- ending
    def _close(self) -> None:
        self._zarr = None

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def finalize(self) -> None:
        """Check every block is done, move the partial onto ``path``, drop the record."""
        every = set(self.block_indices())
        total = len(every)
        missing = total - len(self.done_blocks() & every)
        if missing:
            raise ImageIOError(f"cannot finish {self.path}: {missing} of {total} blocks are not "
                               "written; write them (or rerun to resume) before finalize")
        if not self._partial.exists():
            raise ImageIOError(f"cannot finish {self.path}: {self._partial} is missing; rerun "
                               "the job from the start")
        self._close()
        # Something may have appeared at the path since the run began.
        _check_replaceable(self.path, self.format, self.overwrite)
        try:
            _replace(self._partial, self.path)
        except OSError as e:
            raise _write_error(e, self.path) from e
        _remove(self._record)
        self._release()

    def abort(self, keep_record: bool = True) -> None:
        """Stop writing; keep the partial and record for a resume, or delete both."""
        self._close()
        if not keep_record:
            if self.format.startswith("ome-zarr"):
                _drain_zarr()
            _remove(self._partial)
            _remove(self._record)
        self._release()

    def __enter__(self) -> OutputVolume:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.abort(keep_record=True)
        else:
            self._close()

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "shape": self.shape, "dtype": self.dtype.str,
                "block": self.block, "format": self.format, "voxel_size": self.voxel_size,
                "offset": self._offset, "overwrite": self.overwrite}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Path(state["path"]), tuple(state["shape"]), np.dtype(state["dtype"]),
                      tuple(state["block"]), state["format"], state["voxel_size"])
        self._offset = state["offset"]
        self.overwrite = state.get("overwrite", False)

    def __repr__(self) -> str:
        return (f"OutputVolume({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, "
                f"block={self.block}, format={self.format!r}, "
                f"done={len(self.done_blocks())}/{math.prod(self.n_blocks)})")


def claim_output(path: str | os.PathLike, *, ngff: str = "0.5", overwrite: bool = False,
                 inputs: Sequence[Any] = ()) -> _Lock:
    """Check that a block-wise output may be written at ``path`` and take its lock, before any
    work: the same checks as :func:`create_output` (which shares a lock this process holds).
    Returns the lock; ``release()`` it when done."""
    path = Path(path)
    fmt = _output_format(path, _check_ngff(ngff, path))
    partial, record, lock = (path.with_name(path.name + s) for s in (".partial", ".blocks",
                                                                      ".lock"))
    check_not_inside([path, partial, record, lock], inputs)
    _check_replaceable(path, fmt, overwrite)
    _check_folder(path)
    held = _Lock.take(lock, path)
    try:
        _check_replaceable(partial, fmt, overwrite)
        _check_replaceable(record, fmt, overwrite, record=True)
    except BaseException:
        held.release()
        raise
    return held


def create_output(path: str | os.PathLike, shape: Sequence[int], dtype: Any,
                  block: Sequence[int], *, voxel_size: Sequence[float] | None = None,
                  ngff: str = "0.5", fingerprint: Any = None, resume: bool = True,
                  overwrite: bool = False, inputs: Sequence[Any] = ()) -> OutputVolume:
    """Start (or resume) a block-wise output; see :class:`OutputVolume`.

    ``block`` (bz, by, bx): block (i, j, k) covers ``[i*bz:(i+1)*bz, ...]`` clipped to
    ``shape``. Format by suffix as for :func:`write` (TIFF outputs are uncompressed and
    memory-mapped; BigTIFF when .ome.tif outgrows 4 GB, ImageJ .tif planes must stay under
    4 GiB). With ``resume`` and a partial whose fingerprint (``fingerprint``, a JSON-able
    dict, plus shape, dtype, block, format and voxel size) matches, its finished blocks are
    kept; otherwise any stale partial is cleared and writing starts over.

    Safety: an existing ``path`` (and ``<path>.partial`` / ``.blocks``) is replaced only when
    rln_fast wrote it (a TIFF file for a TIFF output; a Zarr folder holding rln_fast's marker
    and nothing added) unless ``overwrite``; ``inputs`` (paths the job reads) must not be,
    hold or lie inside the output. ``<path>.lock`` is taken before anything is reserved: a
    second writer gets :class:`ImageIOError` naming the holder; the lock of a dead process
    is taken over. Every refusal is one line.
    """
    path = Path(path)
    ngff = _check_ngff(ngff, path)
    fmt = _output_format(path, ngff)
    dt = np.dtype(dtype)
    if fmt == "imagej-tiff":
        _check_imagej_dtype(dt, path)
    shp = _check_block(shape, path, "shape")
    out = OutputVolume(path, shp, dt, _check_block(block, path), fmt,
                       _check_voxel_size(voxel_size, f"writing {path}"))
    out.overwrite = bool(overwrite)
    expected = out._fingerprint(fingerprint)
    _check_tiff_size(fmt, shp, dt, path)
    out._lock = claim_output(path, ngff=ngff, overwrite=overwrite, inputs=inputs)
    try:
        if not (resume and out._record_matches(expected)):
            out._start_over(expected)
    except OSError as e:
        out.abort(keep_record=False)
        raise _write_error(e, path) from e
    except BaseException:
        out._release()
        raise
    return out


# ------------------------------------------------------------------------ block-wise stacks

_STACK_BLOCK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)_(\d+)$")


def stack_output_axes(path: str | os.PathLike, axes: str, ngff: str = "0.5") -> str:
    """The axis order an output at ``path`` gets for an input with ``axes`` (some of t, c and
    z, y, x): the input's own when the format holds it (OME-TIFF: any order of t, c, z before
    y, x), else the format's: ImageJ hyperstacks are TZCYX, OME-Zarr puts t, c before z, y, x."""
    fmt = _output_format(Path(path), _check_ngff(ngff, Path(path)))
    low = axes.lower()
    if fmt == "ome-tiff" and low.endswith("yx"):
        return low
    order = "tzcyx" if fmt == "imagej-tiff" else "tczyx"
    return "".join(a for a in order if a in low)


class OutputStack(OutputVolume):
    """A multi-volume output (axes of t, c, z, y, x) written volume by volume, block by block,
    by one or many processes, resumably: :class:`OutputVolume` with one more level.

    Block ``(t, c, i, j, k)`` is block (i, j, k) of the (z, y, x) volume at time point ``t``,
    channel ``c`` of the output; each is recorded in ``<path>.blocks/`` when written.
    ``volume(t, c)`` is that volume as an OutputVolume-like writer (what BlockJob.run takes).
    The metadata (channel names, time increment, processing record) is in the partial from
    the start, so ``finalize`` only checks and renames. Made by :func:`create_stack_output`.
    """

    def __init__(self, path: Path, axes: str, n_time: int, n_channels: int,
                 shape: tuple[int, int, int], dtype: np.dtype, block: tuple[int, int, int],
                 fmt: str, voxel_size: tuple[float, float, float] | None,
                 meta: dict | None = None) -> None:
        super().__init__(path, shape, dtype, block, fmt, voxel_size)
        self.axes, self.n_time, self.n_channels = axes, int(n_time), int(n_channels)
        sizes = {"t": self.n_time, "c": self.n_channels, "z": shape[0], "y": shape[1],
                 "x": shape[2]}
        self.full_shape = tuple(sizes[a] for a in axes)
        self.meta = dict(meta or {})
        self.meta["n_channels"] = self.n_channels

    # -- layout
    def block_indices(self) -> list[tuple[int, ...]]:  # type: ignore[override]
        inner = super().block_indices()
        return [(t, c, *b) for t in range(self.n_time) for c in range(self.n_channels)
                for b in inner]

    def volume(self, t: int, c: int) -> _StackVolumeOutput:
        if not (0 <= t < self.n_time and 0 <= c < self.n_channels):
            raise IndexError(f"{self.path}: no volume t={t}, c={c} (the output has "
                             f"{self.n_time} time points, {self.n_channels} channels)")
        return _StackVolumeOutput(self, int(t), int(c))

    def _key(self, index: Sequence[int]) -> tuple:
        t, c, *ijk = (int(i) for i in index)
        if not (0 <= t < self.n_time and 0 <= c < self.n_channels):
            raise IndexError(f"block index {tuple(index)} outside the output's t, c")
        box = dict(zip("zyx", self.block_slices(ijk), strict=True))
        return tuple(t if a == "t" else c if a == "c" else box[a] for a in self.axes)

    # -- record
    def done_blocks(self) -> set[tuple[int, ...]]:  # type: ignore[override]
        if not self._record.is_dir():
            return set()
        found = (_STACK_BLOCK_NAME.match(p.name) for p in self._record.iterdir())
        return {tuple(int(m[i]) for i in range(1, 6)) for m in found if m}

    def _fingerprint(self, user: Any) -> dict:
        full = super()._fingerprint(user)
        full.update(axes=self.axes, full_shape=list(self.full_shape),
                    meta=json.loads(json.dumps(self.meta, default=str)))
        return full

    def _create_storage(self) -> None:
        if self.format.startswith("ome-zarr"):
            ngff = self.format.rsplit("-", 1)[1]
            block = tuple({"t": 1, "c": 1, "z": self.block[0], "y": self.block[1],
                           "x": self.block[2]}[a] for a in self.axes)
            self._zarr = _create_zarr(self._partial, self.path.name, self.full_shape,
                                      self.dtype, block, self.voxel_size, ngff, self.axes,
                                      self.meta)
        else:
            self._create_tiff(self.full_shape,
                              _tiff_kwargs(self.format, self.voxel_size, self.axes, self.meta,
                                           self.full_shape))

    # -- writing
    def _locate(self, index: Sequence[int]) -> tuple[tuple, tuple[slice, slice, slice]]:
        """Block ``(t, c, i, j, k)``: its key in the stored array, its (z, y, x) box."""
        if len(index) != 5:
            raise IndexError(f"a stack's block index is (t, c, i, j, k), got {tuple(index)}")
        return self._key(index), self.block_slices(index[2:])

    def _write_tiff_block(self, key: tuple, box: tuple[slice, slice, slice],
                          arr: np.ndarray) -> None:
        # The planes (y, x) of one volume are not adjacent in the file (other channels or
        # time points lie between): map the span they cover, write each plane, flush.
        lead = self.full_shape[:-2]
        zdim = self.axes.index("z")
        planes = []
        for z in range(box[0].start, box[0].stop):
            idx = [z if d == zdim else int(k) for d, k in enumerate(key[:-2])]
            planes.append(int(np.ravel_multi_index(idx, lead)) if lead else 0)
        ny, nx = self.full_shape[-2:]
        plane = ny * nx * self.dtype.itemsize
        p0, p1 = min(planes), max(planes)
        mm = np.memmap(self._partial, dtype=self.dtype, mode="r+",
                       offset=self._tiff_offset() + p0 * plane, shape=(p1 - p0 + 1, ny, nx))
        try:
            for k, p in enumerate(planes):
                mm[p - p0, box[1], box[2]] = arr[k]
            mm.flush()
        finally:
            del mm

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(axes=self.axes, n_time=self.n_time, n_channels=self.n_channels,
                     meta=self.meta)
        return state

    def __setstate__(self, state: dict) -> None:
        OutputStack.__init__(self, Path(state["path"]), state["axes"], state["n_time"],
                             state["n_channels"], tuple(state["shape"]),
                             np.dtype(state["dtype"]), tuple(state["block"]), state["format"],
                             state["voxel_size"], state["meta"])
        self._offset = state["offset"]
        self.overwrite = state.get("overwrite", False)

    def __repr__(self) -> str:
        return (f"OutputStack({str(self.path)!r}, axes={self.axes!r}, shape={self.full_shape}, "
                f"dtype={self.dtype}, block={self.block}, format={self.format!r}, "
                f"done={len(self.done_blocks())}/{len(self.block_indices())})")


class _StackVolumeOutput:
    """Volume (t, c) of an :class:`OutputStack`, written as an :class:`OutputVolume` is:
    ``write_block((i, j, k), data)``, ``block_slices``, ``is_done``, ``done_blocks``.
    Picklable (the stack reopens its storage in a worker)."""

    def __init__(self, stack: OutputStack, t: int, c: int) -> None:
        self.stack, self.t, self.c = stack, t, c
        self.path, self.shape, self.block = stack.path, stack.shape, stack.block
        self.dtype, self.n_blocks = stack.dtype, stack.n_blocks

    def block_indices(self) -> list[tuple[int, int, int]]:
        return OutputVolume.block_indices(self.stack)

    def block_slices(self, index: Sequence[int]) -> tuple[slice, slice, slice]:
        return self.stack.block_slices(index)

    def is_done(self, index: Sequence[int]) -> bool:
        return self.stack.is_done((self.t, self.c, *index))

    def done_blocks(self) -> set[tuple[int, int, int]]:
        return {b[2:] for b in self.stack.done_blocks() if b[:2] == (self.t, self.c)}

    def write_block(self, index: Sequence[int], data: Any) -> None:
        self.stack.write_block((self.t, self.c, *index), data)

    def __repr__(self) -> str:
        return f"<volume t={self.t}, c={self.c} of {self.stack!r}>"


def create_stack_output(path: str | os.PathLike, axes: str, n_time: int, n_channels: int,
                        shape: Sequence[int], dtype: Any, block: Sequence[int], *,
                        voxel_size: Sequence[float] | None = None,
                        channel_names: Sequence[str] | None = None,
                        time_increment: float | None = None, time_unit: str | None = None,
                        processing: Any = None, omero_channels: Any = None, ngff: str = "0.5",
                        fingerprint: Any = None, resume: bool = True, overwrite: bool = False,
                        inputs: Sequence[Any] = ()) -> OutputStack:
    """Start (or resume) a multi-volume output; see :class:`OutputStack`.

    ``axes``: the input's axes (some of t, c and z, y, x); the output keeps their order where
    its format allows (:func:`stack_output_axes`; ``out.axes`` says). ``n_time`` x
    ``n_channels`` volumes of ``shape`` (z, y, x), split into ``block``s as in
    :func:`create_output`. Metadata, kept as each format keeps it: ``voxel_size`` (dz, dy, dx)
    µm, ``channel_names``, ``time_increment`` in ``time_unit`` (NGFF names: "second",
    "minute", ...), ``processing`` (a JSON-able record of what was done, in the OME
    Description, the ImageJ Info property or the NGFF attribute "rln_fast"), and for
    OME-Zarr the input's ``omero_channels`` (colours, windows). Resume, safety and the lock
    as for :func:`create_output`.
    """
    path = Path(path)
    ngff = _check_ngff(ngff, path)
    fmt = _output_format(path, ngff)
    dt = np.dtype(dtype)
    if fmt == "imagej-tiff":
        _check_imagej_dtype(dt, path)
    from rln_fast.stack import check_axes

    low = check_axes(axes, len(axes))
    out_axes = stack_output_axes(path, low, ngff)
    shp = _check_block(shape, path, "shape")
    if channel_names is not None and len(channel_names) != n_channels:
        raise ImageIOError(f"writing {path}: {len(channel_names)} channel names for "
                           f"{n_channels} channels")
    if ("t" not in low and n_time != 1) or ("c" not in low and n_channels != 1):
        raise ImageIOError(f"writing {path}: axes {axes!r} have no t or c axis for "
                           f"{n_time} time points, {n_channels} channels")
    unit = _time_unit(time_unit) if time_increment else None
    meta = {"channel_names": list(channel_names) if channel_names else None,
            "time_increment": _positive(time_increment), "time_unit": unit,
            "processing": processing, "omero_channels": omero_channels}
    out = OutputStack(path, out_axes, n_time, n_channels, shp, dt, _check_block(block, path),
                      fmt, _check_voxel_size(voxel_size, f"writing {path}"), meta)
    out.overwrite = bool(overwrite)
    expected = out._fingerprint(fingerprint)
    _check_tiff_size(fmt, shp, dt, path)
    out._lock = claim_output(path, ngff=ngff, overwrite=overwrite, inputs=inputs)
    try:
        if not (resume and out._record_matches(expected)):
            out._start_over(expected)
    except OSError as e:
        out.abort(keep_record=False)
        raise _write_error(e, path) from e
    except BaseException:
        out._release()
        raise
    return out
