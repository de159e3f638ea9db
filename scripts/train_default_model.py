"""Trains the default RLN shipped in rln_fast/weights/: the recipe, PSF and run settings, in one place.

Usage: python scripts/train_default_model.py OUT_DIR [--steps N] [--crop S] [--device cpu|cuda]
The PSF is a widefield Born-Wolf model at the DAPI demo stack's acquisition (voxel 0.3 x 0.13 x
0.13 um, emission 0.461 um, NA 1.45, immersion 1.512); phantoms are generated on the fly.
Re-running with the same OUT_DIR resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse

from rln_fast import psf as psf_models
from rln_fast.train import TrainConfig, train

VOXEL_SIZE = (0.3, 0.13, 0.13)  # (dz, dy, dx) um
PSF_ARGS = {"na": 1.45, "wavelength": 0.461, "ni": 1.512}
PSF_SHAPE = (33, 65, 65)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--crop", type=int, default=64, help="cubic crop side (the recipe: 64)")
    ap.add_argument("--volumes", type=int, default=100)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    psf = psf_models.born_wolf(PSF_SHAPE, VOXEL_SIZE, **PSF_ARGS)
    config = TrainConfig(psf=psf, steps=args.steps, crop=(args.crop,) * 3, n_volumes=args.volumes,
                         cache_volumes=args.volumes, checkpoint_every=250, val_every=500,
                         device=args.device)
    train(config, args.out_dir, resume=True, progress=True)


if __name__ == "__main__":
    main()
