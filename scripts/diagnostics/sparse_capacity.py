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
from train_default_model import PSF_ARGS, PSF_SHAPE, VOXEL_SIZE  # noqa: E402

from rln_fast import psf as psf_models  # noqa: E402
from rln_fast import synth  # noqa: E402
from rln_fast.deconvolve import norm_percentiles  # noqa: E402
from rln_fast.models.rln import RLN  # noqa: E402
from rln_fast.train import TrainConfig, train  # noqa: E402

DEFAULT_INIT = Path(__file__).resolve().parents[2] / "rln_fast" / "weights" / "default.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("data_dir")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--init", default=str(DEFAULT_INIT))
    args = ap.parse_args()
    import tifffile

    psf = psf_models.born_wolf(PSF_SHAPE, VOXEL_SIZE, **PSF_ARGS)
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
    config = TrainConfig(psf=psf, data_dir=str(data), steps=args.steps, crop=(64,) * 3,
                         n_volumes=96, cache_volumes=96, norm_scope="volume",
                         norm_percentiles=norm_percentiles(RLN.load(args.init)),
                         init_model=args.init, lr=0.001, lr_hold=args.steps, lr_decay_steps=100,
                         augment=True, checkpoint_every=50, val_every=10 ** 6, device="cpu")
    train(config, args.out_dir, resume=True, progress=True)


if __name__ == "__main__":
    main()
