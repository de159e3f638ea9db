"""Makes docs/napari.png: napari with the demo sample, the RLN widget docked and its result.

Needs a display with OpenGL; headless, run it under Xvfb:
    xvfb-run -a -s "-screen 0 1400x900x24" python docs/make_napari_screenshot.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
import numpy as np
from PIL import Image
from qtpy.QtWidgets import QApplication

from rln_fast.napari._sample_data import demo_volume
from rln_fast.napari._widgets import RLNWidget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("napari.png")))
    args = parser.parse_args()

    # No pop-up over the canvas: napari's notice that its PyQt5 support is deprecated is a
    # notification shown once per session, switched off by this (private) module flag.
    import napari._qt.qt_main_window as qt_main_window

    qt_main_window.SHOW_QT_WARNING = False
    viewer = napari.Viewer(title="rln_fast", show=True)
    viewer.window.resize(1400, 820)
    data, meta, _kind = demo_volume()[0]  # the input only (truth and PSF stay out of view)
    viewer.add_image(data, **meta)
    widget = RLNWidget(viewer)
    viewer.window.add_dock_widget(widget, name="RLN (rln_fast)", area="right")
    widget.image.value = viewer.layers["demo input"]
    widget.device.value = "cpu"
    widget.run()
    while widget.running:
        QApplication.processEvents()
        time.sleep(0.02)

    # Input and RLN output side by side on the middle plane.
    viewer.grid.enabled = True
    viewer.dims.set_point(0, float(viewer.layers["demo input"].extent.world[1][0]) / 2)
    for name in ("demo input", "demo input RLN"):
        layer = viewer.layers[name]
        plane = layer.data[layer.data.shape[0] // 2]
        layer.contrast_limits = [float(v) for v in np.percentile(plane, [0.5, 99.8])]
    viewer.reset_view()
    QApplication.processEvents()

    shot = viewer.screenshot(canvas_only=False, flash=False)
    # A 256-colour palette keeps the PNG small; the images are grey ramps plus UI colours.
    img = Image.fromarray(shot[..., :3]).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    img.save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KiB, {img.width}x{img.height})")
    viewer.close()


if __name__ == "__main__":
    main()
