"""Diagnostic: fine-tune with the microscopy volumes' uneven background left out of the truth.

Usage: python scripts/diagnostics/no_background_truth.py OUT_DIR [--steps 600] [--init MODEL]
       [--background-in-truth F|random]

The "mixed" recipe's microscopy volumes put their smooth, uneven background into the truth, so
a network trained on them learns to keep smooth light, and the evaluation's haze is not part
of its truths. This run fine-tunes MODEL (default: the shipped default.pt) on the same 192
mixed volumes, seeds 0-191, with ``synth.microscopy_pair(..., background_in_truth=F)``
(default 0: none of the background in the truth; "random": a fraction per volume, uniform in
[0, 1], drawn from the volume's seed; the raw volumes unchanged), at stage 4b's settings. Evaluate OUT_DIR/model.pt with
``evaluate_default_model.py``; the result is in the model card (not shipped).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_default_model import DEFAULT_MODEL, stage4b_fine_tune  # noqa: E402

from rln_fast import synth  # noqa: E402
from rln_fast.train import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--init", default=str(DEFAULT_MODEL))
    ap.add_argument("--background-in-truth", default="0",
                    help="the fraction of the background the truths keep (the recipe: 1), or "
                         "'random' for one per volume")
    args = ap.parse_args()
    # phantom_pair reaches microscopy_pair through the module, so this reaches training's data.
    pair = synth.microscopy_pair
    if args.background_in_truth == "random":
        def per_volume(psf, shape, seed, device=None, kind="cells"):
            keep = float(np.random.default_rng([seed, 7]).uniform())
            return pair(psf, shape, seed, device, kind, background_in_truth=keep)

        synth.microscopy_pair = per_volume
    else:
        synth.microscopy_pair = functools.partial(pair, background_in_truth=float(args.background_in_truth))
    train(stage4b_fine_tune(args.init, args.steps), args.out_dir, resume=True, progress=True)


if __name__ == "__main__":
    main()
