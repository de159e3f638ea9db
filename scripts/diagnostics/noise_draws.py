"""Diagnostic: the semi-synthetic scores over other noise draws than the evaluation's one.

Usage: python scripts/diagnostics/noise_draws.py OUT.json MODEL [MODEL ...] [--seeds 11,12,13]
       [--volumes flowdec_beads,dapi_nucleus_dim] [--cache DIR] [--data DIR]

``evaluate_default_model.py`` draws each semi-synthetic volume's Poisson noise once, with a
fixed seed, so a margin of a tenth of a dB between two models, or between a model and RL,
may belong to that draw. This builds the same volumes (truth, photons, background, haze) with
other seeds and scores every MODEL and RL at its best iteration count on each draw, as the
evaluation does. It writes every score and, per volume and model, the mean and the range of
the margin over RL's best; RL's runs are cached in DIR as the evaluation's are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate_default_model as ev  # noqa: E402

from rln_fast.models.rln import RLN  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--seeds", default="11,12,13")
    ap.add_argument("--volumes", default="flowdec_beads,dapi_nucleus_dim")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    known = {row[0]: row for row in ev.SEMI_SYNTHETIC}
    names = [v for v in args.volumes.split(",") if v]
    unknown = [v for v in names if v not in known]
    if unknown or not seeds:
        ap.error(f"--volumes: unknown {unknown} (known: {sorted(known)}); --seeds must name one or more")
    cache = Path(args.cache) if args.cache else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    psf = ev.evaluation_psf()
    truths = ev._truths(Path(args.data), psf, cache)
    models = {m: RLN.load(m) for m in args.models}
    rows, summary = [], {}
    for name in names:
        _, source, peak, bg, haze, _ = known[name]
        if source not in truths:
            ap.error(f"{name}: its truth ({source}) is not under {args.data}")
        for seed in seeds:
            gt, raw = ev.semi_synthetic_pair(truths[source], psf, peak, bg, haze, seed)
            for path, model in models.items():
                row, _, _ = ev._compare(name, gt, raw, psf, model, cache)
                rows.append({"volume": name, "seed": seed, "model": path, "rln": row["rln"],
                             "rl_best_psnr": row["rl_best_psnr"], "rl_best_ssim": row["rl_best_ssim"]})
        for path in models:
            mine = [r for r in rows if r["volume"] == name and r["model"] == path]
            dp = [r["rln"]["psnr"] - r["rl_best_psnr"]["psnr"] for r in mine]
            ds = [r["rln"]["ssim"] - r["rl_best_ssim"]["ssim"] for r in mine]
            summary.setdefault(name, {})[path] = {
                "psnr_margin_mean": float(np.mean(dp)), "psnr_margin_min": float(min(dp)),
                "psnr_margin_max": float(max(dp)), "ssim_margin_mean": float(np.mean(ds)),
                "ssim_margin_min": float(min(ds)), "rln_psnr_mean": float(np.mean([r["rln"]["psnr"] for r in mine])),
            }
    result = {"seeds": seeds, "rows": rows, "summary": summary}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
