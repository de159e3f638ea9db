"""Diagnostic: RL that knows only the centre of the PSF, as far as RLN's receptive field reaches.

Usage: python scripts/diagnostics/rl_cropped_psf.py OUT.json [--halves 16,8]
       [--volumes flowdec_bars,dapi_nucleus,dapi_nucleus_dim,flowdec_beads] [--cache DIR] [--data DIR]

RLN sees at most 16-17 voxels around an output voxel (DESIGN), and its forward projections
are a few 3x3x3 convolutions, while the evaluation's widefield PSF spans 33x65x65 voxels
with most of its light outside any 33^3 cube around its centre. This builds the evaluation's
semi-synthetic volumes as ``evaluate_default_model.py`` does (the data made with the full
PSF) and runs its RL (plain, periodic edges, background 0) with the PSF cropped to
(2h+1)^3 voxels around its centre and renormalised, for each h in --halves, beside the full
PSF; each run is scored at the evaluation's iteration counts. It writes every score, the
best count per volume and PSF, and the fraction of the PSF's light each crop keeps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate_default_model as ev  # noqa: E402


def cropped(psf: np.ndarray, half: int) -> tuple[np.ndarray, float]:
    """The PSF's central (2·half+1)³ voxels (fewer where the PSF is smaller), renormalised to
    sum 1, and the fraction of its light they held."""
    if half < 0:
        raise ValueError(f"half must be >= 0, got {half}")
    centre = [n // 2 for n in psf.shape]
    box = psf[tuple(slice(max(0, c - half), c + half + 1) for c in centre)]
    return box / box.sum(), float(box.sum() / psf.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--halves", default="16,8", help="crop half-widths h: (2h+1)^3 voxels")
    ap.add_argument("--volumes", default="flowdec_bars,dapi_nucleus,dapi_nucleus_dim,flowdec_beads")
    ap.add_argument("--cache", default=None, help="the evaluation's cache (the truths)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    args = ap.parse_args()
    try:
        halves = [int(h) for h in args.halves.split(",") if h]
    except ValueError:
        ap.error(f"--halves: integers separated by commas, got {args.halves!r}")
    known = {row[0]: row for row in ev.SEMI_SYNTHETIC}
    names = [v for v in args.volumes.split(",") if v]
    unknown = [v for v in names if v not in known]
    if unknown or not names or not halves or min(halves) < 0:
        ap.error(f"--volumes: unknown {unknown} (known: {sorted(known)}); --halves: one or more h >= 0")
    cache = Path(args.cache) if args.cache else None
    psf = ev.evaluation_psf()
    truths = ev._truths(Path(args.data), psf, cache)
    rows = []
    for name in names:
        _, source, peak, bg, haze, seed = known[name]
        if source not in truths:
            ap.error(f"{name}: its truth ({source}) is not under {args.data}")
        gt, raw = ev.semi_synthetic_pair(truths[source], psf, peak, bg, haze, seed)
        for half in [None, *halves]:
            p, kept = (psf, 1.0) if half is None else cropped(psf, half)
            res, _ = ev._rl_scores(raw, gt, p)  # the evaluation's RL, with this PSF
            best = max(res.items(), key=lambda kv: kv[1]["psnr"])
            row = {"volume": name, "psf_shape": list(p.shape), "light_kept": kept,
                   "best_psnr": {"iterations": best[0], **best[1]},
                   "by_iterations": {str(k): v for k, v in sorted(res.items())}}
            rows.append(row)
            print(f"{name}: PSF {p.shape} ({kept:.0%} of its light): best {best[1]['psnr']:.2f} dB / "
                  f"{best[1]['ssim']:.3f} at {best[0]} iterations", flush=True)
    Path(args.out).write_text(json.dumps({"halves": halves, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
