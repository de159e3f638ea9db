"""Makes docs/multichannel.png: a two-channel stack through `rln-fast deconvolve`, input vs output.

Channel 0 is the real widefield DAPI stack (deconwolf's demo, ../shared/data/deconwolf/
dapi_001.tif: 40x201x101, 0.3/0.13/0.13 µm, NA 1.45, ni 1.512, emission 461 nm). Channel 1
is SYNTHETIC: rln_fast.synth.microscopy_object (seed 3) blurred with a Born-Wolf PSF at
520 nm, plus background and Poisson noise. Both go into one OME-TIFF (CZYX, channel names,
voxel size), which the command deconvolves with Richardson-Lucy, each channel with its own
PSF generated from its emission wavelength and its own iteration count:

    rln-fast deconvolve two_channel.ome.tif two_channel_rl.ome.tif --method rl \\
        --psf-model born-wolf --na 1.45 --ni 1.512 --wavelength 0.461,0.52 \\
        --psf-shape 21 41 41 --num-iter 20,30

The figure shows the middle z-plane: DAPI, the synthetic channel and both as a composite
(DAPI blue, channel 1 green), input above, output below; each panel is scaled to its own
0.1-99.9 percentiles. Run from the repository root: python docs/make_multichannel_figure.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw
from scipy.signal import fftconvolve

from rln_fast import io, synth
from rln_fast import psf as psf_models

ROOT = Path(__file__).resolve().parents[1]
DAPI = ROOT.parent / "shared" / "data" / "deconwolf" / "dapi_001.tif"
VOXEL = (0.3, 0.13, 0.13)
COMMAND = ["--method", "rl", "--psf-model", "born-wolf", "--na", "1.45", "--ni", "1.512",
           "--wavelength", "0.461,0.52", "--psf-shape", "21", "41", "41", "--num-iter", "20,30"]


def second_channel(shape: tuple[int, int, int]) -> np.ndarray:
    """The synthetic channel: an object blurred at 520 nm, background, Poisson noise."""
    obj, background = synth.microscopy_object(shape, seed=3)
    k = psf_models.born_wolf((21, 41, 41), VOXEL, na=1.45, wavelength=0.52, ni=1.512)
    blurred = np.clip(fftconvolve(obj, k / k.sum(), mode="same"), 0, None)
    rng = np.random.default_rng(3)
    return rng.poisson(1500 * blurred + 300 * background + 100).astype(np.uint16)


def scaled(plane: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(plane, (0.1, 99.9))
    return (np.clip((plane - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)


def panel(dapi: np.ndarray, other: np.ndarray) -> list[Image.Image]:
    a, b = scaled(dapi), scaled(other)
    composite = np.stack([np.zeros_like(a), b, a], axis=-1)
    return [Image.fromarray(a).convert("RGB"), Image.fromarray(b).convert("RGB"),
            Image.fromarray(composite)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("multichannel.png")))
    args = parser.parse_args()
    dapi = tifffile.imread(DAPI)
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "two_channel.ome.tif", Path(tmp) / "two_channel_rl.ome.tif"
        stack = np.stack([dapi, second_channel(dapi.shape)])
        tifffile.imwrite(inp, stack, ome=True, metadata={
            "axes": "CZYX", "Channel": {"Name": ["DAPI (real)", "synthetic 520 nm"]},
            **{f"PhysicalSize{a}": v for a, v in zip("ZYX", VOXEL, strict=True)}})
        subprocess.run([sys.executable, "-m", "rln_fast.cli", "deconvolve", str(inp), str(out),
                        *COMMAND], check=True)
        s_in, s_out = io.open_stack(inp), io.open_stack(out)
        z = s_in.volume_shape[0] // 2
        planes = [[s.volume(0, c)[z:z + 1, :, :][0] for c in range(2)] for s in (s_in, s_out)]
        print("output:", s_out, s_out.channel_names)
    rows = [panel(*p) for p in planes]
    scale, label = 2, 22
    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    fig = Image.new("RGB", (3 * w + 4 * 6, 2 * (h + label) + 3 * 6), "white")
    draw = ImageDraw.Draw(fig)
    titles = ["DAPI (real data)", "channel 1 (synthetic)", "composite"]
    for r, (row, name) in enumerate(zip(rows, ("input", "RL output"), strict=True)):
        for c, img in enumerate(row):
            x0, y0 = 6 + c * (w + 6), 6 + r * (h + label + 6)
            draw.text((x0, y0 + 4), f"{titles[c]}: {name}", fill="black")
            fig.paste(img.resize((w, h), Image.NEAREST), (x0, y0 + label))
    fig.save(args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
