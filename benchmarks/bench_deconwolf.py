"""richardson_lucy against deconwolf (``dw``) on deconwolf's own demo: the DAPI stack
(../shared/data/deconwolf/dapi_001.tif, 40x201x101) with its 79x181x181 Born–Wolf PSF
(deconwolf's ``dw_bw``), 20 iterations, the same number of CPU threads for both.

Both run side by side in one process tree on the same inputs; each timing is the wall time of
the whole job as a user runs it (read the TIFFs, deconvolve, write a float32 TIFF), the median
of ``--rounds``: deconwolf as a subprocess (after one warm-up run that leaves its FFTW wisdom
behind, as a user's second run finds it), ours as a fresh ``rln-fast deconvolve`` process
(what a user runs in its place) and in this process (torch's threads set to ``--threads``). Quality: our plain RL-20 against deconwolf's RL-20, relative L2 after a
least-squares scale of deconwolf's output minus its background level (deconwolf keeps the
background in its estimate, clamped at that level: the image minimum + its offset 5; ours is
the object above it). For that
comparison ours uses deconwolf's background estimate (the image minimum); the default
background="auto" (1st percentile) is timed too.

Jobs: deconwolf's is image + PSF - 1 per axis after its lateral PSF crop (279x379x118 here,
FFTW on any size); ours is image + PSF per axis rounded up to 2^a 3^b 5^c 7^d (120x384x288).
No PSF is cropped by energy on our side: the 181x181 PSF is itself a crop of a cone that is
~600 px wide in its end planes, and cutting it further changes the model, not just the speed.

deconwolf's speed is its FFTW's: Debian's libfftw3f has SSE2/AVX codelets only
("fftw-3.3.10-sse2-avx"); FFTW 3.3.10 built with --enable-float --enable-threads
--enable-openmp --enable-avx2 --enable-avx512 --enable-fma (from `apt-get source fftw3`) and
given to dw through LD_LIBRARY_PATH is its strongest build on an AVX-512 machine. The JSON
records which one ran ("deconwolf_fft_backend"). A HOME of its own keeps that build's FFTW
wisdom apart from the system one's.

Run:  python benchmarks/bench_deconwolf.py [--threads 2] [--iterations 20] [--json PATH]
      (or pytest benchmarks/bench_deconwolf.py, which writes benchmarks/results/
      deconwolf_cpu.json). Finds ``dw`` through RLN_FAST_DECONWOLF (the executable or its
      folder) or PATH, ``dw_bw`` next to it; skips cleanly when either or the data is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "deconwolf" / "dapi_001.tif"
RESULT = ROOT / "benchmarks" / "results" / "deconwolf_cpu.json"
# deconwolf's demo (demo/makefile): dw_bw for the DAPI optics, 79 planes.
DW_BW_ARGS = ["--resxy", "130", "--resz", "300", "--lambda", "461", "--NA", "1.45", "--ni", "1.512",
              "--nslice", "79"]


def find_deconwolf() -> tuple[str, str] | None:
    """(dw, dw_bw) executables, or None."""
    dw = os.environ.get("RLN_FAST_DECONWOLF") or shutil.which("dw")
    if dw and os.path.isdir(dw):
        dw = os.path.join(dw, "dw")
    if not dw or not os.access(dw, os.X_OK):
        return None
    bw = os.path.join(os.path.dirname(dw), "dw_bw")
    bw = bw if os.access(bw, os.X_OK) else shutil.which("dw_bw")
    return (dw, bw) if bw else None


def _dw_version(dw: str) -> tuple[str, str]:
    """deconwolf's version and its FFT backend (the FFTW build and its SIMD codelets, which
    set its speed: Debian's FFTW has SSE2/AVX only, a build with AVX2/AVX-512 is faster)."""
    out = subprocess.run([dw, "--version"], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    m = re.search(r"\d+\.\d+\.\d+", text)
    fft = re.search(r"FFT Backend: '([^']*)'", text)
    if fft:
        return (m.group(0) if m else "unknown"), fft.group(1)
    # Builds that do not print it: the FFTW library the executable loads.
    try:
        libs = subprocess.run(["ldd", dw], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        libs = ""
    lib = re.search(r"(libfftw3f[^ ]*) => (\S+)", libs)
    return (m.group(0) if m else "unknown"), (f"{lib.group(1)} ({lib.group(2)})" if lib else "unknown")


def _time_process(cmd: list[str], times: int) -> list[float]:
    """Wall seconds of each of ``times`` runs of the command (which must succeed)."""
    seconds = []
    for _ in range(times):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
        seconds.append(time.perf_counter() - t0)
    return seconds


def run(threads: int = 2, iterations: int = 20, rounds: int = 1, workdir: Path | None = None) -> dict:
    import tifffile
    import torch

    import rln_fast as rf

    exes = find_deconwolf()
    if exes is None:
        raise FileNotFoundError("deconwolf's dw / dw_bw not found (RLN_FAST_DECONWOLF or PATH)")
    if not DATA.exists():
        raise FileNotFoundError(f"{DATA} not found")
    dw, dw_bw = exes
    load_at_start = os.getloadavg()[0]
    tmp = Path(workdir or tempfile.mkdtemp(prefix="rln_fast_dw_"))
    tmp.mkdir(parents=True, exist_ok=True)
    image = tmp / "dapi_001.tif"
    shutil.copyfile(DATA, image)
    psf_path = tmp / "psf_dapi.tif"
    if not psf_path.exists():
        subprocess.run([dw_bw, *DW_BW_ARGS, "--threads", str(threads), "--overwrite", str(psf_path)],
                       check=True, capture_output=True, timeout=3600)

    def deconwolf(method: str, n: int, out: Path, times: int = 1) -> list[float]:
        return _time_process([dw, "--iter", str(n), "--threads", str(threads), "--method", method,
                              "--float", "--overwrite", "--out", str(out), str(image), str(psf_path)],
                             times)

    deconwolf("rl", 1, tmp / "warmup.tif")  # FFTW wisdom for this job size, kept on disk
    dw_rounds = {m: deconwolf(m, iterations, tmp / f"dw_{m}.tif", rounds) for m in ("rl", "shb")}
    dw_times = {m: statistics.median(t) for m, t in dw_rounds.items()}
    log = (tmp / "dw_rl.tif.log.txt").read_text(errors="replace")
    m = re.search(r"background level to ([-0-9.eE+]+)", log)
    dw_bg = float(m.group(1)) if m else None
    job = re.search(r"job: \[(\d+)x(\d+)x(\d+)\]", log)

    torch.set_num_threads(threads)
    img = tifffile.imread(image)
    bg_min = float(img.min())

    def ours(acceleration: str, background) -> tuple[float, np.ndarray]:
        times, out = [], None
        for _ in range(rounds):
            t0 = time.perf_counter()
            x = tifffile.imread(image).astype(np.float32)
            k = tifffile.imread(psf_path)
            out = rf.richardson_lucy(x, k, iterations, acceleration=acceleration,
                                     background=background, progress=False)
            tifffile.imwrite(tmp / "ours.tif", out)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    ours_rl_t, ours_rl = ours("none", bg_min)
    ours_shb_t, _ = ours("shb", bg_min)
    ours_default_t, _ = ours("shb", "auto")

    def command(acceleration: str) -> list[float]:
        """Ours as deconwolf is timed: a fresh process (``rln-fast deconvolve``), so that
        Python's start, torch's import and the FFT plans count too."""
        out = tmp / f"ours_cli_{acceleration}.tif"
        cmd = [sys.executable, "-m", "rln_fast.cli", "deconvolve", str(image), str(out),
               "--method", "rl", "--psf", str(psf_path), "--num-iter", str(iterations),
               "--acceleration", acceleration, "--background", repr(bg_min),
               "--threads", str(threads), "--overwrite", "-q"]
        return _time_process(cmd, rounds)

    cli_rounds = {m: command(m) for m in ("none", "shb")}
    cli_t = {m: statistics.median(t) for m, t in cli_rounds.items()}
    cli_rl = tifffile.imread(tmp / "ours_cli_none.tif")
    cli_vs_api = float(np.abs(cli_rl - ours_rl).max() / np.abs(ours_rl).max())

    theirs = tifffile.imread(tmp / "dw_rl.tif").astype(np.float64)
    # dw's RL logs its level only when verbose; it clamps its estimate at that level, so the
    # output's minimum is the level (image minimum + its --offset 5).
    bg_from = "log" if dw_bg is not None else "output minimum"
    dw_bg = dw_bg if dw_bg is not None else float(theirs.min())
    theirs -= dw_bg
    a = ours_rl.astype(np.float64)
    scale = float((a * theirs).sum() / (theirs * theirs).sum())
    rel = float(np.linalg.norm(a - scale * theirs) / np.linalg.norm(a))

    from rln_fast.rl import _fast_len

    k_shape = tifffile.imread(psf_path).shape
    our_job = [_fast_len(i + p, even=(ax == 2)) for ax, (i, p) in enumerate(zip(img.shape, k_shape, strict=True))]
    return {
        "benchmark": "bench_deconwolf",
        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
        "quoted_in_issue_13": "deconwolf 0.4.7, 2 threads, on another build: 8.5 s (RL and SHB)",
        "deconwolf": _dw_version(dw)[0],
        "deconwolf_fft_backend": _dw_version(dw)[1],
        "threads": threads,
        "iterations": iterations,
        "image": list(img.shape),
        "psf": list(k_shape),
        "job_deconwolf_zyx": [int(job.group(3)), int(job.group(2)), int(job.group(1))] if job else None,
        "job_ours_zyx": our_job,
        "deconwolf_s": {"rl": dw_times["rl"], "shb": dw_times["shb"]},
        "deconwolf_s_rounds": dw_rounds,
        "ours_command_s_rounds": {"rl": cli_rounds["none"], "shb": cli_rounds["shb"]},
        "ours_s": {"rl": ours_rl_t, "shb": ours_shb_t, "shb_background_auto": ours_default_t},
        "ours_command_s": {"rl": cli_t["none"], "shb": cli_t["shb"]},
        "speedup": {"rl": dw_times["rl"] / ours_rl_t, "shb": dw_times["shb"] / ours_shb_t},
        "speedup_command": {"rl": dw_times["rl"] / cli_t["none"],
                            "shb": dw_times["shb"] / cli_t["shb"]},
        "command_vs_api_max_rel": cli_vs_api,
        "quality": {"rl_rel_l2_vs_deconwolf_rl_scaled": rel, "scale": scale,
                    "deconwolf_background": dw_bg, "deconwolf_background_from": bg_from,
                    "ours_background": bg_min},
        "timing": "wall time of read + deconvolve + write float32 TIFF, median of "
                  f"{rounds}: ours in this process (ours_s) and as a fresh `rln-fast deconvolve` "
                  "process (ours_command_s); deconwolf a fresh process after one warm-up run "
                  "(FFTW wisdom on disk)",
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": sys.version.split()[0]},
    }


def test_against_deconwolf():
    import pytest

    if find_deconwolf() is None:
        pytest.skip("deconwolf's dw / dw_bw not found (set RLN_FAST_DECONWOLF or PATH)")
    if not DATA.exists():
        pytest.skip(f"{DATA} not found")
    pytest.importorskip("tifffile")
    report = run(rounds=3)
    RESULT.write_text(json.dumps(report, indent=2) + "\n")
    assert report["quality"]["rl_rel_l2_vs_deconwolf_rl_scaled"] < 0.10
    assert report["command_vs_api_max_rel"] < 1e-5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="folder for the inputs and outputs (kept; default: a temporary one)")
    ap.add_argument("--json", type=Path, default=RESULT)
    args = ap.parse_args()
    if find_deconwolf() is None or not DATA.exists():
        print("bench_deconwolf: skipped (deconwolf's dw / dw_bw or the DAPI stack not found; "
              "set RLN_FAST_DECONWOLF)")
        return
    report = run(args.threads, args.iterations, args.rounds, args.workdir)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
