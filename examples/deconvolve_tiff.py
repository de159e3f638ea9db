"""Deconvolve a 3-D TIFF stack with Richardson–Lucy and with the shipped RLN model.

    python examples/deconvolve_tiff.py stack.tif --voxel-size 0.3 0.13 0.13 \\
        --na 1.4 --wavelength 0.52 --out results/

Writes <stem>_rl.tif and <stem>_rln.tif (float32, ImageJ hyperstacks with the voxel size).
Without a TIFF it first writes a synthetic widefield stack (a phantom blurred by the PSF and
with photon noise) and deconvolves that. --small makes everything tiny, for a quick check.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import rln_fast as rf


def read_stack(path: Path, voxel_size: list[float] | None) -> tuple[np.ndarray, tuple]:
    """The stack (z, y, x) and its voxel size (dz, dy, dx) in µm.

    rf.io.read takes the voxel size from ImageJ or OME metadata; --voxel-size overrides it.
    A deconvolution PSF is wrong without it, so never guess.
    """
    stack, meta = rf.io.read(path)
    voxel_size = voxel_size or meta["voxel_size"]
    if voxel_size is None:
        raise SystemExit(f"{path}: no voxel size in the file; pass --voxel-size DZ DY DX (µm)")
    return stack, tuple(float(v) for v in voxel_size)


def write_stack(path: Path, stack: np.ndarray, voxel_size: tuple) -> None:
    # Written atomically, with the voxel size in the ImageJ metadata.
    rf.io.write(path, stack.astype(np.float32), voxel_size=voxel_size)


def psf_grid(shape: tuple) -> tuple:
    """A PSF grid of about half the stack per axis, odd sides (peak on the centre voxel)."""
    sides = (min(n // 2 + 1, 129) for n in shape)
    return tuple(s if s % 2 else s - 1 for s in sides)


def make_test_stack(path: Path, shape: tuple, voxel_size: tuple, optics: dict) -> None:
    """A synthetic widefield stack: phantom objects, blurred by the PSF, Poisson + read noise."""
    psf = rf.psf.born_wolf(psf_grid(shape), voxel_size, **optics)
    _truth, raw = rf.synth.phantom_pair(psf, shape, seed=1)
    write_stack(path, raw, voxel_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tiff", nargs="?", type=Path, help="3-D TIFF stack (z, y, x)")
    p.add_argument("--out", type=Path, default=Path("deconvolved"), help="output folder")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("DZ", "DY", "DX"),
                   help="voxel size in µm (default: from the TIFF's ImageJ metadata)")
    p.add_argument("--na", type=float, default=1.45, help="numerical aperture")
    p.add_argument("--wavelength", type=float, default=0.461, help="emission wavelength, µm")
    p.add_argument("--ni", type=float, default=1.512, help="immersion refractive index")
    p.add_argument("--iterations", type=int, default=30, help="Richardson–Lucy iterations")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--small", action="store_true", help="tiny synthetic stack, 5 iterations")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    optics = {"na": args.na, "wavelength": args.wavelength, "ni": args.ni}

    if args.tiff is None:
        # The shipped RLN was trained for these optics (rln_fast/weights/README.md).
        shape = (24, 48, 48) if args.small else (64, 128, 128)
        args.tiff = args.out / "synthetic.tif"
        make_test_stack(args.tiff, shape, (0.3, 0.13, 0.13), optics)
        print(f"wrote a synthetic test stack {args.tiff} {shape}")
    iterations = 5 if args.small else args.iterations
    stack, voxel_size = read_stack(args.tiff, args.voxel_size)
    print(f"{args.tiff}: {stack.shape} {stack.dtype}, voxel size {voxel_size} µm")

    # 1. Richardson–Lucy needs the PSF at the stack's voxel size. Here a generated widefield
    #    PSF on a grid of about half the stack;
    #    a measured bead stack would go through rf.psf.prepare(bead, bead_voxel, voxel_size).
    psf = rf.psf.born_wolf(psf_grid(stack.shape), voxel_size, **optics)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    rl = rf.richardson_lucy(stack, psf, iterations, device=device)
    print(f"Richardson–Lucy, {iterations} iterations: {time.perf_counter() - t0:.1f} s")

    # 2. RLN: the network has learnt the PSF; the input only needs to be sampled near the
    #    voxel size the model was trained at. The output is rescaled to the input's units.
    t0 = time.perf_counter()
    rln = rf.rln_deconvolve(stack, device=device)
    print(f"RLN: {time.perf_counter() - t0:.1f} s")

    for name, result in (("rl", rl), ("rln", rln)):
        path = args.out / f"{args.tiff.stem}_{name}.tif"
        write_stack(path, result, voxel_size)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
