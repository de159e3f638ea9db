"""Diagnostic: Richardson–Lucy iterations started from RLN's output instead of a flat image.

Usage: python scripts/diagnostics/rl_from_rln.py MODEL OUT.json [--cache DIR]

For the semi-synthetic volumes and two held-out phantoms of ``evaluate_default_model.py``:
the scores (PSNR dB, SSIM against the truth) after k = 0 (RLN alone), 1, 2, ... 200 plain
periodic RL iterations (the evaluation's RL) started from RLN's output in input units; for
the DAPI stack the background statistics and the re-blur residual after k = 0..20. Answers
whether RLN followed by a few RL iterations would beat RL's best (it does not: the model
card, "RL from RLN's output"). Not a feature: ``rl.richardson_lucy`` has no initial-estimate
argument, so the start is set by replacing the FFT job's flat start for the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate_default_model as ev  # noqa: E402

from rln_fast import rl, synth  # noqa: E402
from rln_fast.deconvolve import rln_deconvolve  # noqa: E402
from rln_fast.models.rln import RLN  # noqa: E402

COUNTS = [1, 2, 3, 5, 8, 12, 20, 30, 50, 80, 120, 200]


def rl_from(raw: np.ndarray, start: np.ndarray, psf: np.ndarray, n: int, on_iter) -> None:
    """n plain periodic RL iterations (background 0) from ``start`` (floored at 1e-3 of its
    mean, as RL cannot leave 0); on_iter(i, estimate) after each."""
    x0 = np.clip(start, 1e-3 * max(float(start.mean()), 1e-6), None).astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x0))[None, None]
    flat = rl._FFTJob.initial
    rl._FFTJob.initial = lambda self, level: t.clone()
    try:
        rl.richardson_lucy(raw, psf, n, acceleration=None, edges="periodic", background=0,
                           progress=False, callback=lambda i, e: on_iter(i, e.cpu().numpy()))
    finally:
        rl._FFTJob.initial = flat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--data", default=str(ev.DEFAULT_DATA))
    ap.add_argument("--cache", default=None, help="the evaluation's cache of deconvolved truths")
    args = ap.parse_args()
    model = RLN.load(args.model)
    data = Path(args.data)
    psf = ev.evaluation_psf()
    truths = ev._truths(data, psf, Path(args.cache) if args.cache else None)
    cases = [(name, *ev.semi_synthetic_pair(truths[src], psf, peak, bg, haze, seed))
             for name, src, peak, bg, haze, seed in ev.SEMI_SYNTHETIC if src in truths]
    cases += [(f"phantom_{s}", *synth.phantom_pair(psf, (128,) * 3, seed=s)) for s in ev.HELD_OUT_SEEDS[:2]]
    result = {"model": args.model, "counts": [0, *COUNTS]}
    for name, gt, raw in cases:
        y = np.asarray(rln_deconvolve(raw, model, progress=False))
        row = {0: ev.scores(y, gt)}

        def score(i, est, row=row, gt=gt):
            if i in COUNTS:
                row[i] = ev.scores(est, gt)

        rl_from(raw, y, psf, max(COUNTS), score)
        result[name] = row
        print(name, " ".join(f"{k}:{v['psnr']:.2f}/{v['ssim']:.3f}" for k, v in row.items()), flush=True)
    dapi = data / "deconwolf" / "dapi_001.tif"
    if dapi.is_file():
        import tifffile

        vol = tifffile.imread(dapi).astype(np.float32)
        y = np.asarray(rln_deconvolve(vol, model, progress=False))
        d = {0: {**ev.background_stats(y, vol), "reblur_residual": ev.reblur_residual(y, vol, psf)}}

        def stats(i, est):
            if i in COUNTS and i <= 20:
                d[i] = {**ev.background_stats(est, vol), "reblur_residual": ev.reblur_residual(est, vol, psf)}

        rl_from(vol, y, psf, 20, stats)
        result["dapi"] = d
        for k, v in d.items():
            print("dapi", k, {a: round(b, 4) for a, b in v.items() if a != "nucleus_level"}, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
