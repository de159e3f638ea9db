"""RL quality on flowdec's bars: NRMSE vs iteration of rln_fast (plain, Biggs) and scikit-image.

Writes benchmarks/results/rl_quality_cpu.json (or $OUT/rl_quality_<device>.json) and prints the
curves. NRMSE = ||s·x - gt|| / ||gt|| with the least-squares scale s, so that no method is
penalised for the data's arbitrary units (flowdec's bars data and ground truth differ in scale).

    python benchmarks/rl_quality.py [--device cuda] [--max-iter 80]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowdec"


def nrmse(x: np.ndarray, gt: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    s = float((x * gt).sum() / max((x * x).sum(), 1e-300))
    return float(np.linalg.norm(s * x - gt) / np.linalg.norm(gt))


def load_bars():
    import tifffile

    data = tifffile.imread(SHARED / "bars-25pct__data.tif").astype(np.float32)
    kernel = tifffile.imread(SHARED / "bars-25pct__kernel.tif").astype(np.float64)
    gt = tifffile.imread(SHARED / "bars-25pct__actual.tif").astype(np.float32)
    kernel /= kernel.sum()
    return data, kernel.astype(np.float32), gt


def odd_psf(kernel: np.ndarray) -> np.ndarray:
    """Even sides padded with a zero plane at the end: centre shape // 2 for both conventions
    (rln_fast's and scipy's 'same' convolution, whose centre is (n - 1) // 2)."""
    return np.pad(kernel, [(0, 1 - n % 2) for n in kernel.shape])


def rln_curve(data, kernel, gt, max_iter, acceleration, device=None, edges="bertero"):
    import rln_fast.rl as rl

    curve = []

    def cb(i, est):
        curve.append(nrmse(est.cpu().numpy(), gt))

    t = time.perf_counter()
    rl.richardson_lucy(data, kernel, max_iter, acceleration=acceleration, edges=edges,
                       device=device, callback=cb, progress=False)
    return curve, time.perf_counter() - t


def skimage_curve(data, kernel, gt, max_iter):
    """scikit-image's richardson_lucy (clip=False), every iterate of one run: its estimate is the
    first argument of every other call to the convolve it imports (skimage 0.2x's loop)."""
    import skimage.restoration.deconvolution as dec
    from skimage.restoration import richardson_lucy

    psf = odd_psf(kernel)
    orig = dec.convolve
    iterates = []
    calls = [0]

    def spy(a, *args, **kwargs):
        if calls[0] % 2 == 0:
            iterates.append(np.array(a, copy=True))
        calls[0] += 1
        return orig(a, *args, **kwargs)

    dec.convolve = spy
    try:
        t = time.perf_counter()
        final = richardson_lucy(data, psf, num_iter=max_iter, clip=False, filter_epsilon=1e-12)
        elapsed = time.perf_counter() - t
    finally:
        dec.convolve = orig
    # iterates[k] is the estimate before iteration k + 1; the last one is the result.
    states = iterates[1:] + [final]
    if len(states) != max_iter:
        raise RuntimeError("skimage's richardson_lucy loop changed; cannot read its iterates")
    return [nrmse(s, gt) for s in states], elapsed


def summary(curve, lo=10):
    best = min(range(lo - 1, len(curve)), key=lambda k: curve[k])
    return {"best_nrmse": curve[best], "best_iter": best + 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-iter", type=int, default=80)
    args = ap.parse_args()
    data, kernel, gt = load_bars()
    plain, t_plain = rln_curve(data, kernel, gt, args.max_iter, None, args.device)
    biggs, t_biggs = rln_curve(data, kernel, gt, args.max_iter, "biggs", args.device)
    sk, t_sk = skimage_curve(data, kernel, gt, args.max_iter)
    s_plain, s_biggs, s_sk = summary(plain), summary(biggs), summary(sk)
    reach = next((i + 1 for i, v in enumerate(biggs) if v <= s_plain["best_nrmse"]), None)
    import torch

    import rln_fast

    result = {
        "data": "flowdec bars-25pct (32x64x64), its 32x64x64 kernel; NRMSE after least-squares scaling",
        "iterations": args.max_iter,
        "rln_fast_plain": {"nrmse": plain, **s_plain, "seconds": t_plain, "edges": "bertero"},
        "rln_fast_biggs": {"nrmse": biggs, **s_biggs, "seconds": t_biggs, "edges": "bertero",
                           "iters_to_plain_best": reach},
        "skimage": {"nrmse": sk, **s_sk, "seconds": t_sk, "version": __import__("skimage").__version__,
                    "call": "richardson_lucy(data, psf padded to odd, clip=False, filter_epsilon=1e-12)"},
        "input_nrmse": nrmse(data, gt),
        "device": args.device or "cpu",
        "torch": torch.__version__,
        "rln_fast": rln_fast.__version__,
        "python": platform.python_version(),
    }
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"rl_quality_{(args.device or 'cpu').split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"input NRMSE {result['input_nrmse']:.4f}")
    for name, c, s in (("rln_fast plain", plain, s_plain), ("rln_fast biggs", biggs, s_biggs),
                       ("skimage", sk, s_sk)):
        print(f"{name:15s} best {s['best_nrmse']:.4f} at {s['best_iter']:3d}  "
              + " ".join(f"{v:.4f}" for v in c[9::10]))
    print(f"biggs reaches plain's best in {reach} iterations; written {path}")


if __name__ == "__main__":
    main()
