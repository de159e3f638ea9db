"""The RLN forward written in plain PyTorch (cat, F.conv3d, BatchNorm, softplus): the baseline users have."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _bn(t: torch.Tensor, bn: torch.nn.BatchNorm3d) -> torch.Tensor:
    return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def plain_rln_forward(m, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode RLN forward of the weights of `m` (an rln_fast.RLN), with torch ops only."""
    sp = F.softplus

    def conv(t, name, bn=None):
        y = F.conv3d(t, getattr(m, name), padding=1)
        return sp(_bn(y, getattr(m, bn))) if bn else sp(y)

    D, H, W = x.shape[2:]
    xd = F.avg_pool3d(x, 2)
    a1 = conv(xd, "e1", "bn_e1")
    a2 = conv(a1, "e2", "bn_e2")
    a3 = conv(torch.cat([a1, a2], 1), "e3", "bn_e3") + sp(xd)
    r1 = _bn(xd / (a3.mean(1, keepdim=True) + 1e-4), m.bn_t1)
    b1 = conv(r1, "e4", "bn_e4")
    b2 = conv(b1, "e5", "bn_e5")
    b3 = conv(torch.cat([b2, b1], 1), "e6", "bn_e6")
    up = sp(_bn(F.conv_transpose3d(b3, m.e7, stride=2, output_padding=(D % 2, H % 2, W % 2)), m.bn_e7))
    u2 = conv(up, "e8", "bn_e8")
    e1pre = x * u2.mean(1, keepdim=True)
    e1 = sp(_bn(e1pre, m.bn_t2))
    c1 = conv(x, "u1", "bn_u1")
    c2 = conv(c1, "u2", "bn_u2") + sp(x)
    r2 = _bn(x / (c2.mean(1, keepdim=True) + 1e-4), m.bn_t3)
    d1 = conv(r2, "u3", "bn_u3")
    d2 = conv(d1, "u4", "bn_u4") + 1
    e2 = sp(_bn(e1 * d2.mean(1, keepdim=True), m.bn_t4))
    m1 = conv(e2, "u5")
    m2 = conv(torch.cat([m1, e2, e1], 1), "u6")
    m3 = conv(torch.cat([m1, m2], 1), "u7", "bn_u7")
    return m3.mean(1, keepdim=True)
