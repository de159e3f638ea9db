"""Makes docs/napari_stack.png: the Stack (channels, time) widget after a two-channel run,
beside the middle plane of the input and of its result as napari composites them.

The two channels are seeded phantoms blurred with Born–Wolf PSFs at 0.461 and 0.60 µm, opened
as napari opens a file with ``channel_axis`` (one layer per channel, magenta and green). The
widget runs Richardson–Lucy on both, each with a PSF generated from its own wavelength. No
OpenGL is needed: the widget is drawn by Qt offscreen, the planes are blended here with each
layer's colormap and contrast limits (additive, as napari's channel layers), so:
    QT_QPA_PLATFORM=offscreen python docs/make_napari_stack_picture.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from napari.components import ViewerModel
from PIL import Image, ImageDraw, ImageFont
from qtpy.QtWidgets import QApplication

import rln_fast as rf
from rln_fast.napari._widgets import StackWidget

VOXEL = (0.3, 0.13, 0.13)
SHAPE = (32, 128, 128)
WAVELENGTHS = (0.461, 0.60)  # DAPI-like, mCherry-like emission, µm
NA, NI = 1.45, 1.512
SEEDS = (20261202, 20261203)  # not training seeds
PANEL = 512  # pixels per image side in the picture


def _composite(layers: list, planes: list[np.ndarray]) -> np.ndarray:
    """Additive blend of ``planes`` with the layers' colormaps and contrast limits, (y, x, 3)."""
    rgb = np.zeros((*planes[0].shape, 3), np.float32)
    for layer, plane in zip(layers, planes, strict=True):
        lo, hi = (float(v) for v in np.percentile(plane, [0.5, 99.8]))
        mapped = layer.colormap.map(np.clip((plane - lo) / (hi - lo), 0, 1).ravel())
        rgb += mapped[:, :3].reshape(rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("napari_stack.png")))
    args = parser.parse_args()

    app = QApplication.instance() or QApplication([])
    stack = []
    for wl, seed in zip(WAVELENGTHS, SEEDS, strict=True):
        psf = rf.psf.born_wolf((17, 33, 33), VOXEL, na=NA, wavelength=wl, ni=NI)
        stack.append(rf.synth.phantom_pair(psf, SHAPE, seed=seed, device="cpu")[1])
    viewer = ViewerModel()
    layers = viewer.add_image(np.stack(stack), channel_axis=0, name=["DAPI", "mCherry"],
                              colormap=["magenta", "green"], scale=VOXEL)
    widget = StackWidget(viewer)
    widget.image.value = layers
    widget.method.value = "rl"
    for row, wl in zip(widget.rows, WAVELENGTHS, strict=True):
        row.wavelength.value = wl
        row.iterations.value = 20
    widget.na.value, widget.ni.value = NA, NI
    widget.device.value = "cpu"
    widget.native.resize(620, 760)
    widget.native.show()
    t0 = time.perf_counter()
    widget.run()
    while widget.running:
        app.processEvents()
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    app.processEvents()
    grab = widget.native.grab().toImage().convertToFormat(4)  # QImage.Format_RGB32
    ptr = grab.constBits()
    ptr.setsize(grab.sizeInBytes())
    panel = np.frombuffer(ptr, np.uint8).reshape(grab.height(), grab.bytesPerLine() // 4, 4)
    panel = panel[:, : grab.width(), 2::-1].copy()  # BGRA -> RGB

    results = [viewer.layers[f"{layer.name} RL"] for layer in layers]
    z = SHAPE[0] // 2
    images = [_composite(layers, [layer.data[z] for layer in layers]),
              _composite(results, [layer.data[z] for layer in results])]
    height = max(panel.shape[0], PANEL + 90)
    canvas = Image.new("RGB", (panel.shape[1] + 2 * PANEL + 30, height), (38, 41, 48))
    canvas.paste(Image.fromarray(panel), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=18)
    titles = ("synthetic input: DAPI (magenta), mCherry (green)", "Richardson-Lucy, 20 it, a PSF each")
    for i, (img, title) in enumerate(zip(images, titles, strict=True)):
        x = panel.shape[1] + 10 + i * (PANEL + 10)
        canvas.paste(Image.fromarray(img).resize((PANEL, PANEL), Image.NEAREST), (x, 40))
        draw.text((x, 10), title, fill=(230, 230, 230), font=font)
    draw.text((panel.shape[1] + 10, PANEL + 55),
              f"middle plane (z = {z}); {SHAPE[1]}x{SHAPE[2]} voxels of {VOXEL[1]} um, "
              "each layer's colormap, added", fill=(200, 200, 200), font=font)
    out = canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out.save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KiB, {out.width}x"
          f"{out.height}); the run took {seconds:.1f} s")


if __name__ == "__main__":
    main()
