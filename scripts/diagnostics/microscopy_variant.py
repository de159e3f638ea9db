"""Diagnostic: fine-tune with the mixed recipe's microscopy volumes changed in one respect.

Usage: python scripts/diagnostics/microscopy_variant.py OUT_DIR [--photons LOW HIGH]
       [--no-outside-objects] [--ideal-camera] [--no-texture] [--sharp-edges]
       [--microscopy-every N] [--steps 600] [--init MODEL] [--lr 0.0003]

The model trained on the official recipe alone keeps thin bright bars sharper (inside the bar
17.3 dB against 15.2 for the shipped model; model card), so some part of the "mixed" recipe's
microscopy volumes costs the bar. This run fine-tunes MODEL (default: the shipped default.pt)
on the same 192 mixed volumes, seeds 0-191, at stage 10's settings (stage 4b's, lr 0.0003),
with the microscopy volumes changed:
  --photons LOW HIGH      peak photons log-uniform in LOW-HIGH (the recipe: 30-3000,
                          ``synth.MICRO_PHOTONS``);
  --no-outside-objects    no objects above and below the volume, so no out-of-focus haze
                          from outside it (``synth.microscopy_pair(..., outside_objects=False)``);
  --ideal-camera          gain 1 ADU per photon, offset 0, no read noise: pure Poisson counts,
                          as in the evaluation's volumes (the recipe: gain 0.5-4, offset 0-500,
                          read noise 0.5-8 ADU);
  --no-texture            each nucleus or cell evenly filled (``synth.microscopy_object(...,
                          textured=False)``; the recipe: a smooth random texture);
  --sharp-edges           nuclei and cells with edges 0.25 voxels wide and hollow ones with
                          shells half as thick (``synth.microscopy_object(...,
                          sharp_edges=True)``; the recipe: edges 0.7-2 voxels, shells 1-2);
  --microscopy-every N    one volume in N a microscopy volume (seeds with seed % N == N - 1),
                          the others official (``TrainConfig.microscopy_every``; the "mixed"
                          recipe: one in 2, the odd seeds).
Everything else (objects, backgrounds, cameras, the official half) is unchanged. Evaluate
OUT_DIR/model.pt with ``evaluate_default_model.py``; the results are in the model card (not
shipped).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_default_model import DEFAULT_MODEL, stage4b_fine_tune  # noqa: E402

from rln_fast import synth  # noqa: E402
from rln_fast.train import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--photons", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    ap.add_argument("--no-outside-objects", action="store_true")
    ap.add_argument("--ideal-camera", action="store_true")
    ap.add_argument("--no-texture", action="store_true")
    ap.add_argument("--sharp-edges", action="store_true")
    ap.add_argument("--microscopy-every", type=int, default=None, metavar="N")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--init", default=str(DEFAULT_MODEL))
    ap.add_argument("--lr", type=float, default=0.0003)
    args = ap.parse_args()
    if args.photons is None and not (args.no_outside_objects or args.ideal_camera or args.no_texture
                                     or args.sharp_edges or args.microscopy_every is not None):
        ap.error("nothing to change: give --photons LOW HIGH, --no-outside-objects, --ideal-camera, "
                 "--no-texture, --sharp-edges and/or --microscopy-every N")
    overrides = {"lr": args.lr}
    if args.microscopy_every is not None:
        if args.microscopy_every < 1:
            ap.error(f"--microscopy-every must be >= 1, got {args.microscopy_every}")
        overrides["microscopy_every"] = args.microscopy_every
    if args.photons is not None:
        low, high = args.photons
        if not 0.0 < low <= high:
            ap.error(f"--photons must satisfy 0 < LOW <= HIGH, got {low} {high}")
        # microscopy_pair reads the range from the module when it draws, so this reaches training's data.
        synth.MICRO_PHOTONS = (low, high)
    changes = {name: value for name, value, asked in (("outside_objects", False, args.no_outside_objects),
                                                       ("textured", False, args.no_texture),
                                                       ("sharp_edges", True, args.sharp_edges)) if asked}
    if changes:
        # phantom_pair reaches microscopy_pair through the module, so this reaches training's data.
        synth.microscopy_pair = functools.partial(synth.microscopy_pair, **changes)
    if args.ideal_camera:
        synth.MICRO_GAIN, synth.MICRO_OFFSET, synth.MICRO_READ_NOISE = (1.0, 1.0), (0.0, 0.0), (0.0, 0.0)
    train(stage4b_fine_tune(args.init, args.steps, **overrides), args.out_dir, resume=True, progress=True)


if __name__ == "__main__":
    main()
