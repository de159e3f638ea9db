"""rln_fast.ops.rl_classic: classic RL's fused steps as torch custom ops (forward only).

FFT path (around torch.fft): ``rl_ratio`` (image / max(blurred + background, eps), zero outside
the observed box) and ``rl_update`` (the multiplicative update with Bertero weights, the RL-TV
factor, non-negativity and, in place, the Biggs–Andrews bookkeeping). Direct path (small PSFs):
``psf_conv_ratio`` and ``psf_conv_update``, which never store the blurred estimate or the
correction. Volumes are [N, 1, D, H, W]. The ops are not differentiable (no autograd formula is
registered): they serve the RL solver, ``rln_fast.richardson_lucy``.

Bertero–Boccacci weights w = 1 / (Hᵀ 1_M) are given as an :class:`EdgeWeights` (the PSF's
summed-volume table and per-axis tap ranges, from :func:`edge_weights`); the kernels evaluate w
per voxel from it, so no weight volume is stored, unless :func:`store_edge_weights` kept w per
voxel (``EdgeWeights.dense``), which the update then reads instead: the CPU solver does, where
a large PSF makes evaluating w most of the update's time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .. import _backend
from . import reference_rl

__all__ = [
    "EdgeWeights",
    "edge_weights",
    "store_edge_weights",
    "rl_ratio",
    "rl_ratio_",
    "rl_predict_",
    "rl_update",
    "rl_update_",
    "psf_conv_ratio",
    "psf_conv_update",
    "psf_conv_update_",
]


class EdgeWeights(NamedTuple):
    """Bertero–Boccacci weights in the form the kernels read.

    table: float64 [pz + 1, py + 1, px + 1], ``table[a, b, c] = psf[:a, :b, :c].sum()``.
    bounds: int64 [D + H + W, 2], for each work coordinate z, then y, then x, the PSF taps
        [lo, hi) whose Hᵀ footprint lies in the observed box.
    threshold: w = 1 / (Hᵀ 1_M) where Hᵀ 1_M > threshold, else 0.
    dense: None, or w itself per voxel of the work volume [D, H, W] in the volume's dtype
        (from :func:`store_edge_weights`), read by the update instead of the table.
    """

    table: torch.Tensor
    bounds: torch.Tensor
    threshold: float
    dense: torch.Tensor | None = None


def _tap_bounds(length: int, taps: int, centre: int, start: int, size: int, circular: bool) -> np.ndarray:
    # Tap q of work voxel p reads voxel p + q - centre (mod length on a circular job); keep the
    # taps that land in [start, start + size). They form one run because the box and the PSF
    # together fit in the job (checked).
    p = np.arange(length)[:, None]
    q = np.arange(taps)[None, :]
    at = p + q - centre
    if circular:
        at %= length
    inside = (at >= start) & (at < start + size)
    lo = np.where(inside.any(1), inside.argmax(1), 0)
    hi = np.where(inside.any(1), taps - inside[:, ::-1].argmax(1), 0)
    if not (inside.sum(1) == hi - lo).all():
        raise ValueError(
            f"rln_fast.edge_weights: a PSF of {taps} taps and an observed box of {size} voxels do "
            f"not fit a {'circular ' if circular else ''}job of {length} voxels")
    return np.stack([lo, hi], 1)


def edge_weights(
    psf: torch.Tensor | np.ndarray,
    work_shape: Sequence[int],
    image_shape: Sequence[int],
    origin: Sequence[int] = (0, 0, 0),
    *,
    circular: bool,
    threshold: float = 1e-2,
    device: torch.device | str | None = None,
) -> EdgeWeights:
    """The weights 1 / (Hᵀ 1_M) of a job of ``work_shape`` whose observed box M of
    ``image_shape`` starts at ``origin``; ``circular`` for an FFT job (taps wrap around), else a
    zero-padded one. psf: 3-D (z, y, x), centre voxel ``shape // 2``, as used by the job."""
    k = np.asarray(psf.detach().cpu() if isinstance(psf, torch.Tensor) else psf, dtype=np.float64)
    if k.ndim != 3:
        raise ValueError(f"rln_fast.edge_weights: 'psf' must be 3-D (z, y, x), got {k.ndim}-D")
    table = np.zeros(tuple(s + 1 for s in k.shape))
    inner = table[1:, 1:, 1:]  # summed in place: no temporaries (a 79x181x181 PSF: 30 vs 100 ms)
    np.cumsum(k, axis=0, out=inner)
    np.cumsum(inner, axis=1, out=inner)
    np.cumsum(inner, axis=2, out=inner)
    bounds = np.concatenate([
        _tap_bounds(int(L), int(P), int(P) // 2, int(o), int(m), circular)
        for L, P, o, m in zip(work_shape, k.shape, origin, image_shape, strict=True)
    ])
    return EdgeWeights(torch.as_tensor(table, device=device),
                       torch.as_tensor(bounds, dtype=torch.int64, device=device), float(threshold))


def store_edge_weights(weights: EdgeWeights, like: torch.Tensor) -> EdgeWeights:
    """``weights`` with w stored per voxel of the work volume ``like`` [1, 1, D, H, W] (its
    dtype and device): one volume more, and an update that reads w instead of evaluating a box
    sum and a division per voxel (on 2 CPU threads, 16 -> 4 ms per update of a 120x384x288
    job with a 79x181x181 PSF). The values are those the table gives, cast to the dtype, so the
    update's results do not change."""
    w = torch.ones_like(like, memory_format=torch.contiguous_format)
    rl_update_(w, torch.ones_like(w), weights._replace(dense=None))
    return weights._replace(dense=w[0, 0])


def _w(weights: EdgeWeights | None):
    return (None, None, 0.0) if weights is None else (weights.table, weights.bounds, float(weights.threshold))


def _dense(weights: EdgeWeights | None):
    return None if weights is None else weights.dense


def _c(op: str):
    return _backend.require_c(op)


# --- checks repeated for tracing (fake tensors); the C++ checks say the same -----------------

def _check_single(op: str, arg: str, t: torch.Tensor) -> None:
    torch._check(t.dim() == 5, lambda: f"rln_fast.{op}: '{arg}' must be 5-D (N, C, D, H, W), got {t.dim()}-D")
    torch._check(t.dtype in (torch.float32, torch.float64),
                 lambda: f"rln_fast.{op}: '{arg}' must be float32 or float64, got {t.dtype}")
    torch._check(t.shape[1] == 1, lambda: f"rln_fast.{op}: '{arg}' must have 1 channel, got {t.shape[1]}")


def _check_like(op: str, arg: str, t: torch.Tensor, ref: torch.Tensor, ref_arg: str) -> None:
    torch._check(t.shape == ref.shape,
                 lambda: f"rln_fast.{op}: '{arg}' must have the shape of '{ref_arg}' {tuple(ref.shape)}, got {tuple(t.shape)}")


# --- FFT path -------------------------------------------------------------------------------

@torch.library.custom_op("rln_fast::rl_ratio", mutates_args=())
def _rl_ratio(image: torch.Tensor, blurred: torch.Tensor, background: float, eps: float) -> torch.Tensor:
    return _c("rl_ratio").rl_ratio_forward(image, blurred, background, eps, None)


@_rl_ratio.register_fake
def _(image, blurred, background, eps):
    _check_single("rl_ratio", "blurred", blurred)
    _check_single("rl_ratio", "image", image)
    return torch.empty_like(blurred, memory_format=torch.contiguous_format)


@torch.library.custom_op("rln_fast::rl_ratio_", mutates_args=("blurred",))
def _rl_ratio_(blurred: torch.Tensor, image: torch.Tensor, background: float, eps: float) -> None:
    _c("rl_ratio").rl_ratio_forward(image, blurred, background, eps, blurred)


@_rl_ratio_.register_fake
def _(blurred, image, background, eps):
    _check_single("rl_ratio", "blurred", blurred)
    _check_single("rl_ratio", "image", image)


def rl_ratio(image: torch.Tensor, blurred: torch.Tensor, background: float = 0.0,
             eps: float = 1e-12) -> torch.Tensor:
    """image / max(blurred + background, eps) in the image's box, 0 elsewhere.

    image [N, 1, d, h, w] occupies the corner [0, d) x [0, h) x [0, w) of blurred
    [N, 1, D, H, W] (d <= D, ...): outside it nothing was observed and the ratio is 0 (the
    Bertero mask). eps > 0 keeps the division finite. Returns a new [N, 1, D, H, W] tensor.
    """
    if _backend.use_reference("rl_ratio", blurred.device):
        return reference_rl.rl_ratio(image, blurred, background, eps)
    return _rl_ratio(image, blurred, float(background), float(eps))


def rl_ratio_(blurred: torch.Tensor, image: torch.Tensor, background: float = 0.0,
              eps: float = 1e-12) -> torch.Tensor:
    """:func:`rl_ratio` written over ``blurred`` (contiguous), which is returned."""
    if _backend.use_reference("rl_ratio", blurred.device):
        blurred.copy_(reference_rl.rl_ratio(image, blurred, background, eps))
        return blurred
    if _backend.direct(blurred, image):
        _c("rl_ratio").rl_ratio_forward(image, blurred, float(background), float(eps), blurred)
    else:
        _rl_ratio_(blurred, image, float(background), float(eps))
    return blurred


@torch.library.custom_op("rln_fast::rl_predict_", mutates_args=("step",))
def _rl_predict_(step: torch.Tensor, estimate: torch.Tensor, a: float, tiny: float) -> None:
    _c("rl_predict").rl_predict_forward(estimate, step, a, tiny)


@_rl_predict_.register_fake
def _(step, estimate, a, tiny):
    _check_single("rl_predict", "estimate", estimate)
    _check_like("rl_predict", "step", step, estimate, "estimate")


def rl_predict_(step: torch.Tensor, estimate: torch.Tensor, a: float,
                tiny: float = 1e-30) -> torch.Tensor:
    """The accelerated RL prediction written over ``step``, which is returned:
    x + a·s·x / max(x − s, x, tiny), x the estimate x_k and s = x_k − x_{k−1} the last step,
    i.e. max(x + a·s, x·(1 − a + a·min(x / x_{k−1}, 1))): a straight-line extrapolation that
    never drops a shrinking voxel below the geometric step (see rln_fast.richardson_lucy).
    Both [N, 1, D, H, W], ``step`` contiguous and not sharing memory with ``estimate``."""
    if _backend.use_reference("rl_predict", estimate.device):
        step.copy_(reference_rl.rl_predict(estimate, step, a, tiny))
        return step
    if _backend.direct(step, estimate):
        _c("rl_predict").rl_predict_forward(estimate, step, float(a), float(tiny))
    else:
        _rl_predict_(step, estimate, float(a), float(tiny))
    return step


@torch.library.custom_op("rln_fast::rl_update", mutates_args=())
def _rl_update(estimate: torch.Tensor, correction: torch.Tensor, weight_table: torch.Tensor | None,
               weight_bounds: torch.Tensor | None, weight_threshold: float, tv: float,
               tv_eps: float, clamp_min: float, tv_periodic: bool,
               weight_dense: torch.Tensor | None = None) -> torch.Tensor:
    out, _ = _c("rl_update").rl_update_forward(estimate, correction, None, None, None, weight_table,
                                               weight_bounds, weight_threshold, tv, tv_eps, clamp_min,
                                               tv_periodic, weight_dense)
    return out


@_rl_update.register_fake
def _(estimate, correction, weight_table, weight_bounds, weight_threshold, tv, tv_eps, clamp_min,
      tv_periodic, weight_dense=None):
    _check_single("rl_update", "estimate", estimate)
    _check_like("rl_update", "correction", correction, estimate, "estimate")
    return torch.empty_like(estimate, memory_format=torch.contiguous_format)


@torch.library.custom_op("rln_fast::rl_update_", mutates_args=("correction", "previous", "change"))
def _rl_update_(correction: torch.Tensor, estimate: torch.Tensor, previous: torch.Tensor | None,
                change: torch.Tensor | None, weight_table: torch.Tensor | None,
                weight_bounds: torch.Tensor | None, weight_threshold: float, tv: float,
                tv_eps: float, clamp_min: float, tv_periodic: bool,
                weight_dense: torch.Tensor | None = None) -> torch.Tensor:
    _, dots = _c("rl_update").rl_update_forward(estimate, correction, correction, previous, change,
                                                weight_table, weight_bounds, weight_threshold, tv,
                                                tv_eps, clamp_min, tv_periodic, weight_dense)
    return dots


@_rl_update_.register_fake
def _(correction, estimate, previous, change, weight_table, weight_bounds, weight_threshold, tv,
      tv_eps, clamp_min, tv_periodic, weight_dense=None):
    _check_single("rl_update", "estimate", estimate)
    _check_like("rl_update", "correction", correction, estimate, "estimate")
    return estimate.new_empty((2,), dtype=torch.float64)


def rl_update(estimate: torch.Tensor, correction: torch.Tensor, weights: EdgeWeights | None = None,
              tv: float = 0.0, clamp_min: float = 0.0, tv_eps: float = 1e-6,
              tv_periodic: bool = True) -> torch.Tensor:
    """The RL update max(u · c · w / (1 − tv·div(∇u/|∇u|)), clamp_min), a new tensor.

    estimate u, correction c = Hᵀ(ratio): [N, 1, D, H, W]. weights: Bertero weights w (None:
    w = 1). tv >= 0: RL-TV weight (Dey et al. 2006), the divergence from u's 6 neighbours, which
    wrap around the volume (tv_periodic, as on a circular FFT job) or are 0 beyond it; |∇u| is
    regularised by tv_eps (in u's units) and the denominator kept >= 0.1. clamp_min:
    non-negativity (0) or another floor.
    """
    if _backend.use_reference("rl_update", estimate.device):
        return reference_rl.rl_update(estimate, correction, weights, tv, clamp_min, tv_eps, tv_periodic)
    return _rl_update(estimate, correction, *_w(weights), float(tv), float(tv_eps), float(clamp_min),
                      bool(tv_periodic), _dense(weights))


def rl_update_(correction: torch.Tensor, estimate: torch.Tensor, weights: EdgeWeights | None = None,
               tv: float = 0.0, clamp_min: float = 0.0, tv_eps: float = 1e-6,
               tv_periodic: bool = True, *,
               previous: torch.Tensor | None = None,
               change: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`rl_update` in place, with the Biggs–Andrews bookkeeping, in one pass.

    ``correction`` is overwritten with the new estimate v. With ``previous`` (x_k, when
    ``estimate`` is the prediction y_k): previous ← v − x_k, the step. With ``change``
    (g_{k−1}): change ← g_k = v − y_k. Returns float64 [2] = [⟨g_k, g_{k−1}⟩, ⟨g_k, g_k⟩]
    (zeros without ``change``). All [N, 1, D, H, W], contiguous, none sharing memory with
    ``estimate`` or with each other.
    """
    if _backend.use_reference("rl_update", estimate.device):
        new, step, g, dots = reference_rl.rl_update_biggs(estimate, correction, previous, change,
                                                          weights, tv, clamp_min, tv_eps,
                                                          tv_periodic)
        _copy_results(correction, new, previous, step, change, g)
        return dots
    args = (*_w(weights), float(tv), float(tv_eps), float(clamp_min), bool(tv_periodic),
            _dense(weights))
    if _backend.direct(correction, estimate, previous, change):
        return _c("rl_update").rl_update_forward(estimate, correction, correction, previous, change,
                                                 *args)[1]
    return _rl_update_(correction, estimate, previous, change, *args)


def _copy_results(out, new, previous, step, change, g):
    out.copy_(new)
    if previous is not None:
        previous.copy_(step)
    if change is not None:
        change.copy_(g)


# --- direct path ----------------------------------------------------------------------------

def _check_psf(op: str, psf: torch.Tensor) -> None:
    torch._check(psf.dim() == 3, lambda: f"rln_fast.{op}: 'psf' must be 3-D (pz, py, px), got {psf.dim()}-D")


@torch.library.custom_op("rln_fast::psf_conv_ratio", mutates_args=())
def _psf_conv_ratio(image: torch.Tensor, estimate: torch.Tensor, psf: torch.Tensor,
                    background: float, eps: float) -> torch.Tensor:
    return _c("psf_conv_ratio").psf_conv_ratio_forward(image, estimate, psf, background, eps)


@_psf_conv_ratio.register_fake
def _(image, estimate, psf, background, eps):
    _check_single("psf_conv_ratio", "estimate", estimate)
    _check_single("psf_conv_ratio", "image", image)
    _check_psf("psf_conv_ratio", psf)
    return torch.empty_like(image, memory_format=torch.contiguous_format)


def psf_conv_ratio(image: torch.Tensor, estimate: torch.Tensor, psf: torch.Tensor,
                   background: float = 0.0, eps: float = 1e-12) -> torch.Tensor:
    """image / max(psf ⊛ estimate + background, eps), the blurred estimate never stored.

    image [N, 1, d, h, w] is centred in estimate [N, 1, D, H, W] (D − d even and >= 0; D = d
    gives 'same' zero padding, D = d + pz − 1 the Bertero job); psf [pz, py, px] with odd sides
    and centre voxel p // 2; zero padding. Returns [N, 1, d, h, w].
    """
    if _backend.use_reference("psf_conv_ratio", estimate.device):
        return reference_rl.psf_conv_ratio(image, estimate, psf, background, eps)
    if _backend.direct(image, estimate, psf):
        return _c("psf_conv_ratio").psf_conv_ratio_forward(image, estimate, psf, float(background),
                                                           float(eps))
    return _psf_conv_ratio(image, estimate, psf, float(background), float(eps))


@torch.library.custom_op("rln_fast::psf_conv_update", mutates_args=())
def _psf_conv_update(estimate: torch.Tensor, ratio: torch.Tensor, psf: torch.Tensor,
                     weight_table: torch.Tensor | None, weight_bounds: torch.Tensor | None,
                     weight_threshold: float, tv: float, tv_eps: float,
                     clamp_min: float, weight_dense: torch.Tensor | None = None) -> torch.Tensor:
    out, _ = _c("psf_conv_update").psf_conv_update_forward(
        estimate, ratio, psf, None, None, None, weight_table, weight_bounds, weight_threshold, tv,
        tv_eps, clamp_min, weight_dense)
    return out


@_psf_conv_update.register_fake
def _(estimate, ratio, psf, weight_table, weight_bounds, weight_threshold, tv, tv_eps, clamp_min,
      weight_dense=None):
    _check_single("psf_conv_update", "estimate", estimate)
    _check_single("psf_conv_update", "ratio", ratio)
    _check_psf("psf_conv_update", psf)
    return torch.empty_like(estimate, memory_format=torch.contiguous_format)


@torch.library.custom_op("rln_fast::psf_conv_update_", mutates_args=("out", "previous", "change"))
def _psf_conv_update_(out: torch.Tensor, estimate: torch.Tensor, ratio: torch.Tensor,
                      psf: torch.Tensor, previous: torch.Tensor | None, change: torch.Tensor | None,
                      weight_table: torch.Tensor | None, weight_bounds: torch.Tensor | None,
                      weight_threshold: float, tv: float, tv_eps: float,
                      clamp_min: float, weight_dense: torch.Tensor | None = None) -> torch.Tensor:
    _, dots = _c("psf_conv_update").psf_conv_update_forward(
        estimate, ratio, psf, out, previous, change, weight_table, weight_bounds, weight_threshold,
        tv, tv_eps, clamp_min, weight_dense)
    return dots


@_psf_conv_update_.register_fake
def _(out, estimate, ratio, psf, previous, change, weight_table, weight_bounds, weight_threshold,
      tv, tv_eps, clamp_min, weight_dense=None):
    _check_single("psf_conv_update", "estimate", estimate)
    _check_like("psf_conv_update", "out", out, estimate, "estimate")
    return estimate.new_empty((2,), dtype=torch.float64)


def psf_conv_update(estimate: torch.Tensor, ratio: torch.Tensor, psf: torch.Tensor,
                    weights: EdgeWeights | None = None, tv: float = 0.0, clamp_min: float = 0.0,
                    tv_eps: float = 1e-6) -> torch.Tensor:
    """:func:`rl_update` of estimate [N, 1, D, H, W] with the correction psfᵀ ⊛ ratio (ratio
    [N, 1, d, h, w] centred as in :func:`psf_conv_ratio`, zero outside), computed per voxel and
    never stored; the TV neighbours are 0 beyond the estimate (zero padding throughout).
    Returns a new tensor."""
    if _backend.use_reference("psf_conv_update", estimate.device):
        return reference_rl.psf_conv_update(estimate, ratio, psf, weights, tv, clamp_min, tv_eps)
    args = (*_w(weights), float(tv), float(tv_eps), float(clamp_min), _dense(weights))
    if _backend.direct(estimate, ratio, psf):
        return _c("psf_conv_update").psf_conv_update_forward(estimate, ratio, psf, None, None, None,
                                                             *args)[0]
    return _psf_conv_update(estimate, ratio, psf, *args)


def psf_conv_update_(out: torch.Tensor, estimate: torch.Tensor, ratio: torch.Tensor,
                     psf: torch.Tensor, weights: EdgeWeights | None = None, tv: float = 0.0,
                     clamp_min: float = 0.0, tv_eps: float = 1e-6, *,
                     previous: torch.Tensor | None = None,
                     change: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`psf_conv_update` written into ``out``, with the Biggs–Andrews bookkeeping of
    :func:`rl_update_` (previous, change; returns the dots)."""
    if _backend.use_reference("psf_conv_update", estimate.device):
        new, step, g, dots = reference_rl.psf_conv_update_biggs(
            estimate, ratio, psf, previous, change, weights, tv, clamp_min, tv_eps)
        _copy_results(out, new, previous, step, change, g)
        return dots
    args = (*_w(weights), float(tv), float(tv_eps), float(clamp_min), _dense(weights))
    if _backend.direct(out, estimate, ratio, psf, previous, change):
        return _c("psf_conv_update").psf_conv_update_forward(estimate, ratio, psf, out, previous,
                                                             change, *args)[1]
    return _psf_conv_update_(out, estimate, ratio, psf, previous, change, *args)
