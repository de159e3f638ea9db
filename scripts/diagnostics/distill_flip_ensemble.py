"""Diagnostic: fine-tune an RLN towards its own flip ensemble (self-distillation).

Usage: python scripts/diagnostics/distill_flip_ensemble.py OUT_DIR [--steps 600] [--init MODEL]
       [--teacher MODEL] [--members 8] [--truth-weight W]

``rln_deconvolve(..., ensemble=8)`` scores 0.3-2.0 dB above the same model run once, at 8× the
time: the network's errors change with the volume's orientation. This run asks whether one
network can learn what the ensemble returns. It fine-tunes MODEL (default: the shipped
default.pt) on stage 4b's 192 mixed volumes, seeds 0-191, at stage 4b's settings, with each
volume's truth replaced by TEACHER's (default: MODEL's) flip-ensemble output on the volume's
input, normalised as inference normalises it — or by the mix W·truth + (1 − W)·ensemble with
``--truth-weight W``. The teacher runs on each whole volume when training first draws it
(about 6 s per 128³ volume on 2 CPU cores, so about 18 min over the first few hundred steps).
Evaluate OUT_DIR/model.pt with ``evaluate_default_model.py``; the result is in the model card
(not shipped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_default_model import DEFAULT_MODEL, stage4b_fine_tune  # noqa: E402

from rln_fast import synth  # noqa: E402
from rln_fast.deconvolve import norm_percentiles, rln_deconvolve  # noqa: E402
from rln_fast.models.rln import RLN  # noqa: E402
from rln_fast.train import normalize_crop, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--init", default=str(DEFAULT_MODEL))
    ap.add_argument("--teacher", default=None, help="the ensemble's model (default: --init)")
    ap.add_argument("--members", type=int, default=8, choices=[2, 4, 8])
    ap.add_argument("--truth-weight", type=float, default=0.0,
                    help="the truth's share of the target, in [0, 1] (default 0: the ensemble alone)")
    args = ap.parse_args()
    if not 0.0 <= args.truth_weight <= 1.0:
        ap.error(f"--truth-weight must be in [0, 1], got {args.truth_weight}")
    teacher = RLN.load(args.teacher or args.init).eval()
    percentiles = norm_percentiles(RLN.load(args.init))
    if norm_percentiles(teacher) != percentiles:
        ap.error("the teacher and the model must normalise by the same percentiles")
    pair = synth.phantom_pair

    # Training reaches phantom_pair through the module: the truths it sees are the teacher's.
    def distilled_pair(psf, shape, seed, *a, **kw):
        gt, raw = pair(psf, shape, seed, *a, **kw)
        target = rln_deconvolve(raw, model=teacher, ensemble=args.members, rescale=False)
        target = np.maximum(np.asarray(target, dtype=np.float32), 0.0)
        if args.truth_weight > 0:
            target = (args.truth_weight * np.maximum(normalize_crop(gt, percentiles), 0.0)
                      + (1.0 - args.truth_weight) * target)
        return target.astype(np.float32), raw

    synth.phantom_pair = distilled_pair
    train(stage4b_fine_tune(args.init, args.steps), args.out_dir, resume=True, progress=True)


if __name__ == "__main__":
    main()
