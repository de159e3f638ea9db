"""rln-fast deconvolve: the happy paths, and every bad input gives one line, a non-zero exit and
no output file (an interrupted run keeps only its block record, and resumes)."""

from __future__ import annotations

import errno
import os
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

pytest.importorskip("zarr")  # the GPU machine has no zarr: these tests run in CI

VOXEL = (0.3, 0.13, 0.13)


def _imagej(path: Path, arr: np.ndarray) -> Path:
    tifffile.imwrite(path, arr, imagej=arr.dtype != np.float64,
                     resolution=(1 / VOXEL[2], 1 / VOXEL[1]),
                     metadata={"spacing": VOXEL[0], "unit": "um", "axes": "ZYX"[-arr.ndim:]})
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
    r = _run("deconvolve", path, out, "--method", "rl", "--psf", psf, "--num-iter", 3,
             "--background", "0", "--memory-budget", "160MB", "--no-progress")
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


# --------------------------------------------------------------------------- a command that talks

class _Bar:
    """Stands in for tqdm: records the total and every update."""

    made: list[_Bar] = []

    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit, self.n, self.updates = total, desc, unit, 0, 0
        _Bar.made.append(self)

    def update(self, k: int = 1) -> None:
        self.n += k
        self.updates += 1

    def set_postfix_str(self, *a: object, **k: object) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def bars(monkeypatch):
    from rln_fast import tiling

    _Bar.made = []

    def fake(total, desc, enabled, unit="tile", min_total=2):
        return _Bar(total, desc, unit) if enabled and total >= min_total else None

    monkeypatch.setattr(tiling, "progress_bar", fake)
    return _Bar.made


def _delta_psf(tmp_path: Path, voxel=VOXEL) -> Path:
    psf = tmp_path / ("psf.tif" if voxel else "bare_psf.tif")
    k = np.pad(np.ones((1, 1, 1), np.float32), 2)  # 5x5x5: tifffile reads (3, 3, 3) as RGB
    if voxel:
        io.write(psf, k, voxel_size=voxel)
    else:
        tifffile.imwrite(psf, k)  # no metadata: no voxel size
    return psf


@pytest.mark.parametrize("tile", [None, (12, 40, 36)])
def test_rl_progress_counts_every_iteration_of_every_block(tmp_path, stack, bars, tile):
    path, _ = stack
    extra = ["--tile", *tile] if tile else []
    r = _run("deconvolve", path, tmp_path / "o.tif", "--method", "rl", "--psf",
             _delta_psf(tmp_path), "--num-iter", 4, "--progress", *extra)
    assert r.exit_code == 0, r.output
    blocks = 1 if tile is None else 2
    [bar] = [b for b in bars if b.desc == "rl"]
    assert (bar.total, bar.unit, bar.n) == (4 * blocks, "it", 4 * blocks)
    assert bar.updates >= 4 * blocks  # one per iteration, not one per block


def test_rln_progress_counts_blocks_also_one(tmp_path, stack, model_path, bars):
    path, _ = stack
    r = _run("deconvolve", path, tmp_path / "o.tif", "--model", model_path, "--progress")
    assert r.exit_code == 0, r.output
    [bar] = [b for b in bars if b.desc == "rln blocks"]
    assert (bar.total, bar.n) == (1, 1)


def test_progress_only_on_a_terminal_unless_asked(tmp_path, stack):
    path, _ = stack
    psf = _delta_psf(tmp_path)
    base = ["deconvolve", path, tmp_path / "o.tif", "--method", "rl", "--psf", psf,
            "--num-iter", 3]
    r = _run(*base)  # CliRunner's stderr is not a terminal: no bar, nothing on stderr
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    r = _run(*base, "--progress")
    assert r.exit_code == 0 and "rl:" in r.stderr and "/3 " in r.stderr, r.stderr
    r = _run(*base, "--progress", "-q")  # quiet wins: no bar, no summary line
    assert r.exit_code == 0 and r.stderr == "" and r.stdout == "", r.output


def test_missing_voxel_sizes_are_warned_with_what_is_assumed(tmp_path, stack):
    _, x = stack
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, x)  # no ImageJ/OME metadata: no voxel size
    r = _run("deconvolve", bare, tmp_path / "o.tif", "--method", "rl", "--psf",
             _delta_psf(tmp_path, voxel=None), "--num-iter", 1, "-q")
    assert r.exit_code == 0, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr  # warnings stay with -q
    assert "bare.tif has no voxel size" in lines[0] and "--voxel-size DZ DY DX" in lines[0]
    assert "bare_psf.tif has no voxel size" in lines[1] and "assuming" in lines[1]
    assert "share one voxel size" in lines[0]
    # The PSF knows its voxel size: the image is assumed to have it.
    r = _run("deconvolve", bare, tmp_path / "o1.tif", "--method", "rl", "--psf",
             _delta_psf(tmp_path), "--num-iter", 1)
    [line] = r.stderr.strip().splitlines()
    assert "bare.tif has no voxel size" in line and "assuming the PSF's, (0.3, 0.13, 0.13) µm" in line
    # Given on the command line: the image is fine, the PSF is assumed at that voxel size.
    r = _run("deconvolve", bare, tmp_path / "o2.tif", "--method", "rl", "--psf",
             _delta_psf(tmp_path, voxel=None), "--num-iter", 1, "-q",
             "--voxel-size", *VOXEL)
    [line] = r.stderr.strip().splitlines()
    assert "bare_psf.tif has no voxel size" in line and "(0.3, 0.13, 0.13) µm" in line
    assert io.read(tmp_path / "o2.tif")[1]["voxel_size"] == pytest.approx(VOXEL)


def test_rln_without_voxel_size_warns(tmp_path, stack, model_path):
    _, x = stack
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, x)
    r = _run("rln", bare, tmp_path / "o.tif", "--model", model_path)
    assert r.exit_code == 0, r.output
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("rln-fast rln: warning: ") and "the output gets none" in line


@pytest.mark.parametrize("tile", [None, (12, 20, 18)])
def test_normalize_official_matches_the_api(tmp_path, stack, model_path, tile):
    from rln_fast import rln_deconvolve

    path, x = stack
    out = tmp_path / "o.tif"
    extra = ["--tile", *tile] if tile else []
    r = _run("deconvolve", path, out, "--model", model_path, "--normalize", "official", *extra)
    assert r.exit_code == 0, r.output
    want = rln_deconvolve(x, model_path, normalize="official", device="cpu", progress=False)
    got = io.read(out)[0]
    # official: the output stays in the network's units (not mapped back to the input's).
    assert abs(float(got.mean()) - float(x.mean())) > 0.5 * float(x.mean())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_normalize_none_is_one_spelling(stack, model_path):
    from rln_fast import rln_deconvolve

    _, x = stack
    a = rln_deconvolve(x[:16, :16, :16], model_path, normalize="none", progress=False)
    b = rln_deconvolve(x[:16, :16, :16], model_path, normalize=None, progress=False)
    np.testing.assert_array_equal(a, b)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                          "OPENBLAS_NUM_THREADS")}
    yield before
    torch.set_num_threads(before)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_threads_sets_torch_and_our_openmp(tmp_path, stack, restore_threads):
    import ctypes

    path, _ = stack
    gomp = ctypes.CDLL("libgomp.so.1")  # already loaded by torch: the runtime our kernels use
    r = _run("deconvolve", path, tmp_path / "o.tif", "--method", "rl", "--psf",
             _delta_psf(tmp_path), "--num-iter", 1, "--method", "rl", "--threads", 1,
             "--edges", "periodic")
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 1
    assert gomp.omp_get_max_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert _run("deconvolve", path, tmp_path / "o2.tif", "--threads", 0).exit_code == 2


def test_a_psf_at_another_voxel_size_is_said_to_be_resampled(tmp_path, stack):
    from rln_fast import psf as psf_models

    path, _ = stack
    fine = (VOXEL[0] / 2, VOXEL[1] / 2, VOXEL[2] / 2)
    psf = tmp_path / "fine_psf.tif"
    io.write(psf, psf_models.gaussian((9, 9, 9), fine, (0.3, 0.13, 0.13)), voxel_size=fine)
    r = _run("deconvolve", path, tmp_path / "o.tif", "--method", "rl", "--psf", psf,
             "--num-iter", 1)
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert "resampling the PSF" in r.stdout and "(0.15, 0.065, 0.065) µm" in r.stdout
