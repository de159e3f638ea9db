"""`rln-fast bench`: time our RLN inference and Richardson–Lucy against plain-PyTorch baselines.

Each comparison checks first that ours and the baseline agree (max |a − b| / max |b|), then
times them interleaved (warm-up, then the median of a few runs, synchronised on CUDA) so that
machine noise hits both alike. The baselines are what a user would write without rln_fast:

- RLN inference: the same network and weights in eager PyTorch (``torch.cat``,
  ``F.conv3d``, ``F.batch_norm`` with the running statistics, ``F.softplus``), against
  ``RLN.from_pretrained().fuse()``.
- Richardson–Lucy: the textbook loop with circular FFT convolution (``torch.fft.rfftn``),
  against ``richardson_lucy(..., edges="periodic", acceleration=None)``, the same model.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rln_fast.models.rln import _BNS, _CONVS, _E7_SHAPE, RLN

__all__ = ["PlainRLN", "plain_rl_periodic", "run_bench", "QUICK_SIZE", "FULL_SIZE"]

QUICK_SIZE = (32, 64, 64)
FULL_SIZE = (64, 128, 128)
# Agreement required before anything is timed: float32 kernels against float32 eager PyTorch,
# the same bounds as benchmarks/bench_rln.py and benchmarks/bench_rl.py.
RLN_TOLERANCE = 1e-5
RL_TOLERANCE = 1e-4
_RL_PSF_SIGMA_VOXELS = (2.0, 1.5, 1.5)


class PlainRLN(nn.Module):
    """The RLN in eager PyTorch: what the fused form (inference) and RLN (training) are
    measured against.

    Parameter and buffer names match ``RLN``, so ``load_state_dict(rln.state_dict())``
    copies a trained model. x [N, 1, D, H, W] -> output [N, 1, D, H, W], or with
    ``return_intermediates=True`` the dict {"E1pre", "output"} the training loss needs.
    """

    def __init__(self) -> None:
        super().__init__()
        for name, (cout, cin) in _CONVS.items():
            self.register_parameter(name, nn.Parameter(torch.empty(cout, cin, 3, 3, 3)))
        self.e7 = nn.Parameter(torch.empty(*_E7_SHAPE))
        for name, c in _BNS.items():
            self.add_module(name, nn.BatchNorm3d(c, eps=1e-3, momentum=0.01))

    @classmethod
    def from_rln(cls, model: RLN) -> PlainRLN:
        ref = next(model.parameters())
        plain = cls().to(device=ref.device, dtype=ref.dtype)
        plain.load_state_dict(model.state_dict())
        return plain.eval()

    def _conv_bn_sp(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.softplus(getattr(self, f"bn_{name}")(F.conv3d(x, getattr(self, name), padding=1)))

    def forward(self, x: torch.Tensor, return_intermediates: bool = False) -> Any:
        sp, cat = F.softplus, torch.cat
        # Estimation at half resolution: forward projection, ratio, back projection.
        xd = F.avg_pool3d(x, 2)
        a1 = self._conv_bn_sp(xd, "e1")
        a2 = self._conv_bn_sp(a1, "e2")
        a3 = self._conv_bn_sp(cat([a1, a2], 1), "e3") + sp(xd)
        r1 = self.bn_t1(xd / (a3.mean(1, keepdim=True) + 1e-4))
        b1 = self._conv_bn_sp(r1, "e4")
        b2 = self._conv_bn_sp(b1, "e5")
        b3 = self._conv_bn_sp(cat([b2, b1], 1), "e6")
        pad = tuple(s % 2 for s in x.shape[2:])
        up = sp(self.bn_e7(F.conv_transpose3d(b3, self.e7, stride=2, output_padding=pad)))
        e1pre = x * self._conv_bn_sp(up, "e8").mean(1, keepdim=True)
        e1 = sp(self.bn_t2(e1pre))
        # Update at full resolution.
        c1 = self._conv_bn_sp(x, "u1")
        c2 = self._conv_bn_sp(c1, "u2") + sp(x)
        r2 = self.bn_t3(x / (c2.mean(1, keepdim=True) + 1e-4))
        d1 = self._conv_bn_sp(r2, "u3")
        d2 = self._conv_bn_sp(d1, "u4") + 1.0
        e2 = sp(self.bn_t4(e1 * d2.mean(1, keepdim=True)))
        # Merge.
        m1 = sp(F.conv3d(e2, self.u5, padding=1))
        m2 = sp(F.conv3d(cat([m1, e2, e1], 1), self.u6, padding=1))
        out = self._conv_bn_sp(cat([m1, m2], 1), "u7").mean(1, keepdim=True)
        return {"E1pre": e1pre, "output": out} if return_intermediates else out


def plain_rl_periodic(image: torch.Tensor, psf: torch.Tensor | None, num_iter: int,
                      otf: torch.Tensor | None = None) -> torch.Tensor:
    """Textbook Richardson–Lucy with circular FFT convolution, as users write it in torch.

    image (z, y, x); psf (z, y, x) with its centre at voxel ``shape // 2``, sum 1, or its
    ``otf`` (rfftn of the centred, wrapped PSF) when the caller made it already. Starts from
    the image mean, as ``richardson_lucy`` does.
    """
    if otf is None:
        kernel = torch.zeros_like(image)
        kernel[tuple(slice(0, n) for n in psf.shape)] = psf
        kernel = torch.roll(kernel, [-(n // 2) for n in psf.shape], (0, 1, 2))
        otf = torch.fft.rfftn(kernel)
    s = image.shape
    x = torch.full_like(image, float(image.mean()))
    for _ in range(num_iter):
        blurred = torch.fft.irfftn(torch.fft.rfftn(x) * otf, s=s)
        x = x * torch.fft.irfftn(torch.fft.rfftn(image / blurred) * otf.conj(), s=s)
    return x


# ------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pair(fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int,
               progress: Any = None) -> dict[str, float]:
    """Median seconds per call of each function, run interleaved after one warm-up call each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if progress is not None:
                progress.update(1)
    return {k: statistics.median(v) for k, v in times.items()}


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class BenchMismatch(RuntimeError):
    """Ours and the baseline disagree: the timings would compare different results."""


def _rl_image(size: tuple[int, int, int], psf: np.ndarray, seed: int) -> np.ndarray:
    """Sparse bright points on a background, blurred (circularly) by psf, Poisson noise."""
    rng = np.random.default_rng(seed)
    obj = np.full(size, 10.0)
    n = max(8, int(np.prod(size)) // 2000)
    obj[tuple(rng.integers(0, s, n) for s in size)] += rng.uniform(100, 1000, n)
    kernel = np.zeros(size)
    kernel[tuple(slice(0, k) for k in psf.shape)] = psf
    kernel = np.roll(kernel, [-(k // 2) for k in psf.shape], (0, 1, 2))
    spectrum = np.fft.rfftn(obj) * np.fft.rfftn(kernel)
    blurred = np.fft.irfftn(spectrum, s=size, axes=(0, 1, 2))
    return rng.poisson(np.maximum(blurred, 0.0)).astype(np.float32)


def run_bench(
    size: tuple[int, int, int] = FULL_SIZE,
    *,
    device: str | torch.device | None = None,
    rounds: int = 3,
    rl_iterations: int = 20,
    progress: bool = True,
) -> dict[str, Any]:
    """Run both comparisons on one volume size (z, y, x) and return a JSON-able report.

    Raises BenchMismatch when a pair disagrees beyond its tolerance (nothing is timed then),
    and ValueError for a bad size or a device that is not available.
    """
    from rln_fast import __version__
    from rln_fast import psf as psf_models
    from rln_fast.rl import clear_otf_cache, richardson_lucy

    if len(size) != 3 or any(int(s) != s or s < 4 for s in size):
        raise ValueError(f"size must be 3 integers >= 4 (z, y, x), got {tuple(size)}")
    size = tuple(int(s) for s in size)  # type: ignore[assignment]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {str(dev)!r}")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        # Two comparisons, each timing two methods ``rounds`` times.
        bar = tqdm(total=4 * rounds, desc="bench", unit="run", leave=False)
    results: dict[str, Any] = {}
    try:
        # RLN inference: fused vs eager PyTorch, the shipped weights on both.
        model = RLN.from_pretrained().to(dev).eval()
        fused, plain = model.fuse(), PlainRLN.from_rln(model)
        x = torch.rand((1, 1, *size), generator=torch.Generator().manual_seed(0)).to(dev)
        with torch.inference_mode():
            diff = _rel_diff(fused(x), plain(x))
            if not diff <= RLN_TOLERANCE:
                raise BenchMismatch(
                    f"fused RLN and plain PyTorch disagree (max rel diff {diff:.2e} > "
                    f"{RLN_TOLERANCE:g}); run `rln-fast info` and report it, timings skipped"
                )
            t = _time_pair({"ours": lambda: fused(x), "baseline": lambda: plain(x)}, dev, rounds,
                           bar)
        results["rln_inference"] = {
            "ours": "RLN.from_pretrained().fuse()",
            "baseline": "the same RLN in eager PyTorch (cat, conv3d, batch_norm, softplus)",
            "ours_s": t["ours"], "baseline_s": t["baseline"],
            "speedup": t["baseline"] / t["ours"], "max_rel_diff": diff,
            "mvoxel_per_s": x.numel() / t["ours"] / 1e6,
        }

        # Richardson–Lucy: same model (circular convolution, no acceleration) on both sides.
        psf_shape = tuple(min(s - (1 - s % 2), 15) for s in size)
        psf_np = psf_models.gaussian(psf_shape, 1.0, sigma=_RL_PSF_SIGMA_VOXELS)
        img = torch.from_numpy(_rl_image(size, psf_np, seed=0)).to(dev)
        psf_t = torch.from_numpy(psf_np).to(dev)

        def ours() -> torch.Tensor:
            clear_otf_cache()  # both sides pay for their OTF on every call
            return richardson_lucy(img, psf_np, rl_iterations, edges="periodic",
                                   acceleration=None, background=0, progress=False)

        def baseline() -> torch.Tensor:
            return plain_rl_periodic(img, psf_t, rl_iterations)

        diff = _rel_diff(ours(), baseline())
        if not diff <= RL_TOLERANCE:
            raise BenchMismatch(
                f"richardson_lucy and the plain torch FFT loop disagree (max rel diff "
                f"{diff:.2e} > {RL_TOLERANCE:g}); report it, timings skipped"
            )
        t = _time_pair({"ours": ours, "baseline": baseline}, dev, rounds, bar)
        results["richardson_lucy"] = {
            "ours": "richardson_lucy(edges='periodic', acceleration=None)",
            "baseline": "plain torch.fft RL loop (circular convolution)",
            "iterations": rl_iterations, "psf_shape": list(psf_shape),
            "ours_s": t["ours"], "baseline_s": t["baseline"],
            "speedup": t["baseline"] / t["ours"], "max_rel_diff": diff,
        }
    finally:
        if bar is not None:
            bar.close()

    return {
        "size": list(size),
        "device": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else platform.processor() or platform.machine() or "cpu"),
        "device_type": dev.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rln_fast": __version__,
        "rounds": rounds,
        "results": results,
    }
