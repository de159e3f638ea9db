"""Import the released RLN TensorFlow checkpoint (no TensorFlow needed) and deconvolve with it.

    python examples/official_checkpoint.py path/to/model.ckpt [stack.tif] --out results/

The checkpoint is the TF1 bundle of the RLN paper (Li et al., Nat Methods 2022): pass its
prefix, the path without ".index" / ".data-00000-of-00001". rln_fast does not ship these
weights (their repository has no licence); you import the copy you have. The script saves
the imported model in rln_fast's own format (official_rln.pt, loadable with RLN.load, the CLI
and the napari widget) and deconvolves the TIFF, or a synthetic volume when none is given.
--small uses a tiny synthetic volume.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile

import rln_fast as rf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint prefix, e.g. official_rln/model.ckpt")
    p.add_argument("tiff", nargs="?", type=Path, help="3-D TIFF stack (z, y, x) to deconvolve")
    p.add_argument("--out", type=Path, default=Path("official_rln_out"), help="output folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--small", action="store_true", help="a tiny synthetic volume")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. Import: reads the LevelDB index and the raw tensor file, checks both CRCs, and maps
    #    the TF variables (conv kernels, batch-norm statistics) onto rln_fast's RLN.
    model = rf.RLN.from_official_checkpoint(args.checkpoint)
    print(f"imported {args.checkpoint}: {sum(t.numel() for t in model.parameters())} "
          f"parameters, trained for {model.metadata.get('steps', '?')} steps")
    saved = args.out / "official_rln.pt"
    model.save(saved)
    print(f"saved it as {saved} (load it with rf.RLN.load or in the napari RLN widget)")

    # 2. Input: the TIFF, or a synthetic widefield volume.
    if args.tiff is not None:
        volume = tifffile.imread(args.tiff)
        stem = args.tiff.stem
    else:
        shape = (24, 48, 48) if args.small else (64, 128, 128)
        psf = rf.psf.gaussian((15, 15, 15), 1.0, sigma=(2.0, 1.0, 1.0))  # in voxels
        _truth, volume = rf.synth.phantom_pair(psf, shape, seed=3)
        stem = "synthetic"
        tifffile.imwrite(args.out / f"{stem}.tif", volume)

    # 3. Deconvolve as the official inference script does: per-volume percentile
    #    normalisation (0.01 %, 99.5 %), output left in the normalised units.
    result = rf.rln_deconvolve(volume, model, normalize="official", device=args.device)
    path = args.out / f"{stem}_official_rln.tif"
    tifffile.imwrite(path, np.asarray(result, dtype=np.float32))
    print(f"wrote {path} {result.shape}")


if __name__ == "__main__":
    main()
