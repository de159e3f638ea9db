"""Multi-channel and time-lapse stacks: axis names, (t, c) selections and per-channel settings.

A stack is an array or file whose axes are some of ``t`` (time), ``c`` (channel), ``z``, ``y``,
``x``, each at most once, in any order, always with z, y and x. Every (t, c) pair is one 3-D
volume that the single-volume code deconvolves on its own. Settings given per channel (PSF,
model, iterations, background) take one value for all channels, a list with one value per
channel of the input, or a dict ``{channel: value}``. :func:`deconvolve_stack` runs an
in-memory stack through the single-volume APIs, one (t, c) volume at a time.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["AXES", "check_axes", "deconvolve_stack", "parse_selection", "per_channel"]

AXES = "tczyx"  # the letters a stack's axes may use


def check_axes(axes: Any, ndim: int, name: str = "axes") -> str:
    """``axes`` in lower case after checking it names each of ``ndim`` dimensions once.

    >>> check_axes("CZYX", 4)
    'czyx'
    """
    if not isinstance(axes, str):
        raise TypeError(f"{name} must be a string such as 'tczyx', got {type(axes).__name__}")
    low = axes.lower()
    bad = sorted(set(low) - set(AXES))
    if bad:
        raise ValueError(f"{name}={axes!r}: unknown axis letter(s) {', '.join(map(repr, bad))}; "
                         "use t (time), c (channel), z, y, x")
    twice = sorted({a for a in low if low.count(a) > 1})
    if twice:
        raise ValueError(f"{name}={axes!r} names {', '.join(map(repr, twice))} more than once")
    missing = [a for a in "zyx" if a not in low]
    if missing:
        raise ValueError(f"{name}={axes!r} has no {', '.join(map(repr, missing))} axis; every "
                         "volume needs z, y and x")
    if len(low) != ndim:
        raise ValueError(f"{name}={axes!r} names {len(low)} axes but the data has {ndim} "
                         "dimensions")
    return low


def _index(text: str, n: int, what: str, full: str) -> int:
    try:
        i = int(text)
    except ValueError:
        raise ValueError(f"{what} selection {full!r}: {text!r} is not an integer; write e.g. "
                         "'0,2' or '0:50'") from None
    if not -n <= i < n:
        raise ValueError(f"{what} selection {full!r}: {i} is out of range; the input has {n} "
                         f"{what}{'s' if n != 1 else ''} (0..{n - 1})")
    return i % n


def _bound(text: str, what: str, full: str) -> int | None:
    if text.strip() == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what} selection {full!r}: {text!r} is not an integer; write e.g. "
                         "'0:50' or '::2'") from None


def parse_selection(selection: Any, n: int, what: str = "channel") -> list[int]:
    """The indices, sorted and unique, that ``selection`` picks out of ``n``.

    ``selection``: None (all), an int, an iterable of ints, a ``slice`` or ``range``, or text
    as on the command line: comma-separated indices and Python slices (``"0,2"``, ``"0:50"``,
    ``"::2"``, ``"0:10,20"``). Negative indices count from the end; a slice stops before its
    end, as in Python. An index out of range or an empty result raises ValueError.
    """
    if selection is None:
        return list(range(n))
    full = str(selection)
    picked: set[int] = set()
    if isinstance(selection, (slice, range)):
        picked.update(range(n)[selection] if isinstance(selection, slice)
                      else (_index(str(i), n, what, full) for i in selection))
    elif isinstance(selection, (int, np.integer)) and not isinstance(selection, bool):
        picked.add(_index(str(int(selection)), n, what, full))
    elif isinstance(selection, str):
        for part in selection.split(","):
            part = part.strip()
            if ":" in part:
                bits = part.split(":")
                if len(bits) > 3:
                    raise ValueError(f"{what} selection {full!r}: {part!r} is not a slice "
                                     "start:stop[:step]")
                start, stop, *step = (_bound(b, what, full) for b in bits)
                if step and step[0] == 0:
                    raise ValueError(f"{what} selection {full!r}: the step must not be 0")
                picked.update(range(n)[slice(start, stop, step[0] if step else None)])
            elif part:
                picked.add(_index(part, n, what, full))
    elif isinstance(selection, Sequence) or hasattr(selection, "__iter__"):
        for i in selection:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"{what} selection {full!r}: {i!r} is not an integer")
            picked.add(_index(str(int(i)), n, what, full))
    else:
        raise TypeError(f"{what} selection must be None, an int, indices, a slice or text such "
                        f"as '0,2' or '0:50', got {type(selection).__name__}")
    if not picked:
        raise ValueError(f"{what} selection {full!r} picks none of the {n} {what}s")
    return sorted(picked)


def _is_one_value(value: Any) -> bool:
    """True for what counts as one setting even though it may be iterable: text, paths,
    arrays and tensors (a PSF), models."""
    return (isinstance(value, (str, bytes, os.PathLike)) or hasattr(value, "shape")
            or not isinstance(value, (Sequence, Mapping)))


def per_channel(value: Any, n: int, name: str, selected: Sequence[int] | None = None) -> list[Any]:
    """One value of the setting ``name`` per channel (a list of ``n``).

    ``value``: one value for every channel (a number, text, path, array, model or None); a
    list or tuple of ``n`` values, one per channel of the input, in order — or, when the run
    deconvolves only the channels ``selected``, one per selected channel; or a dict
    ``{channel index: value}`` where channels left out get None (the setting's default).
    """
    if _is_one_value(value):
        return [value] * n
    if (selected is not None and not isinstance(value, Mapping)
            and len(value) == len(selected) != n):
        value = dict(zip(selected, value, strict=True))
    if isinstance(value, Mapping):
        out: list[Any] = [None] * n
        for key, v in value.items():
            if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
                raise TypeError(f"{name}: per-channel dict keys must be channel indices, got "
                                f"{key!r}")
            if not -n <= int(key) < n:
                raise ValueError(f"{name}: channel {int(key)} is out of range; the input has "
                                 f"{n} channel{'s' if n != 1 else ''}")
            out[int(key) % n] = v
        return out
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values given for {n} channel"
                         f"{'s' if n != 1 else ''}; give one value, one per channel, or a dict "
                         "{channel: value}")
    return values


# ------------------------------------------------------------------------ deconvolve_stack

_METHODS = ("rln", "rl")
# Arguments of the single-volume APIs that deconvolve_stack sets itself.
_OWN = {"rl": {"image", "psf", "num_iter", "background", "progress", "method"},
        "rln": {"volume", "model", "progress"}}


def _with_message(e: Exception, message: str) -> Exception:
    """An exception of ``e``'s type with ``message`` (ValueError/TypeError when that type
    cannot be built from a message alone)."""
    try:
        return type(e)(message)
    except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError wants five arguments
        return (TypeError if isinstance(e, TypeError) else ValueError)(message)


def _kind(array: Any) -> str:
    """"numpy", "torch", "cupy", or "lazy" (another array type, read one volume at a time)."""
    if isinstance(array, np.ndarray):
        return "numpy"
    module = type(array).__module__.split(".")[0]
    if module in ("torch", "cupy"):
        return module
    if all(hasattr(array, a) for a in ("shape", "ndim", "dtype", "__getitem__")):
        return "lazy"  # dask, zarr, h5py, ...: numpy out
    raise TypeError(f"deconvolve_stack: array must be a numpy array, torch tensor or cupy array "
                    f"(or an array-like with shape, dtype and indexing), got "
                    f"{type(array).__name__}")


def _check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against the keywords of the single-volume API of ``method``;
    ``rl_method`` becomes richardson_lucy's ``method`` ("fft" or "direct")."""
    if method == "rl":
        from rln_fast.rl import richardson_lucy as api
    else:
        from rln_fast.deconvolve import rln_deconvolve as api
    allowed = sorted(set(inspect.signature(api).parameters) - _OWN[method]
                     | ({"rl_method"} if method == "rl" else set()))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"deconvolve_stack: unknown option(s) {', '.join(map(repr, unknown))} "
                        f"for method={method!r}; its options are {', '.join(allowed)}")
    out = dict(options)
    if "rl_method" in out:
        out["method"] = out.pop("rl_method")
    return out


def _channel_psf(psf: Any, wavelength: Any, c: int, shape: tuple[int, ...],
                 voxel_size: tuple[float, float, float] | None, na: Any, ni: float,
                 psf_shape: Any) -> Any:
    """Channel ``c``'s PSF for richardson_lucy: the array given, a file read (and resampled
    to ``voxel_size`` when the file's voxel size differs), or Born–Wolf from the optics."""
    from rln_fast import psf as psf_models

    if psf is not None and wavelength is not None:
        raise ValueError(f"deconvolve_stack: channel {c} has both a PSF and a wavelength; give "
                         "one (the wavelength generates a Born–Wolf PSF)")
    if isinstance(psf, (str, os.PathLike)):
        if not os.path.isfile(psf) and not os.path.isdir(psf):
            raise FileNotFoundError(f"deconvolve_stack: channel {c}: PSF file {os.fspath(psf)!r} "
                                    "does not exist")
        return psf_models.read(psf, voxel_size)
    if psf is not None:
        return psf
    if wavelength is None:
        raise ValueError(f"deconvolve_stack: channel {c} has no PSF; Richardson–Lucy needs psf= "
                         "(an array or a file, one per channel) or the emission wavelength= "
                         "(µm) with na= and voxel_size=")
    missing = [n for n, v in (("na", na), ("voxel_size", voxel_size)) if v is None]
    if missing:
        raise ValueError(f"deconvolve_stack: channel {c}: a PSF generated from wavelength= "
                         f"needs {' and '.join(n + '=' for n in missing)}")
    try:
        return psf_models.for_image(shape, voxel_size, na=na, wavelength=wavelength, ni=ni,
                                    shape=psf_shape)
    except (TypeError, ValueError) as e:
        raise _with_message(e, f"deconvolve_stack: channel {c}: Born–Wolf PSF: {e}") from None


def _rln_device(array: Any, kind: str, device: Any) -> Any:
    """Where rln_deconvolve runs the network for this input (its own rule)."""
    import torch

    if device is not None:
        return torch.device(device)
    if kind == "torch":
        return array.device
    if kind == "cupy":
        return torch.device("cuda", array.device.id)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _empty(kind: str, like: Any, shape: tuple[int, ...]) -> Any:
    if kind == "torch":
        import torch

        return torch.empty(shape, dtype=torch.float32, device=like.device)
    if kind == "cupy":
        import cupy

        with like.device:
            return cupy.empty(shape, dtype=cupy.float32)
    return np.empty(shape, dtype=np.float32)


def _zyx(view: Any, perm: list[int], kind: str) -> Any:
    """A (z, y, x) view of a volume whose axes are in the stack's order."""
    return view.permute(perm) if kind == "torch" else view.transpose(perm)


def _read_volume(array: Any, index: tuple, perm: list[int], kind: str) -> Any:
    """The (z, y, x) volume at ``index``, C-contiguous (a view when it already is)."""
    if kind == "torch":
        return array[index].permute(perm).contiguous()
    if kind == "cupy":
        import cupy

        return cupy.ascontiguousarray(array[index].transpose(perm))
    return np.ascontiguousarray(np.asarray(array[index]).transpose(perm))


def deconvolve_stack(
    array: Any,
    axes: str = "tczyx",
    *,
    method: str = "rln",
    psf: Any = None,
    model: Any = None,
    num_iter: Any = None,
    background: Any = None,
    channels: Any = None,
    time: Any = None,
    voxel_size: Sequence[float] | None = None,
    wavelength: Any = None,
    na: float | None = None,
    ni: float = 1.515,
    psf_shape: Sequence[int] | None = None,
    progress: bool = True,
    volume_callback: Callable[[int, int], Any] | None = None,
    **options: Any,
) -> Any:
    """Deconvolve a multi-channel and/or time-lapse stack, one (t, c) volume at a time.

    Each (t, c) volume goes through ``rln_deconvolve`` (method "rln") or ``richardson_lucy``
    (method "rl") with that API's defaults for whatever is not given, so every volume of the
    result equals, bit for bit, what that API returns for that volume alone.

    Args:
        array: numpy array, torch tensor (any device) or cupy array; the result has the same
            type and device. Another array type with shape, dtype and indexing (dask, zarr)
            is read one volume at a time and gives numpy.
        axes: the array's axes, some of t (time), c (channel), z, y, x in any order, each
            once, always with z, y and x (e.g. "tczyx", "czyx", "zcyx", "tzyx", "zyx").
        method: "rln" (the network) or "rl" (Richardson–Lucy).
        psf: "rl": the PSF of each channel, (z, y, x): an array or a file (TIFF, Zarr, .npy;
            resampled to ``voxel_size`` when the file's own voxel size differs). One for all
            channels, a list with one per channel, or a dict {channel: psf}.
        model: "rln": None (the shipped model), a path written by ``RLN.save``, an RLN or a
            FusedRLN; per channel as ``psf``. Each channel's model is loaded once.
        num_iter, background: "rl": iterations and background per channel (None: the API's
            defaults, 20 and "auto").
        channels: the channels to deconvolve (``parse_selection``: "0,2", [0, 2], None for
            all); the others pass through unchanged, as float32.
        time: the time points to deconvolve and return (e.g. "0:50"); the others are left out
            of the result. None: all.
        voxel_size: (dz, dy, dx) in µm of every volume, for generated PSFs and PSF files.
        wavelength: "rl": emission wavelength(s) in µm, per channel as ``psf``: a channel
            without a PSF gets a widefield Born–Wolf PSF (``rln_fast.psf.born_wolf``) from
            its wavelength, ``na``, ``ni`` and ``voxel_size``, on a ``psf_shape`` grid
            (default: ``rln_fast.psf.generated_shape`` of the volume, cropped to the support).
        progress: a tqdm bar over the volumes (the APIs' own bars are off).
        volume_callback: called as ``volume_callback(done, total)`` after each deconvolved
            volume; an exception it raises stops the run and propagates.
        options: the other keywords of the single-volume API, the same for every volume:
            "rln": normalize, rescale, device, tile, memory_budget; "rl": acceleration, tv,
            edges, device, callback, rtol, tile, memory_budget, and ``rl_method`` for
            richardson_lucy's own ``method`` ("fft" or "direct").

    Returns:
        float32, the input's axes in the input's order; the t axis holds the selected time
        points. The output is allocated once; one volume is deconvolved at a time.
    """
    if method not in _METHODS:
        raise ValueError(f"deconvolve_stack: method must be 'rln' or 'rl', got {method!r}")
    kind = _kind(array)
    if kind == "torch":
        array = array.detach()
    try:
        axes = check_axes(axes, len(array.shape))
    except (TypeError, ValueError) as e:
        raise type(e)(f"deconvolve_stack: {e}") from None
    given = {"psf": psf, "num_iter": num_iter, "background": background,
             "wavelength": wavelength, "na": na, "psf_shape": psf_shape} if method == "rln" \
        else {"model": model}
    wrong = [name for name, v in given.items() if v is not None]
    if wrong:
        other = "rl" if method == "rln" else "rln"
        raise ValueError(f"deconvolve_stack: {', '.join(n + '=' for n in wrong)} "
                         f"{'applies' if len(wrong) == 1 else 'apply'} to method={other!r} "
                         f"only, not {method!r}")
    options = _check_options(method, options)
    from rln_fast.io import _check_voxel_size  # the same check as the file writers'

    voxel = _check_voxel_size(voxel_size, "deconvolve_stack", ValueError)
    shape = tuple(int(n) for n in array.shape)
    nt = shape[axes.index("t")] if "t" in axes else 1
    nc = shape[axes.index("c")] if "c" in axes else 1
    for name, sel, letter in (("channels", channels, "c"), ("time", time, "t")):
        if sel is not None and letter not in axes:
            raise ValueError(f"deconvolve_stack: {name}={sel!r} given but axes={axes!r} has no "
                             f"{letter!r} axis")
    try:
        chosen = parse_selection(channels, nc, "channel")
        times = parse_selection(time, nt, "time point")
        settings = {name: per_channel(value, nc, name, chosen) for name, value in
                    (("psf", psf), ("model", model), ("num_iter", num_iter),
                     ("background", background), ("wavelength", wavelength))}
    except (TypeError, ValueError) as e:
        raise type(e)(f"deconvolve_stack: {e}") from None

    rest = [a for a in axes if a in "zyx"]  # the order of z, y, x in one volume's view
    perm = [rest.index(a) for a in "zyx"]
    vshape = tuple(shape[axes.index(a)] for a in "zyx")

    # Per-channel settings resolved once, before any volume runs.
    run: dict[int, Callable[[Any], Any]] = {}
    if method == "rl":
        from rln_fast.rl import richardson_lucy

        for c in chosen:
            kw = dict(options)
            if settings["num_iter"][c] is not None:
                kw["num_iter"] = settings["num_iter"][c]
            if settings["background"][c] is not None:
                kw["background"] = settings["background"][c]
            k = _channel_psf(settings["psf"][c], settings["wavelength"][c], c, vshape, voxel,
                             na, ni, psf_shape)
            run[c] = (lambda v, k=k, kw=kw: richardson_lucy(v, k, progress=False, **kw))
    else:
        from rln_fast.deconvolve import _resolve_model, rln_deconvolve

        dev = _rln_device(array, kind, options.get("device"))
        fused: dict[Any, Any] = {}
        for c in chosen:
            m = settings["model"][c]
            key = os.fspath(m) if isinstance(m, (str, os.PathLike)) else id(m)
            if key not in fused:
                fused[key] = _resolve_model(m, dev)
            run[c] = (lambda v, f=fused[key]: rln_deconvolve(v, f, progress=False, **options))

    out_shape = tuple(len(times) if a == "t" else n for a, n in zip(axes, shape, strict=True))
    out = _empty(kind, array, out_shape)
    total = len(times) * len(chosen)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm  # noqa: PLC0415 - optional dependency

            bar = tqdm(total=total, desc="deconvolve_stack", unit="volume", leave=False)
        except ImportError:
            pass
    done = 0
    try:
        for j, t in enumerate(times):
            for c in range(nc):
                src = tuple(t if a == "t" else c if a == "c" else slice(None) for a in axes)
                dst = tuple(j if a == "t" else c if a == "c" else slice(None) for a in axes)
                target = _zyx(out[dst], perm, kind)
                if c not in run:  # passed through, as float32
                    vol = array[src] if kind != "lazy" else np.asarray(array[src])
                    target[...] = _zyx(vol, perm, kind)
                    continue
                try:
                    result = run[c](_read_volume(array, src, perm, kind))
                except (TypeError, ValueError) as e:  # which volume, for a one-line error
                    where = ", ".join(f"{a}={i}" for a, i in (("t", t), ("c", c)) if a in axes)
                    raise _with_message(e, f"deconvolve_stack: volume {where or '(z, y, x)'}: "
                                           f"{e}") from None
                target[...] = result
                done += 1
                if bar is not None:
                    bar.update(1)
                if volume_callback is not None:
                    volume_callback(done, total)
    finally:
        if bar is not None:
            bar.close()
    return out
