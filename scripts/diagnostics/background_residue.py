"""Diagnostic: where a model's whole-volume scores on the semi-synthetic nuclei come from.

Usage: python scripts/diagnostics/background_residue.py MODEL [MODEL ...] [--cache DIR]

For each model and both semi-synthetic nuclei of ``evaluate_default_model.py``: SSIM's map
averaged inside the nucleus (the evaluation's ``object_region``: truth > 0.2 of its maximum), in the background (truth < 0.02 of
it) and between, after the evaluation's whole-volume affine fit; and, in the background, the
error's SD against the part of it that follows the noise (the SD of the difference between
the outputs for two noise draws, seeds as in the evaluation and 77, divided by √2). RL at its
best-PSNR count is scored the same way. The model card's "Inside the object" quotes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate_default_model as ev  # noqa: E402

from rln_fast.deconvolve import rln_deconvolve  # noqa: E402
from rln_fast.models.rln import RLN  # noqa: E402


def split(x: np.ndarray, gt: np.ndarray) -> dict:
    from skimage.metrics import structural_similarity

    f, g = ev._fit(x, gt), gt.astype(np.float64)
    _, m = structural_similarity(f, g, data_range=float(g.max() - g.min()), full=True)
    inside, background = ev.object_region(g), g < 0.02 * g.max()
    between = ~inside & ~background
    return {"ssim_inside": float(m[inside].mean()), "ssim_background": float(m[background].mean()),
            "ssim_between": float(m[between].mean()), "background_fraction": float(background.mean()),
            "background_error_sd": float((f - g)[background].std())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default=str(ev.DEFAULT_DATA))
    ap.add_argument("--cache", default=None, help="the evaluation's cache")
    args = ap.parse_args()
    cache = Path(args.cache) if args.cache else None
    psf = ev.evaluation_psf()
    truths = ev._truths(Path(args.data), psf, cache)
    for name, src, peak, bg, haze, seed in ev.SEMI_SYNTHETIC[:2]:
        if src not in truths:
            continue
        gt, raw = ev.semi_synthetic_pair(truths[src], psf, peak, bg, haze, seed)
        _, other = ev.semi_synthetic_pair(truths[src], psf, peak, bg, haze, 77)
        _, rl_best = ev._cached_rl(cache, name, raw, gt, psf)
        print(name, "RL best", {k: round(v, 3) for k, v in split(rl_best, gt).items()})
        background = gt < 0.02 * gt.max()
        for path in args.models:
            model = RLN.load(path)
            y = np.asarray(rln_deconvolve(raw, model, progress=False))
            y2 = np.asarray(rln_deconvolve(other, model, progress=False))
            row = split(y, gt)
            row["background_noise_sd"] = float((ev._fit(y, gt) - ev._fit(y2, gt))[background].std() / np.sqrt(2))
            print(name, path, {k: round(v, 3) for k, v in row.items()})


if __name__ == "__main__":
    main()
