"""rln-fast deconvolve: the happy paths, and every bad input gives one line, a non-zero exit and
no output file (an interrupted run keeps only its block record, and resumes)."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from rln_fast import distributed, io
from rln_fast.cli import main
from rln_fast.models.rln import RLN

pytest.importorskip("zarr")  # the GPU machine has no zarr: these tests run in CI

VOXEL = (0.3, 0.13, 0.13)


def _imagej(path: Path, arr: np.ndarray) -> Path:
    tifffile.imwrite(path, arr, imagej=arr.dtype != np.float64,
                     resolution=(1 / VOXEL[2], 1 / VOXEL[1]),
                     metadata={"spacing": VOXEL[0], "unit": "um", "axes": "ZYX"[-arr.ndim:]})
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "random.pt"
    RLN().save(path)
    return path


@pytest.fixture
def stack(tmp_path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    x = (rng.gamma(2.0, 40.0, (24, 40, 36)) + 5).astype(np.uint16)
    return _imagej(tmp_path / "stack.tif", x), x


def _run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(name))


def _fails(result, text: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert text in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_rln_to_ome_zarr(tmp_path, stack, model_path):
    path, x = stack
    out = tmp_path / "out.ome.zarr"
    r = _run("deconvolve", path, out, "--model", model_path, "--tile", 16, 32, 32,
             "--no-progress")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "block(s)" in r.output
    y, meta = io.read(out)
    assert y.shape == x.shape and meta["voxel_size"] == pytest.approx(VOXEL)
    # --skip-existing leaves a finished output alone.
    r = _run("deconvolve", path, out, "--skip-existing")
    assert r.exit_code == 0 and "skipped" in r.output


def test_rl_to_tiff_with_a_budget(tmp_path, stack):
    path, x = stack
    psf = tmp_path / "psf.tif"
    io.write(psf, np.pad(np.ones((1, 1, 1), np.float32), 2), voxel_size=VOXEL)
    out = tmp_path / "out.tif"
    r = _run("deconvolve", path, out, "--method", "rl", "--psf", psf, "--iterations", 3,
             "--memory-budget", "160MB", "--no-progress")
    assert r.exit_code == 0, r.output
    y, _ = io.read(out)
    # A delta PSF: RL returns the image.
    np.testing.assert_allclose(y, x.astype(np.float32), rtol=1e-4)


def test_bad_inputs(tmp_path, stack, model_path):
    path, x = stack
    out = tmp_path / "out.zarr"
    cases = [
        (["deconvolve", tmp_path / "missing.tif", out], "missing.tif does not exist"),
        (["deconvolve", path, out, "--method", "rl"], "needs --psf"),
        (["deconvolve", path, out, "--model", tmp_path / "nope.pt"], "nope.pt does not exist"),
        (["deconvolve", path, tmp_path / "no_such_folder" / "o.zarr"], "does not exist"),
        (["deconvolve", path, tmp_path / "out.png"], "png"),
        (["deconvolve", path, out, "--memory-budget", "lots"], "not understood"),
        (["deconvolve", path, out, "--tile", 15, 16, 16], "even sides"),
        (["deconvolve", path, path], "is the input"),
    ]
    text = tmp_path / "notes.tif"
    text.write_text("not an image\n")
    cases.append((["deconvolve", text, out], "notes.tif"))
    flat = _imagej(tmp_path / "flat.tif", np.ones((40, 36), np.uint16))
    cases.append((["deconvolve", flat, out], "2-D"))
    bad = x.astype(np.float32)
    bad[3, 4, 5] = np.nan
    nan = _imagej(tmp_path / "nan.tif", bad)
    cases.append((["deconvolve", nan, out, "--model", model_path], "NaN or Inf"))
    cases.append((["deconvolve", nan, out, "--method", "rl", "--psf", path], "NaN or Inf"))
    big = _imagej(tmp_path / "big_psf.tif", np.ones((30, 5, 5), np.float32))
    cases.append((["deconvolve", path, out, "--method", "rl", "--psf", big], "larger than the image"))
    zero = _imagej(tmp_path / "zero_psf.tif", np.zeros((5, 5, 5), np.float32))
    cases.append((["deconvolve", path, out, "--method", "rl", "--psf", zero], "positive sum"))
    for args, message in cases:
        r = _run(*args, "--no-progress")
        _fails(r, message)
        assert _leftovers(tmp_path, "out") == [], args


def test_full_disk_keeps_the_record_and_resumes(tmp_path, stack, model_path, monkeypatch):
    path, _ = stack
    out = tmp_path / "out.zarr"
    write = io.OutputVolume.write_block
    calls = {"n": 0}

    def full_after_three(self, index, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise io._write_error(OSError(errno.ENOSPC, "No space left on device"), out)
        return write(self, index, data)

    monkeypatch.setattr(io.OutputVolume, "write_block", full_after_three)
    args = ["deconvolve", path, out, "--model", model_path, "--tile", 16, 16, 16, "--no-progress"]
    _fails(_run(*args), "no space left")
    assert not out.exists()
    assert (tmp_path / "out.zarr.blocks").is_dir()
    monkeypatch.setattr(io.OutputVolume, "write_block", write)
    r = _run(*args)
    assert r.exit_code == 0 and "3 kept from an interrupted run" in r.output


def test_ctrl_c_exits_130_without_output_and_resumes(tmp_path, stack, model_path, monkeypatch):
    path, _ = stack
    out = tmp_path / "out.tif"
    run = distributed.BlockJob.run
    calls = {"n": 0}

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return run(self, *a, **k)

    monkeypatch.setattr(distributed.BlockJob, "run", interrupted)
    args = ["deconvolve", path, out, "--model", model_path, "--tile", 16, 16, 16, "--no-progress"]
    _fails(_run(*args), "interrupted", code=130)
    assert not out.exists()
    monkeypatch.setattr(distributed.BlockJob, "run", run)
    r = _run(*args)
    assert r.exit_code == 0 and "4 kept from an interrupted run" in r.output
    ref = tmp_path / "ref.tif"
    assert _run("deconvolve", path, ref, "--model", model_path, "--tile", 16, 16, 16,
                "--no-progress").exit_code == 0
    np.testing.assert_array_equal(io.read(out)[0], io.read(ref)[0])


def test_a_real_process_reports_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rln_fast.cli", "deconvolve",
                        str(tmp_path / "missing.tif"), str(tmp_path / "o.zarr")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"rln-fast deconvolve: input {tmp_path / 'missing.tif'} does not exist; check the path"]


def test_unwritable_output_folder(tmp_path, stack, monkeypatch):
    """A read-only folder (simulated: the tests may run as root, who may write anywhere)."""
    path, _ = stack
    folder = tmp_path / "readonly"
    folder.mkdir()
    real_access = io.os.access
    monkeypatch.setattr(io.os, "access",
                        lambda p, mode, **k: False if Path(p) == folder else real_access(p, mode))
    _fails(_run("deconvolve", path, folder / "out.zarr", "--no-progress"), "is not writable")
    assert list(folder.iterdir()) == []
