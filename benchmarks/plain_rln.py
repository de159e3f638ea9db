"""Plain-PyTorch baselines: one RLN layer and the whole RLN as users write them (cat, F.conv3d, BN, softplus)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rln_fast.models.rln import _BNS, _CONVS, _E7_SHAPE, RLN

# (inputs' channels, Cout, skip) of the fused RLN's conv layers: e1/u1, u2, e3, e4/u3/u5, e5/u4,
# e6/u7, u6.
LAYERS = [((1,), 4, False), ((4,), 4, True), ((4, 4), 4, True), ((1,), 8, False),
          ((8,), 8, False), ((8, 8), 8, False), ((8, 1, 1), 8, False)]


def plain_layer(xs, w, b, skip):
    """cat + F.conv3d + softplus (+ softplus(skip)): what one fused conv3d call replaces."""
    x = torch.cat(xs, 1) if len(xs) > 1 else xs[0]
    y = F.softplus(F.conv3d(x, w, b, padding=1))
    return y + F.softplus(skip) if skip is not None else y


class PlainRLN(nn.Module):
    """The RLN written as users would in plain PyTorch: F.conv3d, torch.cat, BatchNorm3d, softplus.

    Same parameter names as rln_fast's RLN, so ``load_state_dict(rln.state_dict())`` copies it.
    """

    def __init__(self) -> None:
        super().__init__()
        for name, (cout, cin) in _CONVS.items():
            self.register_parameter(name, nn.Parameter(torch.empty(cout, cin, 3, 3, 3)))
        self.e7 = nn.Parameter(torch.empty(*_E7_SHAPE))
        for name, c in _BNS.items():
            self.add_module(name, nn.BatchNorm3d(c, eps=1e-3, momentum=0.01))

    def _c(self, t: torch.Tensor, name: str) -> torch.Tensor:
        return F.conv3d(t, getattr(self, name), padding=1)

    def _bsp(self, t: torch.Tensor, name: str) -> torch.Tensor:
        return F.softplus(getattr(self, f"bn_{name}")(self._c(t, name)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        sp = F.softplus
        xd = F.avg_pool3d(x, 2)
        a1 = self._bsp(xd, "e1")
        a2 = self._bsp(a1, "e2")
        a3 = self._bsp(torch.cat([a1, a2], 1), "e3") + sp(xd)
        r1 = self.bn_t1(xd / (a3.mean(1, keepdim=True) + 1e-4))
        b1 = self._bsp(r1, "e4")
        b2 = self._bsp(b1, "e5")
        b3 = self._bsp(torch.cat([b2, b1], 1), "e6")
        op = tuple(s % 2 for s in x.shape[2:])
        up = sp(self.bn_e7(F.conv_transpose3d(b3, self.e7, stride=2, output_padding=op)))
        bp1 = self._bsp(up, "e8")
        e1pre = x * bp1.mean(1, keepdim=True)
        e1 = sp(self.bn_t2(e1pre))
        c1 = self._bsp(x, "u1")
        c2 = self._bsp(c1, "u2") + sp(x)
        r2 = self.bn_t3(x / (c2.mean(1, keepdim=True) + 1e-4))
        d1 = self._bsp(r2, "u3")
        d2 = self._bsp(d1, "u4") + 1.0
        e2pre = e1 * d2.mean(1, keepdim=True)
        e2 = sp(self.bn_t4(e2pre))
        m1 = sp(self._c(e2, "u5"))
        m2 = sp(self._c(torch.cat([m1, e2, e1], 1), "u6"))
        m3 = self._bsp(torch.cat([m1, m2], 1), "u7")
        return {"E1pre": e1pre, "output": m3.mean(1, keepdim=True)}


def plain_copy(model: RLN) -> PlainRLN:
    """A PlainRLN with the weights, statistics, device and mode of `model`."""
    plain = PlainRLN().to(next(model.parameters()).device)
    plain.load_state_dict(model.state_dict())
    return plain.train(model.training)
