"""Classic RL, time per iteration: rln_fast vs scikit-image vs a plain-torch FFT RL loop.

64x256x256 image, 15x31x31 PSF. Every baseline is checked against the matching rln_fast mode
first, then all are timed in one run, interleaved, and the ratios go to ``extra_info`` and to
benchmarks/results/bench_rl_<device>.json ($OUT when set). Not part of the default test run:

    pytest benchmarks/bench_rl.py --benchmark-json=benchmarks/results/bench_rl_pytest.json

Per-iteration time = (t(N2) - t(N1)) / (N2 - N1), each t the best of a few interleaved runs, so
set-up (OTF, weights, conversions) is not counted and machine noise hits every method alike.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import rln_fast
from rln_fast import psf as psf_models
from rln_fast.bench import plain_rl_periodic
from rln_fast.rl import richardson_lucy

SHAPE = (64, 256, 256)
PSF_SHAPE = (15, 31, 31)
N1, N2 = 2, 6
REPEATS = 3
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA GPU"))]
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    psf = psf_models.gaussian(PSF_SHAPE, 1.0, sigma=(2.0, 3.0, 3.0))
    obj = np.zeros(SHAPE, np.float32)
    idx = tuple(rng.integers(0, n, 400) for n in SHAPE)
    obj[idx] = rng.uniform(100, 1000, 400)
    from scipy.signal import fftconvolve

    img = np.maximum(fftconvolve(obj, psf, mode="same"), 0) + 10
    return rng.poisson(img).astype(np.float32), psf


def _fast_len(n: int) -> int:
    from scipy.fft import next_fast_len

    return next_fast_len(n, real=True)


def _otf(psf: np.ndarray, shape, device) -> torch.Tensor:
    k = torch.zeros(shape, device=device)
    k[: psf.shape[0], : psf.shape[1], : psf.shape[2]] = torch.from_numpy(psf)
    return torch.fft.rfftn(torch.roll(k, [-(n // 2) for n in psf.shape], (0, 1, 2)))


def torch_periodic(img: torch.Tensor, otf: torch.Tensor, n: int) -> torch.Tensor:
    """Plain RL with circular convolution, as a user writes it in torch (OTF made beforehand)."""
    return plain_rl_periodic(img, None, n, otf=otf)


def torch_padded(img: torch.Tensor, psf: np.ndarray, otf: torch.Tensor, n: int) -> torch.Tensor:
    """Plain RL with zero-padded 'same' convolution (scikit-image's model), in torch."""
    m = img.shape
    big = tuple(_fast_len(a + b - 1) for a, b in zip(m, psf.shape, strict=True))
    x = torch.full_like(img, float(img.mean()))

    def conv(v, spec):
        pad = torch.zeros(big, device=v.device)
        pad[: m[0], : m[1], : m[2]] = v
        out = torch.fft.irfftn(torch.fft.rfftn(pad) * spec, s=big)
        return out[: m[0], : m[1], : m[2]]

    for _ in range(n):
        x = x * conv(img / conv(x, otf), otf.conj())
    return x


def skimage_rl(img: np.ndarray, psf: np.ndarray, n: int) -> np.ndarray:
    from skimage.restoration import richardson_lucy as sk

    return sk(img, psf, num_iter=n, clip=False, filter_epsilon=1e-12)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _per_iteration(fns: dict, device) -> dict[str, float]:
    best = {k: {N1: np.inf, N2: np.inf} for k in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            for n in (N1, N2):
                _sync(device)
                t = time.perf_counter()
                fn(n)
                _sync(device)
                best[name][n] = min(best[name][n], time.perf_counter() - t)
    return {k: (v[N2] - v[N1]) / (N2 - N1) for k, v in best.items()}


def _phases(img: torch.Tensor, psf: np.ndarray, edges: str, acceleration) -> dict[str, float]:
    """Seconds per call of each step of one CPU iteration (best of interleaved rounds): where the
    time goes. Uses rln_fast.rl's private job, as the solver runs it."""
    from rln_fast import rl as rl_mod
    from rln_fast.ops import rl_classic as ops

    k = rl_mod._prepare_psf(psf, tuple(img.shape), "fft", edges)
    level = float(img.mean())
    job = rl_mod._FFTJob(img, k, edges, bg=0.0, eps=1e-6 * level, tv=0.0, tv_eps=1e-3 * level)
    x = job.initial(level)
    y, step, change, out = x.clone(), x.clone(), torch.zeros_like(x), torch.empty_like(x)
    biggs = acceleration == "biggs"
    if job._plans is not None:
        fft, spec, real = job._plans, job._spec, job._real
        steps = {"rfftn": lambda: fft.r2c(y, spec), "irfftn": lambda: fft.c2r(spec, real),
                 # the transforms of the ratio and to the blurred estimate, which skip the planes
                 # outside the image on the Bertero job
                 "rfftn_image_planes": lambda: fft.r2c_box(real, spec),
                 "irfftn_image_planes": lambda: fft.c2r_box(spec, real)}
    else:
        spec = torch.fft.rfftn(y[0, 0])
        steps = {"rfftn": lambda: torch.fft.rfftn(y[0, 0]),
                 "irfftn": lambda: torch.fft.irfftn(spec, s=job.shape)}
    steps["otf_multiply"] = lambda: job._blur_spectrum_(spec, False)
    steps["rl_ratio"] = lambda: ops.rl_ratio_(out, job.image5, 0.0, 1e-6)
    kw = dict(previous=step, change=change) if biggs else {}
    steps["rl_update"] = lambda: ops.rl_update_(out, y, job.weights, 0.0, 0.0, 1e-3, **kw)
    if job.weights is not None:  # the Bertero weights' share: the same update without them
        steps["rl_update_no_weights"] = lambda: ops.rl_update_(out, y, None, 0.0, 0.0, 1e-3, **kw)
    if biggs:  # the fused prediction, into a buffer of its own
        pred = torch.zeros_like(x)
        steps["prediction"] = lambda: ops.rl_predict_(pred, x, 0.5)
    steps["iteration"] = lambda: job.recycle(
        job.update_(y, step if biggs else None, change if biggs else None)[0])
    best = dict.fromkeys(steps, np.inf)
    for _ in range(REPEATS + 2):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    best["work_shape"] = job.shape
    best["dfti"] = job._plans is not None
    return best


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("edges,acceleration", [("bertero", "biggs"), ("periodic", None)])
def test_rl_per_iteration(benchmark, data, device, edges, acceleration):
    img_np, psf = data
    img = torch.from_numpy(img_np).to(device)
    padded_shape = tuple(_fast_len(a + b - 1) for a, b in zip(SHAPE, psf.shape, strict=True))
    otf_periodic = _otf(psf, SHAPE, device)
    otf_padded = _otf(psf, padded_shape, device)

    def ours(n):
        # background 0: the baselines model none (the default "auto" would subtract the 1st
        # percentile and give another result)
        return richardson_lucy(img, psf, n, edges=edges, acceleration=acceleration, background=0.0,
                               progress=False)

    # Check first: each baseline against the rln_fast mode with the same model.
    c = 3
    checks = {}
    if edges == "periodic":
        checks["torch_periodic_vs_ours"] = _rel(torch_periodic(img, otf_periodic, c).cpu(), ours(c).cpu())
        assert checks["torch_periodic_vs_ours"] < 1e-4
    plain = richardson_lucy(img, psf, c, edges="bertero", acceleration=None, background=0.0,
                            progress=False).cpu()
    padded = torch_padded(img, psf, otf_padded, c).cpu()
    # Bertero and zero padding differ near the borders only: compare the interior.
    inner = tuple(slice(c * (k // 2), -c * (k // 2)) for k in psf.shape)
    checks["torch_padded_vs_ours_bertero_interior"] = _rel(padded[inner], plain[inner])
    assert checks["torch_padded_vs_ours_bertero_interior"] < 1e-3
    if device == "cpu":
        checks["skimage_vs_torch_padded"] = _rel(skimage_rl(img_np, psf, c), padded)
        assert checks["skimage_vs_torch_padded"] < 1e-3

    fns = {"rln_fast": ours,
           "torch_periodic": lambda n: torch_periodic(img, otf_periodic, n),
           "torch_padded": lambda n: torch_padded(img, psf, otf_padded, n)}
    if device == "cpu":
        fns["skimage"] = lambda n: skimage_rl(img_np, psf, n)
    per_it = _per_iteration(fns, device)
    same_model = "torch_periodic" if edges == "periodic" else "torch_padded"
    info = {
        "shape": SHAPE, "psf": PSF_SHAPE, "edges": edges, "acceleration": acceleration,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "rln_fast": rln_fast.__version__,
        "seconds_per_iteration": per_it,
        "speedup_vs_torch_same_model": per_it[same_model] / per_it["rln_fast"],
        "speedup_vs_torch_periodic": per_it["torch_periodic"] / per_it["rln_fast"],
        "checks_max_rel_diff": checks,
    }
    if "skimage" in per_it:
        info["speedup_vs_skimage"] = per_it["skimage"] / per_it["rln_fast"]
    if device == "cpu":
        info["phase_seconds"] = _phases(img, psf, edges, acceleration)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ours(N1)
        info["peak_bytes_per_image_voxel"] = (torch.cuda.max_memory_allocated() - base) / img.numel()
    benchmark.extra_info.update(info)
    RESULTS[f"{device}-{edges}-{acceleration}"] = info
    benchmark.pedantic(ours, args=(N2,), rounds=1, iterations=1)
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_rl_{device}.json").write_text(
        json.dumps({k: v for k, v in RESULTS.items() if k.startswith(device)}, indent=1, default=str))
    print(json.dumps(info, indent=1, default=str))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("edges,acceleration", [("bertero", "biggs"), ("periodic", None)])
def test_rl_per_iteration_cuda_large(benchmark, edges, acceleration):
    """128x512x512 on the GPU: rln_fast vs the plain-torch loop, time and peak memory."""
    shape = (128, 512, 512)
    psf = psf_models.gaussian(PSF_SHAPE, 1.0, sigma=(2.0, 3.0, 3.0))
    g = torch.Generator(device="cuda").manual_seed(0)
    img = torch.rand(shape, device="cuda", generator=g) * 100 + 10
    otf = _otf(psf, shape, "cuda")

    def ours(n):
        # background 0: the baselines model none (the default "auto" would subtract the 1st
        # percentile and give another result)
        return richardson_lucy(img, psf, n, edges=edges, acceleration=acceleration, background=0.0,
                               progress=False)

    if edges == "periodic":
        assert _rel(torch_periodic(img, otf, 3).cpu(), ours(3).cpu()) < 1e-4
    per_it = _per_iteration({"rln_fast": ours, "torch_periodic": lambda n: torch_periodic(img, otf, n)},
                            "cuda")
    peak = {}
    for name, fn in (("rln_fast", ours), ("torch_periodic", lambda n: torch_periodic(img, otf, n))):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(N1)
        torch.cuda.synchronize()
        peak[name] = (torch.cuda.max_memory_allocated() - base) / img.numel()
    info = {"shape": shape, "psf": PSF_SHAPE, "edges": edges, "acceleration": acceleration,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "seconds_per_iteration": per_it,
            "speedup_vs_torch_periodic": per_it["torch_periodic"] / per_it["rln_fast"],
            "gvoxel_iterations_per_s": img.numel() / per_it["rln_fast"] / 1e9,
            "peak_bytes_per_image_voxel": peak}
    benchmark.extra_info.update(info)
    RESULTS[f"cuda-large-{edges}-{acceleration}"] = info
    benchmark.pedantic(ours, args=(N2,), rounds=1, iterations=1)
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_rl_cuda.json").write_text(
        json.dumps({k: v for k, v in RESULTS.items() if k.startswith("cuda")}, indent=1, default=str))
    print(json.dumps(info, indent=1, default=str))
