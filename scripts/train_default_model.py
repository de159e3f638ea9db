"""Trains the default RLN shipped in rln_fast/weights/: the recipe, PSF and run settings, in one place.

Usage: python scripts/train_default_model.py OUT_DIR [--steps N] [--crop S] [--volumes N] [--data-seed S]
       [--recipe official|microscopy|mixed|mixed_sparse] [--microscopy-every N] [--norm-scope crop|volume]
       [--norm-percentiles LOW HIGH]
       [--init MODEL.pt | --width N] [--lr LR] [--lr-hold N] [--lr-decay-steps N] [--augment]
       [--gain-augment G [--gain-weighted]] [--flip-symmetric | --flip-decay D]
       [--mse-weight W] [--gradients paper|exact] [--threads N] [--device cpu|cuda]
The PSF is a widefield Born-Wolf model at the DAPI demo stack's acquisition (voxel 0.3 x 0.13 x
0.13 um, emission 0.461 um, NA 1.45, immersion 1.512); phantoms are generated on the fly.
Re-running with the same OUT_DIR and options resumes from its last checkpoint.

The shipped default.pt: see rln_fast/weights/README.md for the exact command line.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
import torch

from rln_fast import psf as psf_models
from rln_fast.deconvolve import norm_percentiles
from rln_fast.models.rln import RLN
from rln_fast.train import TrainConfig, train

VOXEL_SIZE = (0.3, 0.13, 0.13)  # (dz, dy, dx) um
PSF_ARGS = {"na": 1.45, "wavelength": 0.461, "ni": 1.512}
PSF_SHAPE = (33, 65, 65)
# The held-out phantoms of scripts/evaluate_default_model.py: never training data.
EVALUATION_SEEDS = range(900_001, 900_009)
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "rln_fast" / "weights" / "default.pt"


def model_psf() -> np.ndarray:
    """The PSF the default model is trained and evaluated with (Born-Wolf, see the docstring);
    a fresh copy each call of the one computed once (~0.4 s: a chain builds it per stage)."""
    return _model_psf().copy()


@functools.lru_cache(maxsize=1)
def _model_psf() -> np.ndarray:
    return psf_models.born_wolf(PSF_SHAPE, VOXEL_SIZE, **PSF_ARGS)


def stage4b_fine_tune(init: str | Path, steps: int, **overrides) -> TrainConfig:
    """Stage 4b's fine-tuning settings, started from ``init`` (192 mixed volumes, 64³ crops,
    flips, the volume normalised by init's percentiles, lr 0.0005 x0.95 per 100 after 200),
    with ``overrides`` replacing any field: the model card's diagnostic runs."""
    settings = dict(psf=model_psf(), steps=steps, crop=(64,) * 3, n_volumes=192, cache_volumes=192,
                    recipe="mixed", norm_scope="volume", norm_percentiles=norm_percentiles(RLN.load(init)),
                    init_model=str(init), lr=0.0005, lr_hold=200, lr_decay_steps=100, augment=True,
                    checkpoint_every=50, val_every=10 ** 6, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def parser() -> argparse.ArgumentParser:
    """The command line: OUT_DIR and the options (``scripts/train_chain.py`` reads its plans'
    stages with it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--crop", type=int, default=64, help="cubic crop side (the recipe: 64)")
    ap.add_argument("--volumes", type=int, default=100)
    ap.add_argument("--data-seed", type=int, default=0,
                    help="training volume i is generated with seed data-seed + i (default 0)")
    ap.add_argument("--recipe", default="official", choices=["official", "microscopy", "mixed", "mixed_sparse"],
                    help="synthetic data (rln_fast.synth.phantom_pair's recipe)")
    ap.add_argument("--microscopy-every", type=int, default=None, metavar="N",
                    help="--recipe mixed: one volume in N a microscopy one (the recipe: 2, the odd seeds)")
    ap.add_argument("--norm-scope", default="crop", choices=["crop", "volume"],
                    help="normalise each crop (the recipe) or each whole volume (as inference does)")
    ap.add_argument("--norm-percentiles", type=float, nargs=2, default=(0.01, 99.5), metavar=("LOW", "HIGH"),
                    help="the normalisation's percentiles (the recipe: 0.01 99.5); the trained model "
                         "records them and rln_deconvolve uses them")
    ap.add_argument("--init", default=None, help="start from this RLN (fine-tuning) instead of random weights")
    ap.add_argument("--width", type=int, default=None,
                    help="RLN(width=N) from random weights: every multi-channel layer N times wider "
                         "(not the official architecture unless 1; with --init: that model's width)")
    ap.add_argument("--lr", type=float, default=0.025)
    ap.add_argument("--lr-hold", type=int, default=500)
    ap.add_argument("--lr-decay-steps", type=int, default=500,
                    help="lr is multiplied by 0.95 every this many steps after --lr-hold (the recipe: 500)")
    ap.add_argument("--gain-augment", type=float, default=1.0,
                    help="scale each normalised crop and its GT by a gain log-uniform in [1, G] "
                         "(not the recipe; needs --norm-scope volume)")
    ap.add_argument("--gain-weighted", action="store_true",
                    help="with --gain-augment, score each crop's loss divided by its gain (not the recipe)")
    ap.add_argument("--flip-symmetric", action="store_true",
                    help="keep every conv kernel symmetric under flips of z, y and x, so that the "
                         "network commutes with flips of the volume (not the recipe)")
    ap.add_argument("--flip-decay", type=float, default=0.0,
                    help="after every step move each conv kernel this fraction of the way to its "
                         "mean over the 8 flips of z, y and x: a pull towards --flip-symmetric that "
                         "the loss can resist (not the recipe; default 0: off)")
    ap.add_argument("--mse-weight", type=float, default=1.0,
                    help="weight of the output's mse term in the loss (the recipe: 1; the SSIM term "
                         "is ~15x larger on a trained model)")
    ap.add_argument("--gradients", default="paper", choices=["paper", "exact"],
                    help="the RL division's and multiplication's gradients: the released training "
                         "graph's surrogates (the recipe) or the true ones (not the recipe)")
    ap.add_argument("--augment", action="store_true",
                    help="random flips and (y, x) quarter turns of the crops (not the recipe)")
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default=None)
    return ap


def config(ap: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``args`` (``ap.error`` on a bad combination); sets torch's
    CPU threads when ``--threads`` is given."""
    seeds = range(args.data_seed, args.data_seed + args.volumes)
    if args.data_seed < 0 or (seeds.start < EVALUATION_SEEDS.stop and EVALUATION_SEEDS.start < seeds.stop):
        ap.error(f"--data-seed {args.data_seed} with --volumes {args.volumes}: seeds must be >= 0 and "
                 f"stay clear of the evaluation's held-out phantoms {EVALUATION_SEEDS.start}-"
                 f"{EVALUATION_SEEDS.stop - 1}")
    if args.microscopy_every is not None and args.recipe != "mixed":
        ap.error(f"--microscopy-every needs --recipe mixed, got --recipe {args.recipe}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    psf = model_psf()
    return TrainConfig(psf=psf, steps=args.steps, crop=(args.crop,) * 3, n_volumes=args.volumes,
                       data_seed=args.data_seed, cache_volumes=args.volumes, recipe=args.recipe,
                       microscopy_every=(TrainConfig.microscopy_every if args.microscopy_every is None
                                         else args.microscopy_every),
                       norm_scope=args.norm_scope, norm_percentiles=tuple(args.norm_percentiles),
                       init_model=args.init, width=args.width, lr=args.lr, lr_hold=args.lr_hold,
                       lr_decay_steps=args.lr_decay_steps, augment=args.augment,
                       gain_augment=args.gain_augment, gain_weighted=args.gain_weighted,
                       flip_symmetric=args.flip_symmetric, flip_decay=args.flip_decay,
                       mse_weight=args.mse_weight, gradients=args.gradients, checkpoint_every=50,
                       val_every=args.val_every, device=args.device)


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    train(config(ap, args), args.out_dir, resume=True, progress=True)


if __name__ == "__main__":
    main()
