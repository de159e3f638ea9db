"""RLN inference on the CPU: the fused form vs a plain-PyTorch eager RLN with the same weights.

Run: python -m pytest benchmarks/bench_rln.py --benchmark-json benchmarks/results/rln_cpu.json
64 x 128 x 128 voxels, 2 threads; the outputs are checked to agree before timing. Uses the
official checkpoint when ../shared is beside the checkout, else a seeded random model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rln_fast.models.rln import RLN

from .conftest import median_time, rel_err, run_info
from .plain_rln import plain_copy

SHAPE = (64, 128, 128)
CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "official_rln" / "model.ckpt"


def _model() -> tuple[RLN, str]:
    if CHECKPOINT.with_suffix(".ckpt.index").exists():
        return RLN.from_official_checkpoint(CHECKPOINT).eval(), "official checkpoint"
    torch.manual_seed(0)
    return RLN().eval(), "random initialisation"


def test_rln_inference_cpu(benchmark):
    torch.set_num_threads(2)
    model, weights = _model()
    fused, plain = model.fuse(), plain_copy(model)
    x = torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = fused(x)
        base = plain(x)
        err = rel_err(ours, base)
        assert err <= 1e-5
        t_plain = median_time(lambda: plain(x), rounds=3)
        benchmark.pedantic(lambda: fused(x), rounds=3, warmup_rounds=1)
    t_ours = benchmark.stats.stats.median
    vox = x.numel()
    benchmark.extra_info.update(run_info("cpu", SHAPE), weights=weights, ours_s=t_ours,
                                plain_torch_s=t_plain, ratio=t_plain / t_ours, rel_err=err,
                                ours_mvox_per_s=vox / t_ours / 1e6,
                                plain_mvox_per_s=vox / t_plain / 1e6)
