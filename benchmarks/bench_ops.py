"""Fused conv3d per RLN layer shape vs the plain-torch equivalent (cat + F.conv3d + softplus + add), CPU.

Run: python -m pytest benchmarks/bench_ops.py --benchmark-json benchmarks/results/ops_cpu.json
Each test checks the results agree, times ours with pytest-benchmark and the baseline in the
same run, and records both medians and the ratio in extra_info.
"""

from __future__ import annotations

import pytest
import torch

from rln_fast import ops

from .conftest import median_time, rel_err, run_info
from .plain_rln import LAYERS, plain_layer

SHAPE = (64, 128, 128)

@pytest.mark.parametrize("chans,cout,has_skip", LAYERS,
                         ids=[f"{sum(c)}to{o}" for c, o, _ in LAYERS])
def test_conv3d_layer_cpu(benchmark, chans, cout, has_skip):
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, c, *SHAPE, generator=g) for c in chans]
    w = torch.randn(cout, sum(chans), 3, 3, 3, generator=g) * 0.2
    b = torch.randn(cout, generator=g)
    skip = torch.randn(1, 1, *SHAPE, generator=g) if has_skip else None
    with torch.inference_mode():
        ours = ops.conv3d(xs, w, b, "softplus", skip)
        base = plain_layer(xs, w, b, skip)
        err = rel_err(ours, base)
        assert err <= 1e-5
        t_base = median_time(lambda: plain_layer(xs, w, b, skip), rounds=5)
        benchmark.pedantic(lambda: ops.conv3d(xs, w, b, "softplus", skip), rounds=5, warmup_rounds=1)
    t_ours = benchmark.stats.stats.median
    benchmark.extra_info.update(run_info("cpu", SHAPE), layer=f"{sum(chans)}->{cout}",
                                ours_s=t_ours, plain_torch_s=t_base, ratio=t_base / t_ours,
                                rel_err=err)
