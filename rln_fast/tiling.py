"""Tiles for volumes larger than memory: the grid and its halo, tile size from a memory budget,
and exact percentiles computed block by block.

RLN tiles are exact: every cut lies on an even coordinate (the network pools by 2) and every
cut side carries a halo of at least ``RLN_HALO`` voxels (an input voxel changes outputs at
most 16 voxels below and 17 above it, the 17 only from an even voxel, which an even cut keeps
inside the halo), so each tile's core is what the untiled network computes there. RL tiles
are approximate: the halo holds the data the PSF spreads into the core, and each tile runs RL
with Bertero–Boccacci edges; the seam error is measured in tests/test_tiling.py.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RLN_HALO", "Tile", "choose_core", "exact_percentiles", "parse_memory", "plan_core",
           "rl_halo", "run_tiles", "tile_grid"]

RLN_HALO = 16
# Working memory of one RLN tile per voxel of its outer box (float32, fused form): measured
# 150-250 B/voxel on the CPU (peak RSS over 64x128x128 .. 128x256x256) and 201 on an H100;
# the budget plans with the upper end.
RLN_BYTES_PER_VOXEL = 256
# One RL tile per voxel of its FFT job (image + PSF - 1, fast lengths): estimate, prediction,
# step, change, a spare, the Bertero weights, the OTF and the kept spectrum (complex, half
# an axis), the real FFT scratch, plus the block's read and its result. Measured on the CPU
# (Biggs, 9x15x15 PSF, jobs of ~3M voxels): 55 B/voxel above what the run holds between
# blocks with RSS sampled every 5 ms over a few blocks, 77 B/voxel at the peak of a whole
# run (benchmarks/bench_memory.py, 25 blocks, the budget's rule at 56 B giving 1.27x).
# Since the CPU job stores its Bertero weights (one volume more) but no longer convolves for its
# start or keeps a prediction scratch volume (two fewer), the 96x384x384 run of bench_memory
# peaks at 0.42x its budget (benchmarks/results/bench_memory_quiet_96x384x384_rl.json), against
# 0.83x before: the rule stays, with that margin.
RL_BYTES_PER_VOXEL = 80
# What a file run holds besides its tiles, once, on the host: the first call of the kernels
# (through the custom ops, torch.library imported ~800 modules: 81 MiB measured; eager calls
# now skip that import, see _backend.direct, so this is an upper bound), the model (10), zarr
# (8), buffers of the reader and writer; measured between blocks: 107-114 MiB. A budget for
# the whole process (deconvolve_file on the CPU) leaves this out of the tiles' share.
RUN_OVERHEAD_BYTES = 112 << 20
# A whole-volume pass (percentiles, finiteness) per voxel of the slab it holds: the read, a
# float32 copy, order-preserving keys and their temporaries (counted: ~30 B).
PASS_BYTES_PER_VOXEL = 32
_ALIGN = 16  # core sides are multiples of this (even, and friendly to chunked storage)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_memory(value: Any) -> int:
    """Bytes from an int/float or a string such as "4GB" (10^9), "4GiB" or "4G" (2^30), "512MB"."""
    if isinstance(value, bool):
        raise TypeError(f"memory budget must be a number of bytes or a string like '4GB', got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"memory budget {value!r} is not understood; write e.g. '4GB', "
                             "'1.5GiB', '512MB' or a number of bytes")
        n = float(m.group(1)) * _UNITS[unit]
    else:
        raise TypeError(f"memory budget must be a number of bytes or a string like '4GB', "
                        f"got {type(value).__name__}")
    if not math.isfinite(n) or n <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r}")
    return int(n)


def available_memory(device: Any) -> int:
    """Bytes free for work now: 80% of the GPU's free memory, or half the host's available RAM."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return max(int(pages * os.sysconf("SC_PAGE_SIZE")) // 2, 1 << 30)


@dataclass(frozen=True)
class Tile:
    """One tile: ``core`` (volume coordinates) is what it contributes, ``outer`` = core + halo,
    clipped to the volume, is what it reads; ``inner`` is the core inside the outer box."""

    index: tuple[int, int, int]
    core: tuple[slice, slice, slice]
    outer: tuple[slice, slice, slice]

    @property
    def inner(self) -> tuple[slice, slice, slice]:
        return tuple(slice(c.start - o.start, c.stop - o.start)  # type: ignore[return-value]
                     for c, o in zip(self.core, self.outer, strict=True))

    @property
    def outer_shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.outer)  # type: ignore[return-value]


def _triplet(value: Any, name: str) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)):
        value = (int(value),) * 3
    try:
        t = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or 3 ints (z, y, x), got {value!r}") from None
    if len(t) != 3 or any(v != w for v, w in zip(t, value, strict=True)):
        raise ValueError(f"{name} must be an int or 3 ints (z, y, x), got {value!r}")
    return t  # type: ignore[return-value]


def tile_grid(shape: Sequence[int], core: Any, halo: Any, *, even: bool = False) -> list[Tile]:
    """The tiles covering ``shape`` with cores of ``core`` (the last one per axis smaller) and
    ``halo`` voxels on every cut side. even=True (RLN) requires even core sides and halos, so
    every cut and every outer-box start lies on an even coordinate."""
    shape = _triplet(shape, "shape")
    core = tuple(min(c, s) for c, s in zip(_triplet(core, "tile"), shape, strict=True))
    halo = _triplet(halo, "halo")
    if any(c < 1 for c in core) or any(h < 0 for h in halo):
        raise ValueError(f"tile sides must be >= 1 and halos >= 0, got tile {core}, halo {halo}")
    if even:
        odd = [c for c, s in zip(core, shape, strict=True) if c % 2 and c < s]
        if odd or any(h % 2 for h in halo):
            raise ValueError(
                f"RLN tiles need even sides (the network pools by 2), got tile {core} halo {halo} "
                f"for a volume of {shape}; use even numbers such as {tuple(c + c % 2 for c in core)}")
    n = [math.ceil(s / c) for s, c in zip(shape, core, strict=True)]
    tiles = []
    for idx in np.ndindex(*n):
        cs = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, core, shape, strict=True))
        os_ = tuple(slice(max(sl.start - h, 0), min(sl.stop + h, s))
                    for sl, h, s in zip(cs, halo, shape, strict=True))
        tiles.append(Tile(tuple(int(i) for i in idx), cs, os_))  # type: ignore[arg-type]
    return tiles


def choose_core(
    shape: Sequence[int], budget: int, bytes_per_voxel: float, halo: Any, *,
    extra: Sequence[int] = (0, 0, 0), align: int = _ALIGN,
) -> tuple[int, int, int]:
    """The largest core, as cubic as the volume allows, whose outer box (core + 2 halo + extra
    per axis, e.g. the PSF's reach for RL) times ``bytes_per_voxel`` fits ``budget`` bytes.

    Sides are multiples of ``align`` (even) unless they cover the whole axis. Raises when even
    the smallest tile does not fit, saying how much it needs.
    """
    shape = _triplet(shape, "shape")
    halo = _triplet(halo, "halo")

    def cost(core: Sequence[int]) -> float:
        return bytes_per_voxel * math.prod(
            min(c + 2 * h, s) + e for c, h, s, e in zip(core, halo, shape, extra, strict=True))

    if cost(shape) <= budget:
        return shape
    best = None
    side = align
    while True:
        core = tuple(s if side >= s else side for s in shape)
        if cost(core) > budget:
            break
        best = core
        if all(side >= s for s in shape):
            break
        side += align
    if best is None:
        need = cost(tuple(min(align, s) for s in shape))
        raise ValueError(
            f"memory budget {budget / 2**20:.0f} MiB is too small for even one {align}-voxel tile "
            f"with its halo {halo} (needs {need / 2**20:.0f} MiB); raise the budget")
    # Grow the axes that are still below the volume, largest gain first, one step at a time.
    core = list(best)
    grown = True
    while grown:
        grown = False
        for ax in sorted(range(3), key=lambda a: shape[a] - core[a], reverse=True):
            if core[ax] >= shape[ax]:
                continue
            trial = list(core)
            trial[ax] = min(core[ax] + align, shape[ax])
            if cost(trial) <= budget:
                core, grown = trial, True
    return tuple(core)  # type: ignore[return-value]


def plan_core(shape: Sequence[int], tile: Any, memory_budget: Any, device: Any,
              bytes_per_voxel: float, halo: Any, *, extra: Sequence[int] = (0, 0, 0),
              min_side: int = 1, overhead: int = 0) -> tuple[int, int, int]:
    """Core sides from the caller's choice: ``tile`` as given (clipped to the volume), else the
    largest that fits ``memory_budget`` (bytes or "4GB"), else what is free on ``device``;
    ``overhead`` bytes of that budget are kept for what the process holds besides the tile."""
    shape = _triplet(shape, "shape")
    if tile is not None:
        if memory_budget is not None:
            raise ValueError("give tile= or memory_budget=, not both")
        core = _triplet(tile, "tile")
        if min(core) < min_side:
            raise ValueError(f"tile sides must be >= {min_side}, got {core}")
        return tuple(min(c, s) for c, s in zip(core, shape, strict=True))  # type: ignore[return-value]
    budget = (parse_memory(memory_budget) if memory_budget is not None
              else available_memory(device))
    if budget - overhead <= 0:
        raise ValueError(f"memory budget {budget / 2**20:.0f} MiB is below the "
                         f"{overhead / 2**20:.0f} MiB a run needs besides its tiles (kernels, "
                         "model, file libraries); raise the budget")
    return choose_core(shape, budget - overhead, bytes_per_voxel, halo, extra=extra)


def run_tiles(x: Any, tiles: Sequence[Tile], fn: Any, desc: str, progress: bool) -> Any:
    """out[t.core] = fn(x[t.outer])[t.inner] for every tile: a float32 tensor where ``x`` is
    (its device), however many tiles run."""
    import torch

    out = torch.empty(tuple(x.shape), dtype=torch.float32, device=x.device)
    bar = progress_bar(len(tiles), desc, progress)
    try:
        for t in tiles:
            out[t.core] = fn(x[t.outer])[t.inner].to(out.device)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def rl_halo(psf_shape: Sequence[int], widths: float = 2.0) -> tuple[int, int, int]:
    """RL halo per axis: ``widths`` times the PSF's extent (its array side), at least 4.

    Measured (tests/test_tiling.py, 20 plain RL iterations, 9x15x15 PSF): the largest seam
    error is 9.5e-6 of the image maximum at 2 extents, 1.1e-3 at 1, 8.9e-3 at 0.5.
    """
    return tuple(max(4, int(math.ceil(widths * p))) for p in psf_shape)  # type: ignore[return-value]


# --- exact percentiles, block by block ----------------------------------------------------

def _slabs(shape: Sequence[int], voxels: int = 1 << 24) -> Iterator[tuple[slice, slice, slice]]:
    plane = max(int(shape[1]) * int(shape[2]), 1)
    step = max(1, voxels // plane)
    for z in range(0, int(shape[0]), step):
        yield (slice(z, min(z + step, int(shape[0]))), slice(0, int(shape[1])), slice(0, int(shape[2])))


def _sortable_keys(block: np.ndarray) -> np.ndarray:
    """float32 values -> uint32 keys with the same order (sign bit flipped; negatives inverted)."""
    u = np.ascontiguousarray(block, dtype=np.float32).view(np.uint32).ravel()
    neg = (u >> 31).astype(bool)
    return np.where(neg, ~u, u | np.uint32(0x80000000))


def _key_value(key: int) -> float:
    u = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([u], np.uint32).view(np.float32)[0])


def _rank_in(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin holding the rank-th smallest (0-based), rank within that bin)."""
    cum = np.cumsum(counts, dtype=np.int64)
    b = int(np.searchsorted(cum, rank, side="right"))
    return b, rank - (int(cum[b - 1]) if b else 0)


def exact_percentiles(volume: Any, q: Sequence[float] = (0.01, 99.5), *,
                      progress: bool = False, slab_voxels: int = 1 << 24) -> tuple[float, ...]:
    """Percentiles of a volume read block by block, exactly as numpy's default (linear) method
    gives them on the float32 values, in float64; memory stays at one block.

    ``volume`` is anything with ``shape`` and box indexing (numpy, memmap, rln_fast.io.Volume).
    Integers up to 16 bits: one pass with a histogram of the values. Anything else: two passes
    over order-preserving 32-bit keys of the float32 values (high 16 bits, then the low 16 bits
    inside the bins that hold the wanted ranks). NaN or Inf raise. Reads slabs of whole
    z-planes of about ``slab_voxels`` voxels (~``PASS_BYTES_PER_VOXEL`` bytes each at once).
    """
    shape = tuple(int(s) for s in volume.shape)
    n = math.prod(shape)
    if n == 0:
        raise ValueError("cannot take percentiles of an empty volume")
    pos = [float(p) / 100 * (n - 1) for p in q]
    ranks = sorted({min(int(math.floor(p)) + d, n - 1) for p in pos for d in (0, 1)})
    dtype = np.dtype(volume.dtype)
    slabs = list(_slabs(shape, slab_voxels))
    passes = 1 if dtype.kind in "ui" and dtype.itemsize <= 2 else 2
    bar = progress_bar(len(slabs) * passes, "percentiles", progress, unit="block")
    values: dict[int, float] = {}
    try:
        if dtype.kind in "ui" and dtype.itemsize <= 2:
            offset = -int(np.iinfo(dtype).min)
            counts = np.zeros(1 << (8 * dtype.itemsize), np.int64)
            for sl in slabs:
                b = np.asarray(volume[sl]).ravel().astype(np.int64) + offset
                counts += np.bincount(b, minlength=counts.size)
                if bar is not None:
                    bar.update(1)
            for r in ranks:
                values[r] = float(np.float32(_rank_in(counts, r)[0] - offset))
        else:
            high = np.zeros(1 << 16, np.int64)
            for sl in slabs:
                block = np.asarray(volume[sl])
                if block.dtype.kind == "f" and not np.isfinite(block).all():
                    raise ValueError("volume contains NaN or Inf; clean or mask it first")
                high += np.bincount(_sortable_keys(block) >> 16, minlength=1 << 16)
                if bar is not None:
                    bar.update(1)
            where = {r: _rank_in(high, r) for r in ranks}
            lows = {b: np.zeros(1 << 16, np.int64) for b, _ in where.values()}
            for sl in slabs:
                keys = _sortable_keys(np.asarray(volume[sl]))
                hi = keys >> 16
                for b, c in lows.items():
                    c += np.bincount(keys[hi == b] & 0xFFFF, minlength=1 << 16)
                if bar is not None:
                    bar.update(1)
            for r, (b, within) in where.items():
                low, _ = _rank_in(lows[b], within)
                values[r] = _key_value((b << 16) | low)
    finally:
        if bar is not None:
            bar.close()
    out = []
    for p in pos:
        k = int(math.floor(p))
        a, b = values[k], values[min(k + 1, n - 1)]
        out.append(a + (p - k) * (b - a))
    return tuple(out)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "tile",
                 min_total: int = 2) -> Any:
    """A tqdm bar (on stderr) when asked for, tqdm is installed and there are at least
    ``min_total`` steps; else None."""
    if not enabled or total < min_total:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False)
