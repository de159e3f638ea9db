"""rln_fast.nn layers: equal to their nn equivalents, own their parameters, train, print usefully."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rln_fast import nn as rnn
from rln_fast.ops import reference


def test_fused_conv3d_equals_nn_conv3d_chain():
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 4, 3, padding=1).double()
    fused = rnn.FusedConv3d.from_conv3d(conv, act="softplus")
    a, b = torch.randn(2, 2, 5, 6, 7, dtype=torch.float64), torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    skip = torch.randn(2, 1, 5, 6, 7, dtype=torch.float64)
    want = reference.softplus(conv(torch.cat([a, b], 1))) + reference.softplus(skip)
    torch.testing.assert_close(fused([a, b], skip), want, rtol=1e-10, atol=1e-12)


def test_fused_conv3d_trains_like_nn_conv3d():
    torch.manual_seed(1)
    conv = nn.Conv3d(3, 2, 3, padding=1)
    fused = rnn.FusedConv3d.from_conv3d(conv)
    x = torch.randn(1, 3, 4, 5, 6)
    F.mse_loss(conv(x), torch.zeros(1, 2, 4, 5, 6)).backward()
    F.mse_loss(fused(x), torch.zeros(1, 2, 4, 5, 6)).backward()
    torch.testing.assert_close(fused.weight.grad, conv.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused.bias.grad, conv.bias.grad, rtol=1e-4, atol=1e-6)


def test_parameters_reset_and_repr():
    m = rnn.FusedConv3d(8, 4, bias=False, act="softplus")
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    before = m.weight.detach().clone()
    m.reset_parameters()
    assert not torch.equal(before, m.weight)
    assert repr(m) == "FusedConv3d(8, 4, bias=False, act='softplus')"
    assert repr(rnn.RLDivide()) == "RLDivide()"
    assert repr(rnn.RLDivide(scale=2.0, gradients="paper")) == "RLDivide(scale=2, gradients='paper')"
    assert repr(rnn.RLMultiply(offset=1.0)) == "RLMultiply(offset=1)"


def test_rl_modules_match_reference():
    x = torch.rand(1, 1, 3, 4, 5, dtype=torch.float64) + 0.1
    fp = torch.rand(1, 4, 3, 4, 5, dtype=torch.float64) + 0.1
    torch.testing.assert_close(rnn.RLDivide(1e-3, 2.0, 0.5)(x, fp), reference.rl_divide(x, fp, 1e-3, 2.0, 0.5))
    torch.testing.assert_close(rnn.RLMultiply(1.0)(x, fp), reference.rl_multiply(x, fp, 1.0))


@pytest.mark.parametrize("bad", [
    lambda: rnn.FusedConv3d(1, 1, act="relu"),
    lambda: rnn.FusedConv3d(0, 1),
    lambda: rnn.RLDivide(gradients="other"),
    lambda: rnn.RLMultiply(gradients="other"),
    lambda: rnn.FusedConv3d.from_conv3d(nn.Conv3d(1, 1, 5, padding=2)),
])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        bad()
