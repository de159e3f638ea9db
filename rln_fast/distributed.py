"""Deconvolution of volumes on disk, block by block: in this process, or one task per block on a
Dask cluster; and ``map_overlap`` for a dask array already in hand.

Every block reads its core plus halo from the input (TIFF or Zarr, never the whole file),
runs RLN or RL on the chosen device and writes its core to the output, which records the
block as done; a rerun skips recorded blocks, so an interrupted run resumes. RLN blocks give
exactly the untiled result (tiling.py says why); RL blocks differ at the seams by the
amount tests/test_tiling.py measures. dask, distributed and zarr are imported only here,
inside the functions that use them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time as _time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rln_fast import io, tiling
from rln_fast.stack import parse_selection, per_channel

__all__ = ["BlockJob", "deconvolve_file", "make_job", "map_overlap"]

_METHODS = ("rln", "rl")


def _pick_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU here; "
                           "use --device cpu or install a CUDA build of torch")
    return dev


@dataclass
class BlockJob:
    """What one block needs, picklable (sent to Dask workers): the method and its parameters,
    the volume's normalisation statistics, and the device name (None: CUDA when there is
    one on the worker)."""

    method: str
    halo: tuple[int, int, int]
    even: bool
    fused: Any = None                # FusedRLN on the CPU (rln)
    normalize: str | None = "global"
    rescale: bool = True
    stats: tuple[float, float] = (0.0, 0.0)
    zero: bool = False               # (rln) the whole volume is 0: every block is 0
    psf: np.ndarray | None = None    # (rl)
    rl: dict[str, Any] = field(default_factory=dict)
    device: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What the output depends on, for the resume record (JSON-able)."""
        h = hashlib.sha256()
        if self.fused is not None:
            for k, v in sorted(self.fused.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        if self.psf is not None:
            h.update(np.ascontiguousarray(self.psf, np.float32).tobytes())
        return {"method": self.method, "halo": list(self.halo), "normalize": self.normalize,
                "rescale": self.rescale, "stats": [float(s) for s in self.stats],
                "zero": self.zero,
                "rl": {k: v for k, v in sorted(self.rl.items())}, "weights": h.hexdigest()}

    def compute(self, block: np.ndarray, callback: Any = None) -> torch.Tensor:
        """The deconvolved outer box (float32, on the compute device). ``callback``: RL only,
        richardson_lucy's callback(i, estimate) after each iteration (progress)."""
        dev = _pick_device(self.device)
        x = torch.from_numpy(np.asarray(block)).to(dev, torch.float32)
        if self.zero:
            return torch.zeros_like(x)
        if self.method == "rln":
            from rln_fast.deconvolve import _rln_block

            if self.fused.w_e1.device != dev:
                self.fused = self.fused.to(dev)
            mi, ma = self.stats
            return _rln_block(x, self.fused, mi, ma, self.normalize, self.rescale)
        from rln_fast.rl import clear_otf_cache, richardson_lucy

        # Blocks at the volume's edges differ in shape: the OTF cache would hold one spectrum
        # per shape (up to 8) beside the budget's one. One FFT per block rebuilds it.
        clear_otf_cache()
        return richardson_lucy(x, self.psf, device=dev, progress=False, callback=callback,
                               **self.rl)

    def run(self, source: io.Volume, out: io.OutputVolume, tile: tiling.Tile,
            callback: Any = None) -> tuple[int, ...]:
        """Read the tile's outer box, deconvolve it, write its core; returns the block index."""
        y = self.compute(source[tile.outer], callback)
        out.write_block(tile.index, y[tile.inner].cpu().numpy())
        del y
        _trim_heap()
        return tile.index


@functools.cache
def _malloc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the system after a block (glibc). Blocks differ in
    shape at the volume's edges; once glibc has raised its mmap threshold, their freed
    buffers stay in the heap, fragmented and resident: measured +100 MiB over 16 RL blocks,
    beyond the budget."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _load_model(model: Any, official_checkpoint: Any) -> Any:
    from rln_fast.models.rln import RLN, FusedRLN

    if official_checkpoint is not None:
        if model not in (None, "default"):
            raise ValueError("give a model or an official checkpoint, not both")
        model = RLN.from_official_checkpoint(str(official_checkpoint))
    elif model is None or model == "default":
        model = RLN.from_pretrained()
    elif isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise FileNotFoundError(f"model file {model} does not exist; give a file written by "
                                    "RLN.save / rln-fast train, or 'default'")
        model = RLN.load(model)
    if isinstance(model, RLN):
        model = model.eval().fuse()
    if not isinstance(model, FusedRLN):
        raise TypeError(f"model must be an RLN, a FusedRLN, a path or 'default', got "
                        f"{type(model).__name__}")
    return model.to("cpu", torch.float32).eval()


def _load_psf(psf: Any, image_voxel: Any) -> np.ndarray:
    if psf is None:
        raise ValueError("Richardson-Lucy needs a PSF: give psf= (a file or an array); "
                         "`rln-fast psf` makes one from the optics")
    if isinstance(psf, (str, os.PathLike)):
        from rln_fast import psf as psf_models

        psf = psf_models.read(psf, image_voxel)
    k = np.asarray(psf, dtype=np.float32)
    if k.ndim != 3:
        raise ValueError(f"the PSF must be 3-D (z, y, x), got shape {k.shape}")
    if not np.isfinite(k).all() or not k.sum() > 0:
        raise ValueError("the PSF must be finite with a positive sum (it is all zeros, "
                         "negative or has NaN/Inf)")
    return k


def make_job(volume: Any, *, method: str = "rln", model: Any = None,
             official_checkpoint: Any = None, psf: Any = None, num_iter: int = 20,
             rl_options: dict[str, Any] | None = None, normalize: str | None = "global",
             rescale: bool = True, device: Any = None, voxel_size: Any = None,
             progress: bool = False, memory_budget: Any = None) -> BlockJob:
    """The BlockJob for ``volume`` (anything with shape, dtype and box reads): checks the
    volume (real numbers; finite; for RL, not too large for float32), loads the model or PSF
    and, for RLN, takes the normalisation percentiles over the whole volume. Whole-volume
    passes read slabs sized to ``memory_budget`` (bytes or "4GB"; None: 16 M voxels)."""
    from rln_fast.deconvolve import check_dtype

    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    check_dtype(volume.dtype)
    slab = _slab_voxels(memory_budget)
    dev = None if device is None else str(_pick_device(device))
    if method == "rln":
        from rln_fast.deconvolve import _NORMALIZE, norm_percentiles

        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        normalize = None if normalize == "none" else normalize
        # "official" takes the same whole-volume percentiles as "global" (as rln_deconvolve's
        # tiled path does); _rln_block then leaves the output in the network's units.
        fused = _load_model(model, official_checkpoint)
        stats = (0.0, 0.0)
        if normalize is not None:
            stats = tiling.exact_percentiles(volume, norm_percentiles(fused), progress=progress,
                                             slab_voxels=slab)
        elif np.dtype(volume.dtype).kind == "f":
            _check_volume(volume, slab, rl=False)
        # An all-zero volume deconvolves to zeros (as rln_deconvolve): the network alone
        # would add its biases. Only a volume whose percentiles are 0 can be all zero.
        zero = stats == (0.0, 0.0) and _all_zero(volume, slab)
        return BlockJob("rln", (tiling.RLN_HALO,) * 3, True, fused=fused, normalize=normalize,
                        rescale=rescale, stats=stats, zero=zero, device=dev)
    k = _load_psf(psf, voxel_size)
    # Any PSF size: richardson_lucy grows Bertero and reflect jobs to block + PSF - 1 per axis
    # (periodic edges crop the PSF to the block, with a warning).
    rl = dict(num_iter=int(num_iter), **(rl_options or {}))
    if np.dtype(volume.dtype).kind == "f":
        _check_volume(volume, slab, rl=True)  # before any block is written
    rl.setdefault("background", "auto")  # richardson_lucy's default, taken over the whole volume
    if rl["background"] == "auto":  # the 1st percentile, as richardson_lucy's "auto"
        rl["background"] = tiling.exact_percentiles(volume, (1.0,), progress=progress,
                                                    slab_voxels=slab)[0]
    return BlockJob("rl", tiling.rl_halo(k.shape), False, psf=k, rl=rl, device=dev)


def _slab_voxels(memory_budget: Any) -> int:
    """Voxels per slab of a whole-volume pass (percentiles, checks): within half of what the
    budget leaves besides the run's fixed overhead."""
    if memory_budget is None:
        return 1 << 24
    work = tiling.parse_memory(memory_budget) - tiling.RUN_OVERHEAD_BYTES
    return max(1 << 16, work // 2 // tiling.PASS_BYTES_PER_VOXEL)


def _check_volume(volume: Any, slab: int, rl: bool) -> None:
    """Finite values and, for RL, magnitudes float32 RL can sum (rl.check_magnitude)."""
    from rln_fast.rl import check_magnitude

    squares = 0.0
    for sl in tiling._slabs(volume.shape, slab):
        block = np.asarray(volume[sl])
        bad = int(block.size - np.isfinite(block).sum())
        if bad:
            raise ValueError(f"the volume contains NaN or Inf (z {sl[0].start}..{sl[0].stop - 1}); "
                             "replace them before deconvolving")
        if rl:
            for plane in block:
                v = plane.astype(np.float64).ravel()
                squares += float(v @ v)
    if rl:
        check_magnitude(squares, "image")


def _all_zero(volume: Any, slab: int) -> bool:
    return not any(np.asarray(volume[sl]).any() for sl in tiling._slabs(volume.shape, slab))


def _plan(job: BlockJob, shape: tuple[int, ...], tile: Any, memory_budget: Any) -> tuple:
    if job.method == "rln":
        bpv, extra = tiling.RLN_BYTES_PER_VOXEL, (0, 0, 0)
    else:
        bpv, extra = tiling.RL_BYTES_PER_VOXEL, tuple(p - 1 for p in job.psf.shape)
    dev = _pick_device(job.device)
    # On the CPU the budget bounds the whole process (its peak above the idle footprint).
    overhead = tiling.RUN_OVERHEAD_BYTES if dev.type == "cpu" else 0
    core = tiling.plan_core(shape, tile, memory_budget, dev, bpv, job.halo, extra=extra,
                            min_side=2, overhead=overhead)
    return core, tiling.tile_grid(shape, core, job.halo, even=job.even)


def deconvolve_file(
    input: str | os.PathLike, output: str | os.PathLike, *, method: str = "rln",
    model: Any = None, official_checkpoint: Any = None, psf: Any = None, num_iter: Any = 20,
    rl_options: dict[str, Any] | None = None, normalize: str | None = "global",
    rescale: bool = True, tile: Any = None, memory_budget: Any = None, device: Any = None,
    voxel_size: Any = None, ngff: str = "0.5", scheduler: Any = None, n_workers: int | None = None,
    resume: bool = True, overwrite: bool = False, progress: bool = True, channels: Any = None,
    time: Any = None, psf_model: str | None = None, wavelength: Any = None,
    na: float | None = None, ni: float = 1.515, psf_shape: Any = None,
) -> dict[str, Any]:
    """Deconvolve a TIFF/Zarr volume or stack into a TIFF/OME-Zarr file (format by suffix),
    streaming.

    method "rln" (model: None/"default" = the shipped one, a path from RLN.save, an RLN; or
    official_checkpoint = a TF checkpoint prefix) or "rl" (psf: a file or an array;
    num_iter; rl_options: richardson_lucy's keywords such as acceleration, edges, tv,
    background). normalize (RLN): "global", "official" or None/"none" as in rln_deconvolve,
    the percentiles always over the whole volume. tile (D, H, W) or memory_budget ("4GB";
    default: what is free on the device) sets the block size; the output is float32, written
    as one block per tile (a Zarr shard each), voxel size from the input unless
    ``voxel_size`` is given. scheduler: None (this process), "local" (a Dask LocalCluster, or
    dask-cuda's LocalCUDACluster with one worker per GPU when installed) or a scheduler
    address. resume: keep the finished blocks of an interrupted run with the same inputs and
    settings. Returns a summary (blocks, seconds).

    Multi-channel and time-lapse inputs (OME-TIFF, ImageJ hyperstacks, OME-Zarr; see
    :func:`rln_fast.io.open_stack`) give an output with the same axes (in the input's order
    where the output format allows it), voxel size, channel names and time increment, and a
    record of what was done to each channel in its metadata. Each (t, c) volume is
    deconvolved on its own, block by block, in one resumable run (one Dask task per block of
    every volume). ``channels`` ("0,2", a list, None = all): the channels to deconvolve, the
    others are copied through unchanged (as float32); ``time`` ("0:50", a list, a slice,
    None = all): the time points the output holds. Per-channel settings take one value for
    every channel, a list (one per channel of the input, or one per selected channel) or a
    dict {channel: value}: ``model``, ``psf``, ``num_iter``, ``rl_options["background"]``
    and ``wavelength``. ``psf_model`` ("born-wolf" or "gibson-lanni") with ``na``,
    ``wavelength`` (emission, µm), ``ni`` and ``psf_shape`` (default: the volume's, at most
    65 x 129 x 129, cropped to the PSF's support) generates each channel's PSF at the
    image's voxel size instead of ``psf``. A file with one channel and one time point is a
    single volume (its output is (z, y, x)); these keywords then name that one channel.

    Safety, all checked before anything is written: an existing ``output`` is replaced only
    when rln_fast wrote it (a TIFF file for a TIFF output, a Zarr folder with rln_fast's
    marker) unless ``overwrite``; the output must not be, hold or lie inside the input (or
    PSF / model file); one run per output (``<output>.lock``; another run's is refused
    naming it, a killed run's taken over); the input is read through (dtype, truncation,
    NaN/Inf) before the output is reserved. A failed run keeps its finished blocks when a
    rerun can resume them (interrupted, or a disk error after some blocks), else removes
    what it reserved; the exception's note (``__notes__``) says which.
    """
    t0 = _time.perf_counter()
    files = [p for v in (psf, model) for p in _values(v)]
    inputs = [input] + [p for p in (*files, official_checkpoint)
                        if isinstance(p, (str, os.PathLike)) and Path(p).exists()]
    if official_checkpoint is not None:
        inputs += [f"{official_checkpoint}.index"]
    if psf_model is not None and psf is not None:
        raise ValueError("give psf= (files or arrays) or psf_model= (generated), not both")
    lock = io.claim_output(output, ngff=ngff, overwrite=overwrite, inputs=inputs)
    try:
        try:
            src = io.open_volume(input)
        except io.ImageIOError as e:
            if "single channel and time point" not in str(e):
                raise
            stack = io.open_stack(input)
            return _deconvolve_stack(stack, output, t0, method=method, model=model,
                                     official_checkpoint=official_checkpoint, psf=psf,
                                     num_iter=num_iter, rl_options=rl_options,
                                     normalize=normalize, rescale=rescale, tile=tile,
                                     memory_budget=memory_budget, device=device,
                                     voxel_size=voxel_size, ngff=ngff, scheduler=scheduler,
                                     n_workers=n_workers, resume=resume, overwrite=overwrite,
                                     inputs=inputs, progress=progress, channels=channels,
                                     time=time, psf_model=psf_model, wavelength=wavelength,
                                     na=na, ni=ni, psf_shape=psf_shape)
        try:
            # One volume: the selections and per-channel settings have one channel to name.

            parse_selection(time, 1, "time point")
            selected = parse_selection(channels, 1, "channel")
            one = {k: per_channel(v, 1, k, selected)[0] for k, v in
                   (("model", model), ("psf", psf), ("num_iter", num_iter),
                    ("wavelength", wavelength))}
            rl_options = _rl_options_for(rl_options, 1, selected)[0]
            if psf_model is not None:
                vox = tuple(voxel_size) if voxel_size is not None else src.voxel_size
                one["psf"] = _generate_psf(psf_model, src.shape, vox, na, one["wavelength"], ni,
                                           psf_shape)
            return _deconvolve_file(src, output, t0, lock, method=method, model=one["model"],
                                    official_checkpoint=official_checkpoint, psf=one["psf"],
                                    num_iter=one["num_iter"], rl_options=rl_options,
                                    normalize=normalize, rescale=rescale, tile=tile,
                                    memory_budget=memory_budget, device=device,
                                    voxel_size=voxel_size, ngff=ngff, scheduler=scheduler,
                                    n_workers=n_workers, resume=resume, overwrite=overwrite,
                                    inputs=inputs, progress=progress)
        finally:
            src.close()
    finally:
        lock.release()


# ------------------------------------------------------------------ stacks (t, c, z, y, x)


def _values(value: Any) -> list[Any]:
    """The single values in a per-channel setting (for the input-safety check)."""
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _rl_options_for(rl_options: dict | None, n: int, selected: list[int]) -> list[dict]:
    """richardson_lucy's options per channel: ``background`` may be given per channel."""
    opts = dict(rl_options or {})
    backgrounds = per_channel(opts.pop("background", "auto"), n, "background", selected)
    return [{**opts, "background": "auto" if b is None else b} for b in backgrounds]


def _generate_psf(psf_model: str, shape: tuple[int, int, int], vox: Any, na: Any,
                  wavelength: Any, ni: float, psf_shape: Any) -> np.ndarray:
    """A model PSF at the image's voxel size (``rln_fast.psf.for_image``)."""
    from rln_fast import psf as psf_models

    name = str(psf_model).lower().replace("_", "-")
    if name not in psf_models.MODELS:
        raise ValueError(f"psf_model must be one of {', '.join(psf_models.MODELS)}, got "
                         f"{psf_model!r}")
    if vox is None:
        raise ValueError("psf_model= generates the PSF at the image's voxel size, but the input "
                         "has none in its metadata; give voxel_size= (--voxel-size DZ DY DX)")
    if na is None or wavelength is None:
        raise ValueError(f"psf_model={name!r} needs na= and wavelength= (the emission "
                         "wavelength in µm, one per channel)")
    return psf_models.for_image(shape, tuple(vox), na=float(na), wavelength=float(wavelength),
                                ni=float(ni), model=psf_model,
                                shape=tuple(psf_shape) if psf_shape else None)


def _describe(value: Any, default: str) -> Any:
    if value is None:
        return default
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if hasattr(value, "shape"):
        return f"an array of shape {tuple(value.shape)}"
    return type(value).__name__


@dataclass
class _CopyJob:
    """A channel that is not deconvolved: its blocks are copied through (as float32)."""

    method: str = "copy"
    halo: tuple[int, int, int] = (0, 0, 0)
    device: str | None = None

    def run(self, source: io.Volume, out: Any, tile: tiling.Tile, callback: Any = None) -> Any:
        out.write_block(tile.index, np.asarray(source[tile.outer], np.float32))
        return tile.index


def _stack_plan(jobs: dict, shape: tuple[int, int, int], tile: Any, memory_budget: Any) -> tuple:
    """One block shape for every volume (the output's blocks): the smallest core any
    channel's job plans, with even sides when an RLN job needs them."""
    cores = [_plan(job, shape, tile, memory_budget)[0] for job in jobs.values()]
    core = tuple(min(c) for c in zip(*cores, strict=True))
    if any(job.even for job in jobs.values()):
        core = tuple(c - 1 if c % 2 and 1 < c < n else c for c, n in zip(core, shape,
                                                                        strict=True))
    return core


def _deconvolve_stack(stack: io.Stack, output: Any, t0: float, *, method: str, model: Any,
                      official_checkpoint: Any, psf: Any, num_iter: Any, rl_options: Any,
                      normalize: Any, rescale: bool, tile: Any, memory_budget: Any,
                      device: Any, voxel_size: Any, ngff: str, scheduler: Any, n_workers: Any,
                      resume: bool, overwrite: bool, inputs: list, progress: bool,
                      channels: Any, time: Any, psf_model: Any, wavelength: Any, na: Any,
                      ni: float, psf_shape: Any) -> dict[str, Any]:
    from rln_fast import __version__

    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    n_t, n_c, shape = stack.n_time, stack.n_channels, stack.volume_shape
    sel_c = parse_selection(channels, n_c, "channel")
    sel_t = parse_selection(time, n_t, "time point")
    models = per_channel(model, n_c, "model", sel_c)
    psfs = per_channel(psf, n_c, "psf", sel_c)
    iters = per_channel(num_iter, n_c, "num_iter", sel_c)
    waves = per_channel(wavelength, n_c, "wavelength", sel_c)
    rlo = _rl_options_for(rl_options, n_c, sel_c)
    vox = tuple(voxel_size) if voxel_size is not None else stack.voxel_size
    names = stack.channel_names

    # What each deconvolved channel uses, loaded once: its model (RLN) or PSF (RL).
    loaded: dict[int, Any] = {}
    cache: dict[str, Any] = {}
    record_channels = []
    for c in range(n_c):
        entry: dict[str, Any] = {"channel": c, **({"name": names[c]} if names else {})}
        if c not in sel_c:
            entry.update(deconvolved=False, note="passed through unchanged (as float32)")
        elif method == "rln":
            key = repr(models[c]) if isinstance(models[c], (str, os.PathLike, type(None))) \
                else str(id(models[c]))
            if key not in cache:
                cache[key] = _load_model(models[c], official_checkpoint)
            loaded[c] = cache[key]
            entry.update(deconvolved=True, method="rln", normalize=normalize or "none",
                         model=("official checkpoint " + str(official_checkpoint)
                                if official_checkpoint is not None
                                else _describe(models[c], "default")))
        else:
            if psf_model is not None:
                try:
                    loaded[c] = _generate_psf(psf_model, shape, vox, na, waves[c], ni,
                                              psf_shape)
                except ValueError as e:
                    e.args = (f"channel {c}: {e}",)
                    raise
                what = (f"{psf_model}, NA {na}, emission {waves[c]} µm, ni {ni}, shape "
                        f"{tuple(loaded[c].shape)}")
            elif psfs[c] is None:
                raise ValueError(f"Richardson-Lucy needs a PSF for channel {c}: give psf= (a "
                                 "file or array, one per channel, or a dict) or psf_model=")
            else:
                loaded[c] = _load_psf(psfs[c], vox)
                what = _describe(psfs[c], "")
            n_iter = 20 if iters[c] is None else int(iters[c])
            entry.update(deconvolved=True, method="rl", psf=what, num_iter=n_iter,
                         **{k: v for k, v in sorted(rlo[c].items()) if v is not None})
        record_channels.append(entry)

    # One BlockJob per selected volume (its own normalisation / background statistics).
    jobs: dict[tuple[int, int], Any] = {}
    bar = tiling.progress_bar(len(sel_t) * len(sel_c), "volume statistics", progress,
                              unit="volume")
    try:
        for t_out, t in enumerate(sel_t):
            for c in sel_c:
                vol = stack.volume(t, c)
                try:
                    jobs[(t_out, c)] = make_job(
                        vol, method=method, model=loaded.get(c) if method == "rln" else None,
                        psf=loaded.get(c) if method == "rl" else None,
                        num_iter=20 if iters[c] is None else int(iters[c]),
                        rl_options=rlo[c], normalize=normalize, rescale=rescale,
                        device=device, voxel_size=vox, progress=False,
                        memory_budget=memory_budget)
                except ValueError as e:  # the same error (ImageIOError stays one), placed
                    e.args = (f"time point {t}, channel {c}: {e}",)
                    raise
                finally:
                    vol.close()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    first = {c: jobs[(0, c)] for c in sel_c}
    core = _stack_plan(first, shape, tile, memory_budget)
    grids = {c: tiling.tile_grid(shape, core, first[c].halo, even=first[c].even) for c in sel_c}
    copy_grid = tiling.tile_grid(shape, core, (0, 0, 0))

    # Time points picked at a regular step keep a time increment (times the step).
    dt = stack.time_increment
    steps = {b - a for a, b in zip(sel_t, sel_t[1:], strict=False)}
    if dt is not None and len(steps) == 1:
        dt = dt * steps.pop()
    elif dt is not None and steps:
        dt = None  # irregular: the record lists the time points taken
    record = {"software": f"rln_fast {__version__}", "input": str(stack.path),
              "time_points": sel_t, "channels": record_channels}
    st = os.stat(stack.path) if stack.path.is_file() else None
    fingerprint = {"input": str(stack.path.resolve()), "input_bytes": st.st_size if st else None,
                   "input_mtime_ns": st.st_mtime_ns if st else None, "time": sel_t,
                   "channels": sel_c,
                   "volumes": [[t, c, j.fingerprint()] for (t, c), j in sorted(jobs.items())]}
    out = io.create_stack_output(
        output, stack.axes, len(sel_t), n_c, shape, np.float32, core, voxel_size=vox,
        channel_names=names, time_increment=dt, time_unit=stack.time_unit, processing=record,
        omero_channels=stack._omero_channels, ngff=ngff, fingerprint=fingerprint,
        resume=resume, overwrite=overwrite, inputs=inputs)
    done = out.done_blocks()
    copy = _CopyJob()
    tasks, total = [], 0
    for t_out, t in enumerate(sel_t):
        for c in range(n_c):
            job, grid = (jobs[(t_out, c)], grids[c]) if c in sel_c else (copy, copy_grid)
            total += len(grid)
            tasks += [(job, (t, c), (t_out, c), g) for g in grid
                      if (t_out, c, *g.index) not in done]
    if scheduler is None:
        _write_all(out, total, lambda: _run_stack_here(tasks, stack, out, progress))
    else:
        _write_all(out, total, lambda: _run_stack_dask(tasks, stack, out, scheduler, n_workers,
                                                       device, progress))
    return {"blocks": total, "resumed_blocks": total - len(tasks), "block": core,
            "halo": {c: first[c].halo for c in sel_c}, "volumes": len(sel_t) * n_c,
            "axes": out.axes, "seconds": _time.perf_counter() - t0, "output": str(output)}


def _run_stack_here(tasks: list, stack: io.Stack, out: io.OutputStack, progress: bool) -> None:
    """Block after block, volume after volume, in this process; one bar over all blocks
    that says which volume it is in."""
    bar = tiling.progress_bar(len(tasks), "blocks", progress, unit="block", min_total=1)
    where, src, dst = None, None, None
    try:
        for job, at, at_out, t in tasks:
            if at != where:
                if src is not None:
                    src.close()
                where, src, dst = at, stack.volume(*at), out.volume(*at_out)
                if bar is not None:
                    bar.set_postfix_str(f"t {at_out[0] + 1}/{out.n_time}, c {at[1]} "
                                        f"({job.method})", refresh=False)
            job.run(src, dst, t)
            if bar is not None:
                bar.update(1)
    finally:
        if src is not None:
            src.close()
        if bar is not None:
            bar.close()


def _run_stack_dask(tasks: list, stack: io.Stack, out: io.OutputStack, scheduler: Any,
                    n_workers: int | None, device: Any, progress: bool) -> None:
    """One Dask task per block of every volume; each volume's job is sent once."""
    try:
        from distributed import as_completed
    except ImportError as e:
        raise RuntimeError("scheduler= needs dask.distributed: pip install 'rln-fast[dask]'") from e
    client, cluster = _client(scheduler, n_workers, None if device is None else str(device))
    bar = tiling.progress_bar(len(tasks), "blocks", progress, unit="block")
    try:
        distinct = list({id(job): job for job, *_ in tasks}.values())
        sent = dict(zip((id(j) for j in distinct), client.scatter(distinct, broadcast=True),
                        strict=True)) if distinct else {}
        futures = [client.submit(_run_block, sent[id(job)], stack.volume(*at),
                                 out.volume(*at_out), t, pure=False)
                   for job, at, at_out, t in tasks]
        for f in as_completed(futures):
            f.result()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        client.close()
        if cluster is not None:
            cluster.close()


def _note(e: BaseException, text: str) -> None:
    if hasattr(e, "add_note"):
        e.add_note(text)
    else:  # Python 3.10: the same attribute, for callers that read it
        e.__notes__ = [*getattr(e, "__notes__", []), text]  # type: ignore[attr-defined]


def _deconvolve_file(src: io.Volume, output: Any, t0: float, lock: Any, *, method: str,
                     model: Any, official_checkpoint: Any, psf: Any, num_iter: int,
                     rl_options: Any, normalize: Any, rescale: bool, tile: Any,
                     memory_budget: Any, device: Any, voxel_size: Any, ngff: str,
                     scheduler: Any, n_workers: Any, resume: bool, overwrite: bool,
                     inputs: list, progress: bool) -> dict[str, Any]:
    vox = tuple(voxel_size) if voxel_size is not None else src.voxel_size
    job = make_job(src, method=method, model=model, official_checkpoint=official_checkpoint,
                   psf=psf, num_iter=num_iter, rl_options=rl_options, normalize=normalize,
                   rescale=rescale, device=device, voxel_size=vox, progress=progress,
                   memory_budget=memory_budget)
    core, tiles = _plan(job, src.shape, tile, memory_budget)
    st = os.stat(src.path) if src.path.is_file() else None
    fingerprint = {"input": str(src.path.resolve()), "input_bytes": st.st_size if st else None,
                   "input_mtime_ns": st.st_mtime_ns if st else None, **job.fingerprint()}
    out = io.create_output(output, src.shape, np.float32, core, voxel_size=vox, ngff=ngff,
                           fingerprint=fingerprint, resume=resume, overwrite=overwrite,
                           inputs=inputs)
    done = out.done_blocks()
    todo = [t for t in tiles if t.index not in done]
    if scheduler is None:
        _write_all(out, len(tiles), lambda: _run_here(job, src, out, todo, progress))
    else:
        _write_all(out, len(tiles),
                   lambda: _run_dask(job, src, out, todo, scheduler, n_workers, progress))
    return {"blocks": len(tiles), "resumed_blocks": len(tiles) - len(todo), "block": core,
            "halo": job.halo, "seconds": _time.perf_counter() - t0, "output": str(output)}


def _write_all(out: io.OutputVolume, total: int, run: Any) -> None:
    """``run()`` (the blocks still to do), then finalize ``out``. On failure: interrupted, or
    the disk (full, unreadable) after some blocks, the finished blocks are kept for a rerun to
    resume; bad data or settings, or nothing finished, and everything reserved is removed.
    The error gets a note saying which."""
    try:
        run()
        out.finalize()
    except BaseException as e:
        kept = len(out.done_blocks())
        resumable = isinstance(e, (KeyboardInterrupt, OSError, io.ImageIOError)) and kept > 0
        out.abort(keep_record=resumable)
        if resumable:
            _note(e, f"{kept} of {total} finished blocks are kept in {out._partial}: rerun "
                     "the same command to resume")
        else:
            _note(e, f"nothing was kept: {out._partial.name} and {out._record.name} were "
                     "removed")
        raise


def _run_here(job: BlockJob, src: io.Volume, out: io.OutputVolume, todo: list, progress: bool):
    """Block after block in this process. Progress: RL counts iterations over all blocks (so a
    one-block run shows them too), RLN counts blocks (one bar even for one block)."""
    iters = int(job.rl.get("num_iter", 0)) if job.method == "rl" else 0
    if iters:
        bar = tiling.progress_bar(len(todo) * iters, "rl", progress, unit="it", min_total=1)
    else:
        bar = tiling.progress_bar(len(todo), f"{job.method} blocks", progress, unit="block",
                                  min_total=1)

    def tick(i: int, estimate: torch.Tensor) -> None:  # returns None: True would stop RL
        bar.update(1)

    per_iteration = bar is not None and iters > 0
    try:
        for n, t in enumerate(todo, 1):
            if per_iteration and len(todo) > 1:
                bar.set_postfix_str(f"block {n}/{len(todo)}", refresh=False)
            job.run(src, out, t, tick if per_iteration else None)
            if bar is not None:  # RL: the rest of the block's iterations when rtol stopped early
                bar.update(n * iters - bar.n if iters else 1)
    finally:
        if bar is not None:
            bar.close()


def _run_block(job: BlockJob, src: io.Volume, out: io.OutputVolume, tile: tiling.Tile):
    """A Dask task: the torch threads follow the worker's share of the cores."""
    try:
        from distributed import get_worker

        torch.set_num_threads(max(1, get_worker().state.nthreads))
    except (ImportError, ValueError):
        pass
    return job.run(src, out, tile)


def _client(scheduler: Any, n_workers: int | None, device: str | None):
    from distributed import Client, LocalCluster

    if scheduler != "local":
        return Client(scheduler), None
    want_gpu = device is None or str(device).startswith("cuda")
    if want_gpu and torch.cuda.is_available():
        try:
            from dask_cuda import LocalCUDACluster

            cluster = LocalCUDACluster(n_workers=n_workers)
            return Client(cluster), cluster
        except ImportError:
            pass
    n = n_workers or max(1, min(4, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // n)
    cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True,
                           dashboard_address=None)
    return Client(cluster), cluster


def _run_dask(job: BlockJob, src: io.Volume, out: io.OutputVolume, todo: list, scheduler: Any,
              n_workers: int | None, progress: bool):
    try:
        from distributed import as_completed
    except ImportError as e:
        raise RuntimeError("scheduler= needs dask.distributed: pip install 'rln-fast[dask]'") from e
    client, cluster = _client(scheduler, n_workers, job.device)
    bar = tiling.progress_bar(len(todo), f"{job.method} blocks", progress, unit="block")
    try:
        [job_f] = client.scatter([job], broadcast=True)
        futures = [client.submit(_run_block, job_f, src, out, t, pure=False) for t in todo]
        for f in as_completed(futures):
            f.result()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        client.close()
        if cluster is not None:
            cluster.close()


def map_overlap(array: Any, *, method: str = "rln", model: Any = None, psf: Any = None,
                num_iter: int = 20, rl_options: dict[str, Any] | None = None,
                normalize: str | None = "global", rescale: bool = True, device: Any = None):
    """Deconvolve a (z, y, x) dask array lazily: a dask array of float32 with the same shape.

    Each chunk is computed with its halo (``dask.array.map_overlap``); for RLN the chunks are
    first made even-sized so that the result equals the untiled one, and the normalisation
    percentiles are taken over the whole array now (one pass over it).
    """
    import dask.array as da

    if not isinstance(array, da.Array):
        raise TypeError(f"map_overlap takes a dask array, got {type(array).__name__}")
    if array.ndim != 3:
        raise ValueError(f"the array must be 3-D (z, y, x), got shape {array.shape}")
    job = make_job(array, method=method, model=model, psf=psf, num_iter=num_iter,
                   rl_options=rl_options, normalize=normalize, rescale=rescale, device=device)
    if job.even:
        array = array.rechunk(tuple(_even_chunks(c) for c in array.chunks))
    # dask needs each chunk at least as large as the halo it lends its neighbours.
    array = array.rechunk(tuple(_at_least(c, h) for c, h in zip(array.chunks, job.halo, strict=True)))

    def fn(block: np.ndarray) -> np.ndarray:
        return job.compute(block).cpu().numpy()

    depth = {ax: 0 if len(c) == 1 else h
             for ax, (c, h) in enumerate(zip(array.chunks, job.halo, strict=True))}
    return array.map_overlap(fn, depth=depth, boundary="none", trim=True, dtype=np.float32,
                             meta=np.empty((0, 0, 0), np.float32))


def _even_chunks(chunks: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk sizes with every boundary on an even coordinate (sizes even but the last)."""
    total = sum(chunks)
    size = max(2, max(chunks) + max(chunks) % 2)
    out = [size] * (total // size)
    if total % size:
        out.append(total % size)
    return tuple(out)


def _at_least(chunks: tuple[int, ...], halo: int) -> tuple[int, ...]:
    if len(chunks) == 1 or min(chunks) >= halo:
        return chunks
    total = sum(chunks)
    size = max(max(chunks), halo)
    size += size % 2
    out = [size] * (total // size)
    rest = total % size
    if rest:
        if rest < halo and out:
            out[-1] += rest  # merge a short tail into the last chunk
        else:
            out.append(rest)
    return tuple(out)
