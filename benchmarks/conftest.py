"""Benchmark helpers: timing of the baseline inside the same run, agreement checks, run metadata."""

from __future__ import annotations

import platform
import statistics
import time

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str = "cpu", rounds: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_info(device: str, shape) -> dict:
    info = {"device": device, "torch": torch.__version__, "shape": list(shape),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
