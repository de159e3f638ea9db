"""The rln-fast psf, synth, train and bench commands: happy paths on tiny sizes, and bad input.

Every failure must be one line "rln-fast CMD: ..." on stderr, exit code 1, and leave no output.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from rln_fast import psf as psf_models
from rln_fast import synth
from rln_fast.bench import RL_TOLERANCE, RLN_TOLERANCE, PlainRLN, plain_rl_periodic
from rln_fast.cli import main
from rln_fast.models.rln import RLN
from rln_fast.rl import richardson_lucy
from rln_fast.train import default_psf

REPO = Path(__file__).resolve().parents[1]
OPTICS = ["--voxel-size", "0.2", "0.1", "0.1", "--na", "1.2", "--wavelength", "0.52"]
TINY = ["--shape", "5", "9", "9"]
PHANTOM = (20, 20, 20)  # synth needs every side >= 19


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, command: str, *fragments: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"rln-fast {command}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --------------------------------------------------------------------------- psf


def test_psf_tiff_holds_the_model_and_the_voxel_size(tmp_path):
    out = tmp_path / "psf.tif"
    result = run("psf", "born-wolf", out, *TINY, *OPTICS, "--ni", "1.33")
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout
    with tifffile.TiffFile(out) as tif:
        arr = tif.asarray()
        meta = tif.imagej_metadata
        x_res = tif.pages[0].tags["XResolution"].value
        y_res = tif.pages[0].tags["YResolution"].value
    assert arr.dtype == np.float32 and arr.shape == (5, 9, 9)
    expected = psf_models.born_wolf((5, 9, 9), (0.2, 0.1, 0.1), na=1.2, wavelength=0.52, ni=1.33)
    np.testing.assert_array_equal(arr, expected)
    assert meta["spacing"] == pytest.approx(0.2, rel=1e-12)
    assert meta["unit"] == "um"
    assert x_res[1] / x_res[0] == pytest.approx(0.1, rel=1e-6)
    assert y_res[1] / y_res[0] == pytest.approx(0.1, rel=1e-6)
    assert files_under(tmp_path) == ["psf.tif"]  # no temporary file left beside it


def test_psf_npy_gaussian_even_shape_notes_the_centre(tmp_path):
    out = tmp_path / "g.npy"
    result = run("psf", "gaussian", out, "--shape", "6", "8", "8", "--voxel-size", "1", "1", "1",
                 "--sigma", "2", "1", "1")
    assert result.exit_code == 0, result.output
    arr = np.load(out)
    np.testing.assert_array_equal(arr, psf_models.gaussian((6, 8, 8), 1.0, sigma=(2, 1, 1)))
    assert np.unravel_index(arr.argmax(), arr.shape) == (3, 4, 4)
    assert "shape // 2" in result.stderr


def test_psf_confocal_switches_to_gibson_lanni_optics(tmp_path):
    out = tmp_path / "c.tif"
    result = run("psf", "confocal", out, *TINY, *OPTICS, "--ex-wavelength", "0.488",
                 "--ni", "1.515", "--ns", "1.33", "--particle-z", "4", "--pinhole", "0.3")
    assert result.exit_code == 0, result.output
    expected = psf_models.confocal((5, 9, 9), (0.2, 0.1, 0.1), na=1.2, em_wavelength=0.52,
                                   ex_wavelength=0.488, ni=1.515, pinhole=0.3,
                                   model="gibson_lanni", ns=1.33, particle_z=4.0)
    np.testing.assert_array_equal(tifffile.imread(out), expected)


@pytest.mark.parametrize("args, fragments", [
    (["born-wolf", "p.tif", *TINY, "--voxel-size", "0.2", "0.1", "0.1", "--na", "1.6",
      "--wavelength", "0.52"], ["na=1.6", "immersion refractive index"]),
    (["born-wolf", "p.tif", "--shape", "-5", "9", "9", *OPTICS], ["shape must be 3 positive"]),
    (["born-wolf", "p.tif", *TINY, "--voxel-size", "0.2", "-0.1", "0.1", "--na", "1.2",
      "--wavelength", "0.52"], ["voxel_size"]),
    (["gibson-lanni", "p.tif", *TINY, "--voxel-size", "0.2", "0.1", "0.1", "--na", "1.2",
      "--wavelength", "520"], ["micrometres", "0.52"]),
    (["airy", "p.tif", *TINY, *OPTICS], ["unknown PSF model 'airy'", "born-wolf"]),
    (["gaussian", "p.tif", *TINY, *OPTICS, "--sigma", "1", "1", "1"],
     ["--na, --wavelength do not apply to the gaussian"]),
    (["gaussian", "p.tif", *TINY, "--voxel-size", "1", "1", "1"], ["--sigma", "--fwhm"]),
    (["confocal", "p.tif", *TINY, *OPTICS], ["needs --ex-wavelength"]),
    (["born-wolf", "p.tif", *TINY, "--voxel-size", "0.2", "0.1", "0.1"],
     ["needs --na, --wavelength"]),
    (["born-wolf", "p.png", *TINY, *OPTICS], ["p.png", ".tif, .tiff or .npy"]),
])
def test_psf_bad_parameters_are_one_line(tmp_path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run("psf", *args), "psf", *fragments)
    assert files_under(tmp_path) == []


def test_psf_unwritable_output_folder(tmp_path):
    missing = tmp_path / "no_such_folder" / "p.tif"
    assert_one_line_error(run("psf", "born-wolf", missing, *TINY, *OPTICS), "psf",
                          str(missing), "does not exist")
    (tmp_path / "a_file").write_text("x")
    under_file = tmp_path / "a_file" / "p.tif"
    assert_one_line_error(run("psf", "born-wolf", under_file, *TINY, *OPTICS), "psf",
                          "a_file is a file, not a folder")
    assert files_under(tmp_path) == ["a_file"]


def test_psf_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def half_then_full_disk(f, *args, **kwargs):
        f.write(b"II*\x00 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", half_then_full_disk)
    out = tmp_path / "p.tif"
    assert_one_line_error(run("psf", "born-wolf", out, *TINY, *OPTICS), "psf", "no space left")
    assert files_under(tmp_path) == []


def test_psf_error_in_a_real_process(tmp_path):
    """Exit code and stderr as a shell sees them: one line, no traceback, no file."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                    os.environ.get("PYTHONPATH")])))
    out = tmp_path / "p.tif"
    proc = subprocess.run(
        [sys.executable, "-m", "rln_fast.cli", "psf", "born-wolf", str(out), *TINY,
         "--voxel-size", "0.2", "0.1", "0.1", "--na", "1.6", "--wavelength", "0.52"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("rln-fast psf: na=1.6 must be smaller than the immersion")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


# --------------------------------------------------------------------------- synth


def test_synth_writes_the_recipe_pairs(tmp_path):
    out = tmp_path / "data"
    result = run("synth", out, "--n", "2", "--shape", *PHANTOM, "--seed", "5", "--no-progress")
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["gt", "gt/000.tif", "gt/001.tif",
                                "input", "input/000.tif", "input/001.tif"]
    gt1, raw1 = synth.phantom_pair(default_psf(), PHANTOM, seed=6)
    np.testing.assert_array_equal(tifffile.imread(out / "gt" / "001.tif"), gt1)
    np.testing.assert_array_equal(tifffile.imread(out / "input" / "001.tif"), raw1)
    assert tifffile.imread(out / "input" / "000.tif").shape == PHANTOM


def test_synth_with_psf_file_and_with_psf_model(tmp_path):
    psf = psf_models.gaussian((7, 9, 9), 1.0, sigma=(1.5, 1.0, 1.0))
    np.save(tmp_path / "psf.npy", psf)
    result = run("synth", tmp_path / "a", "--n", "1", "--shape", *PHANTOM, "--psf",
                 tmp_path / "psf.npy", "--no-progress")
    assert result.exit_code == 0, result.output
    _, raw = synth.phantom_pair(psf, PHANTOM, seed=0)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a" / "input" / "000.tif"), raw)

    result = run("synth", tmp_path / "b", "--n", "1", "--shape", *PHANTOM, "--psf-model",
                 "born-wolf", "--psf-shape", "9", "11", "11", *OPTICS, "--no-progress")
    assert result.exit_code == 0, result.output
    bw = psf_models.born_wolf((9, 11, 11), (0.2, 0.1, 0.1), na=1.2, wavelength=0.52)
    _, raw = synth.phantom_pair(bw, PHANTOM, seed=0)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b" / "input" / "000.tif"), raw)


def _bad_psf_files(tmp_path: Path) -> None:
    (tmp_path / "text.tif").write_text("not an image\n")
    tifffile.imwrite(tmp_path / "flat.tif", np.ones((9, 9), np.float32))
    np.save(tmp_path / "negative.npy", -np.ones((3, 3, 3), np.float32))


@pytest.mark.parametrize("args, fragments", [
    (["--psf", "missing.tif"], ["--psf missing.tif: file not found"]),
    (["--psf", "text.tif"], ["--psf text.tif is not a readable TIFF"]),
    (["--psf", "flat.tif"], ["--psf flat.tif: the PSF must be 3-D", "(9, 9)"]),
    (["--psf", "negative.npy"], ["negative.npy", "non-negative"]),
    (["--psf", "flat.tif", "--psf-model", "gaussian"], ["not both"]),
    (["--na", "1.2"], ["--na", "add --psf-model"]),
    (["--psf-model", "born-wolf", *OPTICS[:4], "--na", "1.6", "--wavelength", "0.5"],
     ["na=1.6"]),
    (["--shape", "10", "20", "20"], [">= 19"]),
    (["--n", "0"], ["--n must be >= 1"]),
])
def test_synth_bad_input_writes_nothing(tmp_path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    _bad_psf_files(tmp_path)
    before = files_under(tmp_path)
    shape = [] if "--shape" in args else ["--shape", *map(str, PHANTOM)]
    result = run("synth", "out", "--n", "1", *shape, *args, "--no-progress")
    assert_one_line_error(result, "synth", *fragments)
    assert files_under(tmp_path) == before


def test_synth_unwritable_output_folder(tmp_path):
    (tmp_path / "a_file").write_text("x")
    result = run("synth", tmp_path / "a_file" / "out", "--n", "1", "--shape", *PHANTOM)
    assert_one_line_error(result, "synth", "a_file is a file, not a folder")
    assert files_under(tmp_path) == ["a_file"]


# --------------------------------------------------------------------------- train

TRAIN_FAST = ["--batch-size", "2", "--crop", "8", "8", "8", "--checkpoint-every", "1",
              "--val-every", "2", "--n-val", "1", "--no-progress"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    synth.write_pairs(root, 3, default_psf(), PHANTOM, seed=0, progress=False)
    return root


def losses(out: Path) -> list[dict[str, str]]:
    with open(out / "loss.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_train_then_resume_matches_an_unbroken_run(tmp_path, pairs):
    out = tmp_path / "run"
    result = run("train", out, "--data-dir", pairs, "--steps", "3", *TRAIN_FAST)
    assert result.exit_code == 0, result.output
    for name in ("model.pt", "checkpoint.pt", "loss.csv", "val.csv"):
        assert (out / name).is_file()
        assert str(out / name) in result.stdout
    first = losses(out)
    assert [r["step"] for r in first] == ["1", "2", "3"]
    assert RLN.load(out / "model.pt").metadata["steps"] == 3

    result = run("train", out, "--data-dir", pairs, "--steps", "5", *TRAIN_FAST)
    assert result.exit_code == 0, result.output
    assert f"resuming from {out / 'checkpoint.pt'} at step 3" in result.stdout
    resumed = losses(out)
    assert [r["step"] for r in resumed] == ["1", "2", "3", "4", "5"]
    assert resumed[:3] == first

    straight = tmp_path / "straight"
    result = run("train", straight, "--data-dir", pairs, "--steps", "5", *TRAIN_FAST)
    assert result.exit_code == 0, result.output
    assert losses(straight) == resumed  # bit for bit on the CPU

    # A changed recipe does not silently continue the old run.
    result = run("train", out, "--data-dir", pairs, "--steps", "6", "--lr", "0.01", *TRAIN_FAST)
    assert_one_line_error(result, "train", "lr: 0.025 -> 0.01", "--no-resume")


def test_train_synthetic_with_a_generated_psf(tmp_path):
    out = tmp_path / "run"
    result = run("train", out, "--synthetic", "--n-volumes", "2", "--phantom-shape", *PHANTOM,
                 "--steps", "2", "--psf-model", "gaussian", "--psf-shape", "7", "7", "7",
                 "--voxel-size", "1", "1", "1", "--sigma", "1.5", "1", "1", *TRAIN_FAST)
    assert result.exit_code == 0, result.output
    assert "gaussian (7, 7, 7)" in result.stdout
    assert [r["step"] for r in losses(out)] == ["1", "2"]
    assert (out / "model.pt").is_file()


def test_train_bad_input_leaves_no_output_folder(tmp_path, pairs):
    out = tmp_path / "run"

    def run(*args):  # the failure line alone, without a progress bar before it
        return CliRunner().invoke(main, [*map(str, args), "--no-progress"])

    result = run("train", out, "--data-dir", tmp_path / "nowhere", "--steps", "1")
    assert_one_line_error(result, "train", "nowhere does not exist", "gt/ and input/")
    # Found only once training starts: the folder it made is removed again.
    result = run("train", out, "--data-dir", pairs, "--steps", "1", "--n-val", "3")
    assert_one_line_error(result, "train", "3 pairs", "lower --n-val")
    result = run("train", out, "--data-dir", pairs, "--steps", "1", "--n-val", "1",
                 "--crop", "32", "32", "32")
    assert_one_line_error(result, "train", "smaller than the crop", "lower --crop")
    result = run("train", out, "--data-dir", pairs, "--batch-size", "0")
    assert_one_line_error(result, "train", "--batch-size must be an integer >= 1")
    result = run("train", out, "--data-dir", pairs, "--psf", tmp_path / "psf.tif")
    assert_one_line_error(result, "train", "--synthetic data only")
    result = run("train", out, "--synthetic", "--psf", tmp_path / "psf.tif")
    assert_one_line_error(result, "train", "psf.tif: file not found")
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------- bench


def test_plain_rln_is_the_same_network():
    model = RLN.from_pretrained().double().eval()
    x = torch.rand(1, 1, 9, 12, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours, plain = model(x), PlainRLN.from_rln(model)(x)
    err = ((ours - plain).abs().max() / ours.abs().max()).item()
    assert err < 1e-9


def test_plain_rl_loop_is_periodic_rl():
    psf = psf_models.gaussian((5, 7, 7), 1.0, sigma=(1.5, 1.0, 1.0))
    img = torch.rand(8, 12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 1
    ours = richardson_lucy(img, psf, 4, edges="periodic", acceleration=None, background=0,
                           progress=False)
    plain = plain_rl_periodic(img, torch.from_numpy(psf).double(), 4)
    err = ((ours.double() - plain).abs().max() / plain.abs().max()).item()
    assert err < 1e-6  # ours returns float32


def test_bench_quick_prints_ratios_and_saves_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "--quick", "--device", "cpu", "--size", "8", "12", "12",
                 "--rounds", "1", "--json", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("speedup") == 2
    report = json.loads(out.read_text())
    assert report["size"] == [8, 12, 12] and report["quick"] is True
    rln, rl = report["results"]["rln_inference"], report["results"]["richardson_lucy"]
    assert rln["max_rel_diff"] <= RLN_TOLERANCE and rl["max_rel_diff"] <= RL_TOLERANCE
    for r in (rln, rl):
        assert r["speedup"] == pytest.approx(r["baseline_s"] / r["ours_s"])
        assert f"{r['speedup']:6.2f}x" in result.stdout
    assert files_under(tmp_path) == ["bench.json"]


def test_bench_refuses_to_time_results_that_disagree(tmp_path, monkeypatch):
    monkeypatch.setattr(PlainRLN, "forward", lambda self, x: 2 * x)
    out = tmp_path / "bench.json"
    result = run("bench", "--size", "8", "12", "12", "--rounds", "1", "--json", out,
                 "--no-progress")
    assert_one_line_error(result, "bench", "disagree", "timings skipped")
    assert not out.exists()


def test_bench_bad_options(tmp_path):
    result = run("bench", "--json", tmp_path / "no_dir" / "b.json", "--size", "8", "12", "12")
    assert_one_line_error(result, "bench", "no_dir does not exist")
    result = run("bench", "--size", "2", "12", "12", "--no-progress")
    assert_one_line_error(result, "bench", "size must be 3 integers >= 4")
    if not torch.cuda.is_available():
        assert_one_line_error(run("bench", "--device", "cuda"), "bench", "CUDA is not available")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("name,text", [("train", "last checkpoint is kept"),
                                       ("synth", "--skip-existing"),
                                       ("psf", "no output was written")])
def test_ctrl_c_says_what_is_kept(name, text, capsys):
    from rln_fast.cli import clean_errors

    @clean_errors(name)
    def body():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        body()
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rln-fast {name}: interrupted; ") and text in err[0]
