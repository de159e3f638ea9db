"""Diagnostic: where richardson_lucy on a GPU departs from the CPU, path by path.

    python scripts/diagnostics/rl_gpu_vs_cpu.py [--device cuda] [--out results.json]

Prints, as JSON, the relative error (norm) of the GPU result against the CPU one for every FFT
edge mode, TV on and off, each acceleration, after 1 and 4 iterations; then, on the Bertero job,
the pieces one at a time from the same input: the start, the weights, H^T 1_M w, and one update
(with float32 and with float64 FFTs on the GPU). The case is that of
tests/test_cuda_paths.py::test_rl_paths_on_device_match_cpu. benchmarks/results/h200_2026-12-04
holds one run and what it found.
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import torch

import rln_fast.rl as rl
from rln_fast.ops import rl_classic as ops
from rln_fast.psf import gaussian


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm())


def _argmax(d: torch.Tensor) -> list[int]:
    return [int(v) for v in torch.nonzero(d == d.max())[0]]


def _float64_fft() -> types.SimpleNamespace:
    """A stand-in for the torch module whose rfftn / irfftn compute in float64."""
    shim = types.SimpleNamespace(**{a: getattr(torch, a) for a in dir(torch) if not a.startswith("__")})
    r, ir = torch.fft.rfftn, torch.fft.irfftn
    shim.fft = types.SimpleNamespace(rfftn=lambda x, *a, **k: r(x.double(), *a, **k),
                                     irfftn=lambda x, *a, **k: ir(x, *a, **k).float())
    return shim


def run(device: str) -> dict:
    out: dict = {}
    psf = gaussian((5, 7, 7), sigma=(1.5, 1.0, 1.0))
    img = torch.rand(9, 14, 21, generator=torch.Generator().manual_seed(1)) + 0.2

    for edges in ("bertero", "reflect", "periodic"):
        for tv in (0.0, 0.01):
            for acc in (None, "shb", "biggs"):
                for n in (1, 4):
                    kw = dict(method="fft", edges=edges, tv=tv, background=0.05, progress=False,
                              acceleration=acc)
                    out[f"{edges} tv={tv} acc={acc} n={n}"] = rel_err(
                        rl.richardson_lucy(img.to(device), psf, n, **kw), rl.richardson_lucy(img, psf, n, **kw))

    k = rl._prepare_psf(psf, tuple(img.shape), "fft", "bertero")
    kw = dict(bg=0.05, eps=1e-6, tv=0.0, tv_eps=1e-3)
    cpu = rl._FFTJob(img.contiguous(), k, "bertero", **kw)
    dev = rl._FFTJob(img.to(device).contiguous(), k, "bertero", **kw)
    out["work shape"] = list(cpu.shape)
    x0c, x0d = cpu.initial(1.0), dev.initial(1.0)
    d = (x0d.cpu() - x0c)[0, 0].abs()
    out["initial"] = rel_err(x0d, x0c)
    out["initial max abs diff"] = float(d.max())
    out["initial argmax"] = _argmax(d)
    out["initial nonzero count cpu/dev"] = [int((x0c > 0).sum()), int((x0d > 0).sum())]

    w_dev = ops.store_edge_weights(dev.weights, x0d).dense
    w_cpu = ops.store_edge_weights(cpu.weights, x0c).dense
    out["weights dev vs cpu"] = rel_err(w_dev, w_cpu)
    out["weights max abs diff"] = float((w_dev.cpu() - w_cpu).abs().max())
    mask = torch.zeros_like(x0d)
    mask[0, 0, : img.shape[0], : img.shape[1], : img.shape[2]] = 1
    seen_w = (dev._convolve(mask, True, None, zero_outside=True)[0, 0] * w_dev)[w_dev > 0]
    out["seen*w on dev: min/max"] = [float(seen_w.min()), float(seen_w.max())]

    y = x0c.clone()  # one update from the same start on both
    new_cpu, _ = cpu.update_(y.clone(), None, None)
    new_dev, _ = dev.update_(y.to(device).clone(), None, None)
    d = (new_dev.cpu() - new_cpu)[0, 0].abs()
    out["one update (same start), full work volume"] = rel_err(new_dev, new_cpu)
    out["one update max abs diff / max"] = [float(d.max()), float(new_cpu.abs().max())]
    out["one update argmax"] = _argmax(d)
    kwr = dict(method="fft", edges="bertero", tv=0.01, background=0.05, progress=False)
    rl.torch = _float64_fft()  # the GPU job's FFTs in float64 (the CPU job uses its own DFTI plans)
    try:
        new64, _ = dev.update_(y.to(device).clone(), None, None)
        got64 = rl.richardson_lucy(img.to(device), psf, 4, **kwr)
    finally:
        rl.torch = torch
    out["one update, f64 fft on dev"] = rel_err(new64, new_cpu)
    out["test case, f64 fft on dev vs cpu"] = rel_err(got64, rl.richardson_lucy(img, psf, 4, **kwr))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run(args.device)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
