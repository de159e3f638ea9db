"""The napari plugin (npe2, manifest ``rln_fast/napari.yaml``): RL, RLN and PSF widgets, sample data.

Install with ``pip install rln-fast[napari]``; the widgets appear under Plugins > rln_fast. This
package imports nothing at import time: napari reads the manifest without importing it, and the
widget modules import napari, Qt and torch only when a widget or sample is opened.
"""
