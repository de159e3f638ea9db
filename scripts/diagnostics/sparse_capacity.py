"""Diagnostic: can training data alone close the bars gap? Fine-tune on sparse volumes only.

Usage: python scripts/diagnostics/sparse_capacity.py OUT_DIR DATA_DIR [--steps 300] [--init MODEL]

Writes 96 pairs of ``rln_fast.synth.microscopy_pair(kind="sparse")`` at 64³ (beads and thin
bars on a dark field; seeds 5000-5095, none of them evaluation data) to DATA_DIR (kept
between runs), then fine-tunes MODEL (default: the shipped default.pt) on them alone at the
shipped stage's settings (volume normalisation at its percentiles, 64³ crops, flips), lr
0.001. Evaluate OUT_DIR/model.pt with ``evaluate_default_model.py --semi
flowdec_bars,flowdec_beads``. The result is in the model card ("Bars: data or capacity?").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_default_model import DEFAULT_MODEL, stage4b_fine_tune  # noqa: E402

from rln_fast import synth  # noqa: E402
from rln_fast.train import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("data_dir")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--init", default=str(DEFAULT_MODEL))
    args = ap.parse_args()
    import tifffile

    # Stage 4b's settings on these 96 volumes alone, lr 0.001 held for the whole run.
    config = stage4b_fine_tune(args.init, args.steps, data_dir=str(Path(args.data_dir)), n_volumes=96,
                               cache_volumes=96, recipe="official", lr=0.001, lr_hold=args.steps)
    psf = config.psf
    data = Path(args.data_dir)
    for sub in ("gt", "input"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    for i in range(96):
        name = f"{i:03d}.tif"
        if (data / "gt" / name).is_file() and (data / "input" / name).is_file():
            continue
        gt, raw = synth.microscopy_pair(psf, (64, 64, 64), seed=5000 + i, kind="sparse")
        tifffile.imwrite(data / "input" / name, raw)
        tifffile.imwrite(data / "gt" / name, gt)  # written last: a pair counts once gt/ has it
    train(config, args.out_dir, resume=True, progress=True)


if __name__ == "__main__":
    main()
