"""rln_deconvolve: whole-volume RLN inference on numpy/torch/cupy volumes, with normalisation."""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch

from rln_fast.models.rln import RLN, FusedRLN

__all__ = ["rln_deconvolve"]

_P_LOW, _P_HIGH = 0.01, 99.5  # percentiles of the official inference script
_NORMALIZE = ("global", "official", None)
# torch.quantile refuses inputs above 2**24 elements; larger volumes go to numpy.
_QUANTILE_MAX = 1 << 24


def _is_cupy(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def _as_torch(volume: Any) -> tuple[torch.Tensor, str]:
    """volume (z, y, x) -> (tensor on its own device, kind in {"numpy", "torch", "cupy"})."""
    if isinstance(volume, torch.Tensor):
        return volume, "torch"
    if isinstance(volume, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(volume)), "numpy"
    if _is_cupy(volume):
        return torch.from_dlpack(volume), "cupy"
    raise TypeError(
        "rln_deconvolve: volume must be a numpy array, torch tensor or cupy array (z, y, x), "
        f"got {type(volume).__name__}"
    )


def _percentiles(x: torch.Tensor) -> tuple[float, float]:
    """(p0.01, p99.5) of x, linear interpolation as numpy.percentile's default, in float64."""
    if x.numel() <= _QUANTILE_MAX:
        q = torch.tensor([_P_LOW / 100, _P_HIGH / 100], dtype=torch.float64, device=x.device)
        lo, hi = torch.quantile(x.reshape(-1).double(), q).tolist()
        return lo, hi
    # Exact order statistics by partition (a float32 copy, not a float64 one), then the
    # same linear interpolation numpy uses: virtual index q * (n - 1).
    flat = x.detach().reshape(-1).cpu().numpy()
    n = flat.size
    pos = [p / 100 * (n - 1) for p in (_P_LOW, _P_HIGH)]
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
    progress: bool = True,
) -> Any:
    """Deconvolve one volume (z, y, x) with RLN; returns the same array type and device, float32.

    volume: numpy, torch (any device) or cupy array, 3-D (z, y, x), every side >= 2,
    finite values. model: RLN (its eval form is used: BN running statistics), FusedRLN,
    or a path written by RLN.save.
    normalize:
      "official": per volume mi = p0.01, ma = p99.5 (linear-interpolated percentiles);
        x if ma == 0, x / ma if ma < 2 mi, else (x - mi) / (ma - mi + 1e-20); no clipping;
        the network output is returned as is (rescale is ignored).
      "global" (default): the same statistics over the whole volume, and the output
        mapped back to input units by inverting that affine unless rescale=False.
      None: the raw volume goes in, the raw network output comes out.
    device: where the network runs; default the input's device for torch/cupy, else
    CUDA when available, else CPU.
    tile, memory_budget: must be None (the whole volume runs at once).
    progress: unused for a whole-volume run (there is a single step to report).
    """
    if tile is not None:
        raise NotImplementedError(
            "rln_deconvolve: tile= is not supported yet (tiled RLN arrives with the "
            "large-volume work); pass tile=None to run the whole volume at once"
        )
    if memory_budget is not None:
        raise NotImplementedError(
            "rln_deconvolve: memory_budget= is not supported yet (tiled RLN arrives with the "
            "large-volume work); pass memory_budget=None to run the whole volume at once"
        )
    if normalize not in _NORMALIZE:
        raise ValueError(
            f"rln_deconvolve: normalize must be one of {_NORMALIZE}, got {normalize!r}"
        )
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
        raise TypeError(f"rln_deconvolve: volume must be real-valued, got dtype {x.dtype}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("rln_deconvolve: volume contains NaN or Inf; clean or mask it first")

    in_device = x.device
    if device is None:
        if kind == "numpy":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = in_device
    device = torch.device(device)
    fused = _resolve_model(model, device)

    with torch.inference_mode():
        xf = x.to(device=device, dtype=torch.float32)
        mi = ma = 0.0
        if normalize is not None:
            mi, ma = _percentiles(xf)
            xf = _normalize(xf, mi, ma)
        y = fused(xf[None, None].contiguous())[0, 0]
    # Outside inference mode, so that what the caller gets is an ordinary tensor.
    if normalize == "global" and rescale:
        y = _denormalize(y, mi, ma)

    if kind == "numpy":
        return y.cpu().numpy()
    y = y.to(in_device)
    if y.is_inference():
        y = y.clone()
    if kind == "cupy":
        import cupy

        return cupy.from_dlpack(y)
    return y
