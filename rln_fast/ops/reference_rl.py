"""Pure-torch twins of the classic-RL ops (rl_ratio, rl_update, psf_conv_ratio, psf_conv_update).

Each function computes what the fused kernel computes, written with plain tensor ops and
``torch.nn.functional.conv3d``: the test oracle, and what the ops run on devices without
compiled kernels. Volumes are [N, 1, D, H, W]; see ``rln_fast.ops.rl_classic`` for the meaning
of every argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "edge_weight_volume",
    "tv_factor",
    "rl_ratio",
    "rl_predict",
    "rl_update",
    "rl_update_biggs",
    "psf_conv_blur",
    "psf_conv_ratio",
    "psf_conv_backproject",
    "psf_conv_update",
    "psf_conv_update_biggs",
]

# Mirrors kTvMinDenominator in csrc/include/rln_fast/rl_classic.h.
TV_MIN_DENOMINATOR = 0.1


def edge_weight_volume(table: torch.Tensor, bounds: torch.Tensor, threshold: float,
                       shape: tuple[int, int, int]) -> torch.Tensor:
    """w [D, H, W] (float64): 1 / (box sum of the PSF over each voxel's tap box), 0 at or below
    ``threshold``. table [pz + 1, py + 1, px + 1] holds the PSF's exclusive prefix sums; bounds
    [D + H + W, 2] the tap range [lo, hi) of every z, then y, then x (clamped to the PSF)."""
    D, H, W = shape
    sizes = [s - 1 for s in table.shape]
    lo_hi = []
    for axis, (start, n) in enumerate(((0, D), (D, H), (D + H, W))):
        b = bounds[start:start + n]
        lo = b[:, 0].clamp(0, sizes[axis])
        hi = torch.maximum(b[:, 1].clamp(max=sizes[axis]), lo)
        lo_hi.append((lo, hi))
    (z0, z1), (y0, y1), (x0, x1) = lo_hi

    def t(a, b, c):
        return table[a[:, None, None], b[None, :, None], c[None, None, :]]

    s = (t(z1, y1, x1) - t(z0, y1, x1) - t(z1, y0, x1) + t(z0, y0, x1)) - (
        t(z1, y1, x0) - t(z0, y1, x0) - t(z1, y0, x0) + t(z0, y0, x0))
    return torch.where(s > threshold, 1.0 / torch.where(s > threshold, s, torch.ones_like(s)),
                       torch.zeros_like(s))


def tv_factor(u: torch.Tensor, tv: float, tv_eps: float, periodic: bool) -> torch.Tensor:
    """1 / max(1 - tv * div(grad u / |grad u|), 0.1) for u [N, 1, D, H, W], 6-neighbour scheme;
    beyond the volume the neighbours wrap around (periodic) or are 0 (see tv_factor_at in
    rl_classic.h)."""
    p = F.pad(u, (1, 1, 1, 1, 1, 1), mode="circular") if periodic else F.pad(u, (1, 1, 1, 1, 1, 1))
    c = p[:, :, 1:-1, 1:-1, 1:-1]
    zp, zm = p[:, :, 2:, 1:-1, 1:-1], p[:, :, :-2, 1:-1, 1:-1]
    yp, ym = p[:, :, 1:-1, 2:, 1:-1], p[:, :, 1:-1, :-2, 1:-1]
    xp, xm = p[:, :, 1:-1, 1:-1, 2:], p[:, :, 1:-1, 1:-1, :-2]
    cz, cy, cx = 0.5 * (zp - zm), 0.5 * (yp - ym), 0.5 * (xp - xm)
    e2 = tv_eps * tv_eps
    div = torch.zeros_like(c)
    for dp, dm, t in ((zp - c, c - zm, cy * cy + cx * cx + e2),
                      (yp - c, c - ym, cz * cz + cx * cx + e2),
                      (xp - c, c - xm, cz * cz + cy * cy + e2)):
        div = div + dp / torch.sqrt(dp * dp + t) - dm / torch.sqrt(dm * dm + t)
    den = torch.clamp_min(1 - tv * div, TV_MIN_DENOMINATOR)
    return 1 / den


def rl_ratio(image: torch.Tensor, blurred: torch.Tensor, background: float = 0.0,
             eps: float = 1e-12) -> torch.Tensor:
    """image [N, 1, d, h, w] / max(blurred + background, eps) inside the corner box of blurred
    [N, 1, D, H, W]; 0 outside it."""
    d, h, w = image.shape[2:]
    out = torch.zeros_like(blurred)
    den = torch.clamp_min(blurred[:, :, :d, :h, :w] + background, eps)
    out[:, :, :d, :h, :w] = image / den
    return out


def _weights(weights, shape, like: torch.Tensor):
    if weights is None:
        return None
    table, bounds, threshold = weights[:3]  # EdgeWeights or a 3-tuple; w from the table
    return edge_weight_volume(table, bounds, threshold, shape).to(like.dtype)


def _update(estimate, correction, weights, tv, tv_eps, clamp_min, tv_periodic):
    v = estimate * correction
    w = _weights(weights, tuple(estimate.shape[2:]), estimate)
    if w is not None:
        v = v * w
    if tv > 0:
        v = v * tv_factor(estimate, tv, tv_eps, tv_periodic)
    return torch.clamp_min(v, clamp_min)


def rl_predict(estimate: torch.Tensor, step: torch.Tensor, a: float, tiny: float = 1e-30) -> torch.Tensor:
    """The accelerated prediction max(x + a s, x (1 - a + a min(x / x_prev, 1))), x_prev = x - s,
    in its closed form x + a s x / max(x_prev, x, tiny) (a new tensor)."""
    return estimate + a * step * (estimate / torch.maximum(estimate - step, estimate).clamp_min(tiny))


def rl_update(estimate: torch.Tensor, correction: torch.Tensor, weights=None, tv: float = 0.0,
              clamp_min: float = 0.0, tv_eps: float = 1e-6, tv_periodic: bool = True) -> torch.Tensor:
    """max(estimate * correction * w * tv_factor(estimate), clamp_min), all [N, 1, D, H, W];
    weights = (table, bounds, threshold) or None (w = 1)."""
    return _update(estimate, correction, weights, tv, tv_eps, clamp_min, tv_periodic)


def _biggs(new, estimate, previous, change):
    step = None if previous is None else new - previous
    dots = torch.zeros(2, dtype=torch.float64, device=new.device)
    g = None
    if change is not None:
        g = new - estimate
        dots = torch.stack([(g.double() * change.double()).sum(), (g.double() ** 2).sum()])
    return new, step, g, dots


def rl_update_biggs(estimate, correction, previous=None, change=None, weights=None, tv=0.0,
                    clamp_min=0.0, tv_eps=1e-6, tv_periodic=True):
    """The in-place op's results: (new estimate, previous -> new - previous, change -> new -
    estimate, dots = [<new change, old change>, <new change, new change>] float64)."""
    new = _update(estimate, correction, weights, tv, tv_eps, clamp_min, tv_periodic)
    return _biggs(new, estimate, previous, change)


def _offsets(small: torch.Tensor, big: torch.Tensor) -> list[int]:
    return [(b - s) // 2 for s, b in zip(small.shape[2:], big.shape[2:], strict=True)]


def psf_conv_blur(image_shape, estimate: torch.Tensor, psf: torch.Tensor) -> torch.Tensor:
    """(psf * estimate) on the image's voxels [N, 1, d, h, w], the image centred in the estimate's
    volume, zero padding: sum_q psf[q] estimate[p + o + c - q]."""
    c = [k // 2 for k in psf.shape]
    d, h, w = image_shape
    o = [(b - s) // 2 for s, b in zip((d, h, w), estimate.shape[2:], strict=True)]
    padded = F.pad(estimate, (c[2], c[2], c[1], c[1], c[0], c[0]))
    full = F.conv3d(padded, torch.flip(psf, (0, 1, 2))[None, None])
    return full[:, :, o[0]:o[0] + d, o[1]:o[1] + h, o[2]:o[2] + w]


def psf_conv_ratio(image: torch.Tensor, estimate: torch.Tensor, psf: torch.Tensor,
                   background: float = 0.0, eps: float = 1e-12) -> torch.Tensor:
    """image [N, 1, d, h, w] / max(psf * estimate + background, eps)."""
    blurred = psf_conv_blur(tuple(image.shape[2:]), estimate, psf)
    return image / torch.clamp_min(blurred + background, eps)


def psf_conv_backproject(estimate: torch.Tensor, ratio: torch.Tensor, psf: torch.Tensor) -> torch.Tensor:
    """(psf^T * ratio) on the estimate's voxels [N, 1, D, H, W]: sum_q psf[q] ratio[e - o - c + q],
    ratio zero outside its box."""
    c = [k // 2 for k in psf.shape]
    o = _offsets(ratio, estimate)
    D, H, W = estimate.shape[2:]
    d, h, w = ratio.shape[2:]
    # ratio placed at offset o in an estimate-sized volume, then padded by c.
    ext = F.pad(ratio, (o[2] + c[2], W - w - o[2] + c[2], o[1] + c[1], H - h - o[1] + c[1],
                        o[0] + c[0], D - d - o[0] + c[0]))
    return F.conv3d(ext, psf[None, None])


def psf_conv_update(estimate: torch.Tensor, ratio: torch.Tensor, psf: torch.Tensor, weights=None,
                    tv: float = 0.0, clamp_min: float = 0.0, tv_eps: float = 1e-6) -> torch.Tensor:
    """rl_update of estimate [N, 1, D, H, W] with correction psf^T * ratio [N, 1, d, h, w]; the TV
    neighbours are 0 beyond the estimate."""
    return _update(estimate, psf_conv_backproject(estimate, ratio, psf), weights, tv, tv_eps,
                   clamp_min, False)


def psf_conv_update_biggs(estimate, ratio, psf, previous=None, change=None, weights=None, tv=0.0,
                          clamp_min=0.0, tv_eps=1e-6):
    """The in-place op's results, as rl_update_biggs."""
    new = psf_conv_update(estimate, ratio, psf, weights, tv, clamp_min, tv_eps)
    return _biggs(new, estimate, previous, change)
