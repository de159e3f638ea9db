"""The GPU check cannot rot: gpu_report.py's CPU smoke mode runs end to end here (same JSON keys
as the GPU run), and gpu_check.sh's smoke mode runs and turns a failing step into a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "gpu_report.py"
CHECK = ROOT / "benchmarks" / "gpu_check.sh"

# What the GPU run reports, section by section; the smoke run must produce exactly these.
LAYER_KEYS = {"layer", "skip", "rel_err_vs_cudnn_fp32", "ours_ms", "cudnn_fp32_ms", "cudnn_tf32_ms",
              "ratio_vs_fp32", "ratio_vs_tf32", "ours_tflops"}
RLN_KEYS = {"shape", "small_rel_err_device_vs_cpu", "rel_err_fused_vs_plain", "fused_ms",
            "fused_peak_bytes_per_voxel", "plain_eager_ms", "plain_eager_peak_bytes_per_voxel",
            "plain_eager_tf32_ms", "fused_gvox_per_s", "plain_eager_gvox_per_s",
            "plain_eager_tf32_gvox_per_s", "ratio_vs_plain_eager", "ratio_vs_plain_eager_tf32"}
DECONVOLVE_KEYS = {"shape", "seconds", "gvox_per_s", "peak_bytes_per_voxel", "crop",
                   "crop_max_abs_err_vs_cpu", "crop_rel_err_vs_cpu"}
RL_KEYS = {"shape", "psf", "rel_err_periodic_vs_plain_torch", "four_ffts_ms", "periodic_ms_per_iter",
           "default_ms_per_iter", "plain_torch_ms_per_iter", "periodic_over_four_ffts",
           "default_over_four_ffts", "plain_over_four_ffts", "ratio_vs_plain_torch",
           "periodic_peak_bytes_per_voxel", "default_peak_bytes_per_voxel",
           "plain_peak_bytes_per_voxel", "cupy_ms_per_iter", "ratio_vs_cupy", "cupy_skipped"}
TRAIN_KEYS = {"shape", "loss_checked", "ours_ms", "plain_fp32_ms", "plain_tf32_ms",
              "ratio_vs_plain_fp32", "ratio_vs_plain_tf32"}
COMPILE_KEYS = {"compile_backend", "plain_compile_seconds_to_compile", "rel_err_compile_vs_eager",
                "plain_compile_ms", "plain_compile_gvox_per_s", "ratio_vs_plain_compile",
                "plain_compile_tf32_seconds_to_compile", "plain_compile_tf32_ms",
                "plain_compile_tf32_gvox_per_s", "ratio_vs_plain_compile_tf32"}
PROFILE_KEYS = {"shape", "rl_shape", "fused_slabs", "fused_ms", "fused_one_slab_rel_err", "fused_one_slab_ms",
                "fused_one_slab_peak_bytes_per_voxel", "fused_top_kernels", "rl_periodic_top_kernels",
                "spectrum_mul_ms"}
TOP_KEYS = {"mode", "device", "device_name", "backend", "torch", "date", "weights", "tf32_effective",
            "skipped", "section_seconds", "layers", "rln", "deconvolve", "rl", "train", "profile",
            "compile"}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _report(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), "--smoke", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)


def test_smoke_report_end_to_end(tmp_path):
    r = _report(tmp_path, "--random-weights")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu_report.json").read_text())
    assert set(rep) == TOP_KEYS
    assert rep["mode"] == "smoke" and rep["device"] == "cpu" and rep["skipped"] == []
    assert rep["weights"].startswith("random initialisation")
    assert len(rep["layers"]) == 7 and all(set(row) == LAYER_KEYS for row in rep["layers"])
    assert set(rep["rln"]) == RLN_KEYS
    assert set(rep["deconvolve"]) == DECONVOLVE_KEYS
    assert len(rep["rl"]) == 2 and all(set(row) == RL_KEYS for row in rep["rl"])
    assert all(row["cupy_skipped"] for row in rep["rl"])  # CuPy is CUDA-only: a reason, not a number
    assert set(rep["train"]) == TRAIN_KEYS
    assert set(rep["compile"]) == COMPILE_KEYS
    assert set(rep["profile"]) == PROFILE_KEYS
    for k in ("fused_top_kernels", "rl_periodic_top_kernels"):  # the profiler saw operators
        rows = rep["profile"][k]
        assert rows and all(set(r) == {"name", "calls", "ms"} and r["ms"] > 0 for r in rows)
    assert set(rep["profile"]["spectrum_mul_ms"]) == {"real_otf", "complex_otf", "view_as_real"}
    # Agreement checks ran and the timings are real numbers.
    assert rep["rln"]["rel_err_fused_vs_plain"] <= 1e-4
    assert rep["deconvolve"]["crop_rel_err_vs_cpu"] <= 1e-4
    assert all(row["ours_ms"] > 0 for row in rep["layers"])
    assert rep["rln"]["fused_ms"] > 0 and rep["train"]["ours_ms"] > 0


def test_missing_checkpoint_is_an_error(tmp_path):
    r = _report(tmp_path, "--checkpoint", str(tmp_path / "nope" / "model.ckpt"),
                "--skip", "layers", "rln", "deconvolve", "rl", "train", "compile")
    assert r.returncode != 0
    assert "official checkpoint" in r.stderr and "--random-weights" in r.stderr
    assert "Traceback" not in r.stderr  # one clear line


def test_bad_arguments_fail(tmp_path):
    r = _report(tmp_path, "--random-weights", "--skip", "rln")  # compile needs the rln time
    assert r.returncode != 0 and "compile baseline needs the rln section" in r.stderr
    r = _report(tmp_path, "--random-weights", "--shape", "8x1x9")
    assert r.returncode != 0 and "every side >= 2" in r.stderr


def test_cuda_without_gpu_is_an_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = _report(tmp_path, "--random-weights", "--device", "cuda", "--skip", "layers", "rln",
                "deconvolve", "rl", "train", "compile")
    assert r.returncode != 0 and "no CUDA GPU here" in r.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_smoke_mode(tmp_path):
    env = _env()
    env["OUT"] = str(tmp_path / "ok")
    env["PYTHON"] = sys.executable
    env["GPU_TESTS"] = "tests/test_cuda_paths.py::test_slabs_cover_depth_with_even_starts"
    env["GPU_REPORT_ARGS"] = "--skip layers rln deconvolve rl train compile"
    r = subprocess.run(["bash", str(CHECK), "--smoke"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "ok" / "gpu_report.json").read_text())["mode"] == "smoke"
    # A failing step (here: a test that does not exist) makes the whole check fail, and the
    # steps after it still run.
    env["OUT"] = str(tmp_path / "bad")
    env["GPU_TESTS"] = "tests/test_cuda_paths.py::no_such_test"
    r = subprocess.run(["bash", str(CHECK), "--smoke"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=900)
    assert r.returncode != 0 and "failed: tests" in r.stdout
    assert (tmp_path / "bad" / "gpu_report.json").is_file()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_train_mode_smoke_runs_every_stage_of_the_shipped_plan(tmp_path):
    import tarfile

    from rln_fast.models.rln import RLN

    env = _env()
    env["OUT"] = str(tmp_path / "out")
    env["PYTHON"] = sys.executable
    env["CHAIN_DIR"] = str(tmp_path / "chain")
    plan = ROOT / "scripts" / "chains" / "every4.txt"
    r = subprocess.run(["bash", str(CHECK), "--smoke", "--train", str(plan)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = [line.split(":")[0] for line in plan.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    with tarfile.open(tmp_path / "out" / "chain.tar.gz") as tar:
        packed = set(tar.getnames())
    assert {f"{n}/model.pt" for n in names} <= packed
    assert RLN.load(tmp_path / "chain" / names[-1] / "model.pt").metadata["steps"] == 2
    r = subprocess.run(["bash", str(CHECK), "--train", str(tmp_path / "nope.txt")], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "no plan file" in r.stderr
