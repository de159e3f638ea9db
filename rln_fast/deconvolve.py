"""rln_deconvolve: whole-volume RLN inference on numpy/torch/cupy volumes, with normalisation."""

from __future__ import annotations

import copy
import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rln_fast import tiling

if TYPE_CHECKING:
    from rln_fast.models.rln import RLN, FusedRLN

__all__ = ["check_dtype", "norm_percentiles", "rln_deconvolve"]

_P_LOW, _P_HIGH = 0.01, 99.5  # percentiles of the official inference script
_NORMALIZE = ("global", "official", "none", None)  # "none": None, as the CLI spells it
# torch.quantile refuses inputs above 2**24 elements; larger volumes go to numpy.
_QUANTILE_MAX = 1 << 24
# The members of the flip ensemble, in order: the axes (of z, y, x) each one flips.
_ENSEMBLE_FLIPS = ((), (2,), (1,), (1, 2), (0,), (0, 2), (0, 1), (0, 1, 2))


def _is_cupy(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def check_dtype(dtype: Any, name: str = "volume") -> None:
    """Refuse, in one line, a dtype that is not real numbers (integers or floats): complex,
    bool, object, strings, dates. The array APIs and the file path (CLI) share it."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = torch.empty((), dtype=dtype).numpy().dtype if isinstance(dtype, torch.dtype) else None
    if dt is not None and dt.kind in "uif":
        return
    if dt is not None and dt.kind == "c":
        hint = "take the real part or the magnitude first"
    elif dt is not None and dt.kind == "b":
        hint = "cast it to uint8 or float32 first"
    else:
        hint = "convert it to numbers (e.g. float32) first"
    raise TypeError(f"{name} must hold real numbers (integers or floats), got dtype {dtype}; "
                    f"{hint}")


def _as_torch(volume: Any) -> tuple[torch.Tensor, str]:
    """volume (z, y, x) -> (tensor on its own device, kind in {"numpy", "torch", "cupy"})."""
    if isinstance(volume, torch.Tensor):
        return volume, "torch"
    if isinstance(volume, np.ndarray):
        check_dtype(volume.dtype, "rln_deconvolve: volume")
        # Big-endian arrays (from some files) become native: torch holds native order only.
        native = volume.dtype.newbyteorder("=")
        return torch.from_numpy(np.ascontiguousarray(volume, dtype=native)), "numpy"
    if _is_cupy(volume):
        return torch.from_dlpack(volume), "cupy"
    raise TypeError(
        "rln_deconvolve: volume must be a numpy array, torch tensor or cupy array (z, y, x), "
        f"got {type(volume).__name__}"
    )


def norm_percentiles(model: Any) -> tuple[float, float]:
    """The (low, high) percentiles by which ``model`` (RLN or FusedRLN) wants its input
    normalised: metadata["norm_percentiles"] when the model has it (rln_fast.train records
    the ones it trained with), else those of the training config in metadata["config"], else
    the official inference script's (0.01, 99.5)."""
    meta = getattr(model, "metadata", None) or {}
    q = meta.get("norm_percentiles")
    if q is None and isinstance(meta.get("config"), str):
        try:
            q = json.loads(meta["config"]).get("norm_percentiles")
        except (ValueError, AttributeError):
            q = None
    if q is None:
        return _P_LOW, _P_HIGH
    try:
        lo, hi = (float(v) for v in q)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"the model's metadata['norm_percentiles'] must be (low, high) with "
                         f"0 <= low < high <= 100, got {q!r}")
    return lo, hi


def _percentiles(x: torch.Tensor, q: tuple[float, float] = (_P_LOW, _P_HIGH)) -> tuple[float, float]:
    """(low, high) percentiles q of x (default p0.01, p99.5), linear interpolation as
    numpy.percentile's default, in float64."""
    if x.numel() <= _QUANTILE_MAX:
        qt = torch.tensor([q[0] / 100, q[1] / 100], dtype=torch.float64, device=x.device)
        lo, hi = torch.quantile(x.reshape(-1).double(), qt).tolist()
        return lo, hi
    # Exact order statistics by partition (a float32 copy, not a float64 one), then the
    # same linear interpolation numpy uses: virtual index q * (n - 1).
    flat = x.detach().reshape(-1).cpu().numpy()
    n = flat.size
    pos = [p / 100 * (n - 1) for p in q]
    ks = sorted({min(int(np.floor(p)) + d, n - 1) for p in pos for d in (0, 1)})
    part = np.partition(flat, ks)
    out = []
    for p in pos:
        k = int(np.floor(p))
        a, b = float(part[k]), float(part[min(k + 1, n - 1)])
        out.append(a + (p - k) * (b - a))
    return out[0], out[1]


def _normalize(x: torch.Tensor, mi: float, ma: float) -> torch.Tensor:
    if ma == 0:
        return x
    if ma < 2 * mi:
        return x / ma
    return (x - mi) / (ma - mi + 1e-20)


def _denormalize(y: torch.Tensor, mi: float, ma: float) -> torch.Tensor:
    if ma == 0:
        return y
    if ma < 2 * mi:
        return y * ma
    return y * (ma - mi + 1e-20) + mi


def _resolve_model(model: Any, device: torch.device) -> FusedRLN:
    # The models module is imported here, not with this one: RL runs (the CLI, distributed)
    # share check_dtype and never load a network.
    from rln_fast.models.rln import RLN, FusedRLN  # noqa: PLC0415
    if model is None:
        model = RLN.from_pretrained()
    if isinstance(model, (str, os.PathLike)):
        model = RLN.load(model)
    if isinstance(model, RLN):
        fused = model.fuse()  # running statistics: what the model was trained to use in eval
    elif isinstance(model, FusedRLN):
        fused = model
    else:
        raise TypeError(
            "rln_deconvolve: model must be an RLN, a FusedRLN, a path to a saved RLN or None, "
            f"got {type(model).__name__}"
        )
    if fused.w_e1.device != device or fused.w_e1.dtype != torch.float32:
        # Copy so that the caller's model stays where it was.
        fused = copy.deepcopy(fused).to(device=device, dtype=torch.float32)
    return fused.eval()


def rln_deconvolve(
    volume: Any,
    model: RLN | FusedRLN | str | os.PathLike | None = None,
    *,
    normalize: str | None = "global",
    rescale: bool = True,
    device: str | torch.device | None = None,
    tile: Any = None,
    memory_budget: Any = None,
    ensemble: int = 1,
    progress: bool = True,
) -> Any:
    """Deconvolve one volume (z, y, x) with RLN; returns the same array type and device, float32.

    volume: numpy, torch (any device) or cupy array, 3-D (z, y, x), every side >= 2,
    finite values. model: RLN (its eval form is used: BN running statistics), FusedRLN,
    or a path written by RLN.save.
    normalize:
      "official": per volume mi = p0.01, ma = p99.5 (linear-interpolated percentiles; a
        model trained with other percentiles uses its own: ``norm_percentiles(model)``);
        x if ma == 0, x / ma if ma < 2 mi, else (x - mi) / (ma - mi + 1e-20); no clipping;
        the network output is returned as is (rescale is ignored).
      "global" (default): the same statistics over the whole volume, and the output
        mapped back to input units by inverting that affine unless rescale=False.
      None (or "none"): the raw volume goes in, the raw network output comes out.
    device: where the network runs; default the input's device for torch/cupy, else
    CUDA when available, else CPU.
    tile: None, an int or (D, H, W): run in tiles with these core sides (even, since the
      network pools by 2) and a halo of 16 voxels on every cut side; the result equals the
      untiled one (the percentiles are always taken over the whole volume).
    memory_budget: bytes (int) or a string such as "4GB" for one tile's working memory on
      ``device``; the largest tile that fits is used. With tile=None and memory_budget=None
      the budget is what is free (80% of free GPU memory, half the available RAM on the CPU),
      so a volume that fits runs whole and a larger one is tiled instead of running out of
      memory.
    ensemble: 1 (default), 2, 4 or 8: a flip ensemble. The network also runs on the volume
      flipped along x (2), y (4) and z (8), each output is flipped back, and their mean is
      returned: less of the network's noise-driven texture, at `ensemble` times the time.
      For PSFs that those flips leave unchanged (an aberration-free widefield or confocal
      PSF); each member is exact with tiles, so the mean is too.
    progress: tqdm bars over the tiles when there is more than one, and over the slabs of
      the percentiles pass of a tiled volume above 2**24 voxels.
    """
    if normalize not in _NORMALIZE:
        raise ValueError(
            f"rln_deconvolve: normalize must be one of {_NORMALIZE}, got {normalize!r}"
        )
    normalize = None if normalize == "none" else normalize
    if (isinstance(ensemble, bool) or not isinstance(ensemble, (int, np.integer))
            or ensemble not in (1, 2, 4, 8)):
        raise ValueError(f"rln_deconvolve: ensemble must be 1, 2, 4 or 8, got {ensemble!r}")
    ensemble = int(ensemble)
    x, kind = _as_torch(volume)
    if x.dim() != 3:
        raise ValueError(
            f"rln_deconvolve: volume must be 3-D (z, y, x), got shape {tuple(x.shape)}"
        )
    if min(x.shape) < 2:
        raise ValueError(
            f"rln_deconvolve: every side of the volume must be >= 2, got shape {tuple(x.shape)}"
        )
    if x.is_complex() or x.dtype == torch.bool:
        check_dtype(_numpy_dtype(x.dtype), "rln_deconvolve: volume")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("rln_deconvolve: volume contains NaN or Inf; clean or mask it first")
    if not bool(x.any()):
        # No signal: the deconvolution of zeros is zeros (the network alone would add its
        # biases, which normalisation cannot undo when every statistic is 0).
        y = torch.zeros(tuple(x.shape), dtype=torch.float32, device=x.device)
        return y.numpy() if kind == "numpy" else _to_kind(y, kind, x.device)

    in_device = x.device
    if device is None:
        if kind == "numpy":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = in_device
    device = torch.device(device)
    fused = _resolve_model(model, device)
    core = _tile_core(tuple(x.shape), tile, memory_budget, device)
    q = norm_percentiles(fused)
    # The percentiles do not change under flips: taken once for every member of the ensemble.
    if core != tuple(x.shape):
        mi, ma = _tiled_stats(x, normalize, progress, q)
        y = _ensemble(x, ensemble, lambda xm: _rln_tiled(xm, fused, core, mi, ma, normalize,
                                                        rescale, device, progress))
        return y.numpy() if kind == "numpy" else _to_kind(y, kind, in_device)

    with torch.inference_mode():
        xf = x.to(device=device, dtype=torch.float32)
        mi, ma = _percentiles(xf, q) if normalize is not None else (0.0, 0.0)
    y = _ensemble(xf, ensemble, lambda xm: _rln_whole(xm, fused, mi, ma, normalize, rescale))

    if kind == "numpy":
        return y.cpu().numpy()
    return _to_kind(y, kind, in_device)


def _rln_whole(xf: torch.Tensor, fused: FusedRLN, mi: float, ma: float, normalize: str | None,
               rescale: bool) -> torch.Tensor:
    """The whole float32 volume, on the network's device, through the network at once."""
    with torch.inference_mode():
        if normalize is not None:
            xf = _normalize(xf, mi, ma)
        y = fused(xf[None, None].contiguous())[0, 0]
    # Outside inference mode, so that what the caller gets is an ordinary tensor.
    if normalize == "global" and rescale:
        y = _denormalize(y, mi, ma)
    return y


def _ensemble(x: torch.Tensor, members: int, run) -> torch.Tensor:
    """The mean of run(flipped x) flipped back over the first `members` flips (run(x) for 1);
    summed in member order, so the result does not depend on tiling."""
    total = None
    for dims in _ENSEMBLE_FLIPS[:members]:
        y = run(x.flip(dims)).flip(dims) if dims else run(x)
        if total is None:
            total = y if members == 1 else y.clone()
        else:
            total += y
    if members > 1:
        total /= members
    return total


def _to_kind(y: torch.Tensor, kind: str, device: torch.device) -> Any:
    y = y.to(device)
    if y.is_inference():
        y = y.clone()
    if kind == "cupy":
        import cupy

        return cupy.from_dlpack(y)
    return y


def _tile_core(shape: tuple[int, ...], tile: Any, memory_budget: Any,
               device: torch.device) -> tuple[int, ...]:
    """Core sides for rln_deconvolve: the given tile, the largest that fits the budget, or the
    whole volume when it fits what is free."""
    try:
        return tiling.plan_core(shape, tile, memory_budget, device, tiling.RLN_BYTES_PER_VOXEL,
                                tiling.RLN_HALO, min_side=2)
    except ValueError as e:
        raise ValueError(f"rln_deconvolve: {e}") from None


def _rln_block(xb: torch.Tensor, fused: FusedRLN, mi: float, ma: float,
               normalize: str | None, rescale: bool) -> torch.Tensor:
    """One (z, y, x) float32 box through the network, normalised with the volume's statistics."""
    with torch.inference_mode():
        if normalize is not None:
            xb = _normalize(xb, mi, ma)
        y = fused(xb[None, None].contiguous())[0, 0]
        if normalize == "global" and rescale:
            y = _denormalize(y, mi, ma)
    return y


def _tiled_stats(x: torch.Tensor, normalize: str | None, progress: bool,
                 q: tuple[float, float]) -> tuple[float, float]:
    """The whole volume's percentiles q for the tiled path (block-wise above 2**24 voxels)."""
    if normalize is None:
        return 0.0, 0.0
    if x.numel() <= _QUANTILE_MAX:
        return _percentiles(x.to(torch.float32), q)
    lo, hi = tiling.exact_percentiles(_HostView(x), q, progress=progress)
    return lo, hi


def _rln_tiled(x: torch.Tensor, fused: FusedRLN, core: tuple[int, ...], mi: float, ma: float,
               normalize: str | None, rescale: bool, device: torch.device,
               progress: bool) -> torch.Tensor:
    """RLN tile by tile with the volume's percentiles mi, ma: the same result as the whole
    volume at once (module tiling explains why), the full output kept where the input is
    (host for numpy)."""
    tiles = tiling.tile_grid(x.shape, core, tiling.RLN_HALO, even=True)

    def block(xb: torch.Tensor) -> torch.Tensor:
        xb = xb.to(device=device, dtype=torch.float32)
        return _rln_block(xb, fused, mi, ma, normalize, rescale)

    return tiling.run_tiles(x, tiles, block, "rln tiles", progress)


class _HostView:
    """Box reads of a tensor as numpy, for the block-wise percentiles."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.shape, self.dtype = x, tuple(x.shape), _numpy_dtype(x.dtype)

    def __getitem__(self, box: Any) -> np.ndarray:
        return self.x[box].cpu().numpy()


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype
