"""One RLN training step (forward + loss + backward + Adam): rln_fast ops vs plain PyTorch.

Batch 4 × 64³ on CUDA (DESIGN's anchor: 49 ms fp32 on an H100 for plain PyTorch). On the
CPU the crop defaults to 32³ (a 64³ step takes seconds on 2 cores); set
RLN_BENCH_TRAIN_CROP=64 to force the full size. RLN_BENCH_TRAIN_INIT=default (or a model's
path) starts both models from trained weights instead of a seeded random initialisation.
Both models start from the same weights, see the same normalised phantom crops and use the
recipe's loss (rln_fast.train.rln_loss);
the losses and gradients are checked to agree before anything is timed. Our model uses
exact gradients and nn.BatchNorm3d (gradients="exact", bn="torch") so that plain autograd
computes the same step.

Run: pytest benchmarks/bench_train.py --benchmark-json=benchmarks/results/<file>.json
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import pytest
import torch
from torch import nn

from rln_fast.models.rln import RLN
from rln_fast.train import TrainConfig, _Stream, _to_device, _Volumes, rln_loss

from .plain_rln import PlainRLN

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
]
BATCH = 4
ROUNDS = 5


def _crop(device: str) -> int:
    env = os.environ.get("RLN_BENCH_TRAIN_CROP")
    if env:
        return int(env)
    return 64 if device == "cuda" else 32


def _batch(crop: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One recipe batch: BATCH crops of one 128³ phantom pair, normalised per crop."""
    c = TrainConfig(n_volumes=1, n_val=0, crop=(crop,) * 3, batch_size=BATCH, device=device)
    return _to_device(*_Stream(c, _Volumes(c)).next_batch(), c, torch.device(device))


def _models(device: str) -> tuple[RLN, PlainRLN]:
    ours = RLN(gradients="exact", bn="torch")
    init = os.environ.get("RLN_BENCH_TRAIN_INIT")
    if init:  # fine-tuning: a trained model's activations reach the subnormal range
        trained = RLN.from_pretrained() if init == "default" else RLN.load(init)
        ours.load_state_dict(trained.state_dict())
    else:
        ours.reset_parameters(generator=torch.Generator().manual_seed(0))
    plain = PlainRLN()
    plain.load_state_dict(ours.state_dict())
    return ours.to(device).train(), plain.to(device).train()


def _stepper(model: nn.Module, x: torch.Tensor, gt: torch.Tensor, call):
    opt = torch.optim.Adam(model.parameters(), lr=0.025, betas=(0.9, 0.999), eps=1e-8)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss, _ = rln_loss(call(x), x, gt)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def _loss_and_grads(model: nn.Module, call, x: torch.Tensor, gt: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss, _ = rln_loss(call(x), x, gt)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def _check_agree(ours: RLN, plain: PlainRLN, x: torch.Tensor, gt: torch.Tensor) -> float:
    """Same float32 loss, and the same gradients in float64, from both models (no update).

    Gradients are compared in float64: in float32 the BN_t1/BN_t3 weight gradients are sums
    that cancel to ~1e-7, where rounding alone moves them by ~1% of their size.
    """
    o32, p32 = copy.deepcopy(ours), copy.deepcopy(plain)
    loss_ours, _ = _loss_and_grads(o32, lambda t: o32(t, return_intermediates=True), x, gt)
    loss_plain, _ = _loss_and_grads(p32, lambda t: p32(t, return_intermediates=True), x, gt)
    assert loss_ours == pytest.approx(loss_plain, rel=1e-4), (loss_ours, loss_plain)
    o64, p64 = copy.deepcopy(ours).double(), copy.deepcopy(plain).double()
    x64, gt64 = x.double(), gt.double()
    _, g_ours = _loss_and_grads(o64, lambda t: o64(t, return_intermediates=True), x64, gt64)
    _, g_plain = _loss_and_grads(p64, lambda t: p64(t, return_intermediates=True), x64, gt64)
    for k, g in g_ours.items():
        ref = g_plain[k]
        err = float((g - ref).abs().max()) / max(float(ref.abs().max()), 1e-300)
        assert err < 1e-6, f"gradient of {k} differs by {err:.2e} (relative to its max)"
    return loss_ours


def _median_time(step, rounds: int = ROUNDS) -> float:
    step()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _info(benchmark, device: str, crop: int) -> None:
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "shape": [BATCH, 1, crop, crop, crop],
        "step": "forward + rln_loss + backward + Adam",
        "init": os.environ.get("RLN_BENCH_TRAIN_INIT") or "random (seed 0)",
    })


@pytest.mark.parametrize("device", DEVICES)
def test_train_step_rln_fast(benchmark, device):
    crop = _crop(device)
    x, gt = _batch(crop, device)
    ours, plain = _models(device)
    loss = _check_agree(ours, plain, x, gt)
    # The baseline, timed the same way in the same run, for the ratio.
    plain_s = _median_time(_stepper(plain, x, gt, lambda t: plain(t, return_intermediates=True)))
    step = _stepper(ours, x, gt, lambda t: ours(t, return_intermediates=True))
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    ours_s = benchmark.stats.stats.median
    _info(benchmark, device, crop)
    benchmark.extra_info.update({
        "loss_checked": loss, "plain_median_s": plain_s, "ours_median_s": ours_s,
        "speedup_vs_plain": plain_s / ours_s,
    })


@pytest.mark.parametrize("device", DEVICES)
def test_train_step_plain_torch(benchmark, device):
    crop = _crop(device)
    x, gt = _batch(crop, device)
    _, plain = _models(device)
    plain_step = _stepper(plain, x, gt, lambda t: plain(t, return_intermediates=True))
    benchmark.pedantic(plain_step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _info(benchmark, device, crop)
