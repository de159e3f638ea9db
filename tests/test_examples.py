"""Every script in examples/ runs in its --small mode, exits 0 and writes sane outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script: str, *args: str | Path, timeout: float = 120) -> str:
    env = dict(os.environ)
    # The checkout first, so the scripts import this rln_fast even without an install.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _read(path: Path) -> np.ndarray:
    assert path.is_file(), f"{path} was not written"
    return tifffile.imread(path)


def test_deconvolve_tiff(tmp_path):
    out = _run("deconvolve_tiff.py", "--small", "--out", tmp_path)
    raw = _read(tmp_path / "synthetic.tif")
    assert raw.shape == (24, 48, 48)
    # The voxel size came from the TIFF's ImageJ metadata (no --voxel-size given).
    assert "voxel size (0.3, 0.13, 0.13)" in out
    for name in ("rl", "rln"):
        path = tmp_path / f"synthetic_{name}.tif"
        result = _read(path)
        assert result.shape == raw.shape and result.dtype == np.float32
        assert np.isfinite(result).all() and result.std() > 0
        with tifffile.TiffFile(path) as tif:
            assert tif.imagej_metadata["spacing"] == pytest.approx(0.3)
    # Deconvolution sharpens: more contrast than the blurred input.
    for name in ("rl", "rln"):
        result = _read(tmp_path / f"synthetic_{name}.tif")
        assert result.std() / result.mean() > raw.std() / raw.mean()


def test_official_checkpoint(tmp_path, shared_dir):
    prefix = shared_dir / "official_rln" / "model.ckpt"
    if not prefix.with_suffix(".ckpt.index").is_file():
        pytest.skip("the official RLN checkpoint is not in ../shared/official_rln")
    out = _run("official_checkpoint.py", prefix, "--small", "--out", tmp_path)
    assert "trained for 50000 steps" in out
    import rln_fast as rf

    saved = rf.RLN.load(tmp_path / "official_rln.pt")
    volume = _read(tmp_path / "synthetic.tif")
    result = _read(tmp_path / "synthetic_official_rln.tif")
    expected = rf.rln_deconvolve(volume, saved, normalize="official", device="cpu",
                                 progress=False)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_train_own_psf(tmp_path):
    out = _run("train_own_psf.py", "--small", "--out", tmp_path)
    import rln_fast as rf

    model = rf.RLN.load(tmp_path / "model.pt")
    assert model.metadata["steps"] == 4
    assert len((tmp_path / "loss.csv").read_text().strip().splitlines()) == 1 + 4
    result = _read(tmp_path / "heldout_rln.tif")
    assert result.shape == (24, 40, 40) and np.isfinite(result).all()
    assert out.count("PSNR") == 3


def test_custom_model_layers():
    out = _run("custom_model_layers.py", "--small")
    diff = float(out.split("largest relative difference ")[1].split()[0])
    assert diff < 1e-10
    losses = [float(line.split("loss ")[1]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_dask_ome_zarr(tmp_path):
    pytest.importorskip("distributed")
    pytest.importorskip("zarr")
    out = _run("dask_ome_zarr.py", "--small", "--out", tmp_path, timeout=240)
    assert "wrote" in out and "8 blocks" in out
    # Tiled on 2 workers = the whole volume at once; map_overlap the same.
    diffs = [float(line.split("difference ")[1].split()[0].rstrip(";,"))
             for line in out.splitlines() if "difference" in line]
    assert len(diffs) == 2 and max(diffs) <= 1e-5
    import rln_fast as rf

    y, meta = rf.io.read(tmp_path / "deconvolved.ome.zarr")
    assert y.shape == (32, 96, 96) and meta["voxel_size"] == pytest.approx((0.3, 0.13, 0.13))
