"""Plain-PyTorch baselines: one RLN layer as users write it (cat, F.conv3d, softplus), and the
whole RLN (rln_fast.bench.PlainRLN, shared with `rln-fast bench`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rln_fast.bench import PlainRLN
from rln_fast.models.rln import RLN

__all__ = ["LAYERS", "PlainRLN", "plain_copy", "plain_layer"]

# (inputs' channels, Cout, skip) of the fused RLN's conv layers: e1/u1, u2, e3, e4/u3/u5, e5/u4,
# e6/u7, u6.
LAYERS = [((1,), 4, False), ((4,), 4, True), ((4, 4), 4, True), ((1,), 8, False),
          ((8,), 8, False), ((8, 8), 8, False), ((8, 1, 1), 8, False)]


def plain_layer(xs, w, b, skip):
    """cat + F.conv3d + softplus (+ softplus(skip)): what one fused conv3d call replaces."""
    x = torch.cat(xs, 1) if len(xs) > 1 else xs[0]
    y = F.softplus(F.conv3d(x, w, b, padding=1))
    return y + F.softplus(skip) if skip is not None else y


def plain_copy(model: RLN) -> PlainRLN:
    """A PlainRLN with the weights, statistics, device and mode of `model`."""
    plain = PlainRLN().to(next(model.parameters()).device)
    plain.load_state_dict(model.state_dict())
    return plain.train(model.training)
