"""Does --memory-budget bound the whole process? Peak RSS of `deconvolve_file` (RLN and RL) above
the idle footprint, sampled, against the budget.

    python benchmarks/bench_memory.py --shape 512 512 512 --budget 256MB --work /tmp/rln_mem

The input (float32 TIFF, a smooth random phantom with noise; deleted afterwards unless
--keep) is deconvolved by a child process per method. The child imports torch and rln_fast,
reports its idle resident memory (no volume touched), then runs
``deconvolve_file(..., memory_budget=BUDGET, device="cpu")``: reading, percentiles, the
blocks and writing included. This process samples the child's RSS (psutil, every 20 ms);
the figure of merit is (peak - idle) / budget, which should stay <= 1.25. RL uses a 9x15x15
PSF; its memory does not depend on the number of iterations past the second (Biggs keeps
one step of history), so --iterations defaults to 3 to keep the run short.
Results go to benchmarks/results/bench_memory_<host>.json ($OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

LIMIT = 1.25  # peak above idle, as a multiple of the budget


def make_input(path: Path, psf_path: Path, shape: tuple[int, int, int]) -> None:
    """A float32 TIFF written plane by plane (never whole in memory), and a Gaussian PSF."""
    import tifffile

    from rln_fast import io

    rng = np.random.default_rng(0)
    mm = tifffile.memmap(path, shape=shape, dtype=np.float32, imagej=True,
                         metadata={"axes": "ZYX"})
    base = rng.random((8, 8)).astype(np.float32)
    ny, nx = shape[1], shape[2]
    plane = np.kron(base, np.ones((-(-ny // 8), -(-nx // 8)), np.float32))[:ny, :nx]
    for z in range(shape[0]):
        mm[z] = plane * (1 + 0.5 * np.sin(z / 7)) * 1000 + rng.poisson(50, (ny, nx))
    mm.flush()
    del mm
    zz, yy, xx = np.meshgrid(*(np.arange(n) - n // 2 for n in (9, 15, 15)), indexing="ij")
    psf = np.exp(-(zz / 2.0) ** 2 / 2 - (yy / 1.5) ** 2 / 2 - (xx / 1.5) ** 2 / 2)
    io.write(psf_path, (psf / psf.sum()).astype(np.float32))


def child(a: argparse.Namespace) -> None:
    """Import, say the idle RSS, run, say the summary (one JSON line each)."""
    import gc

    import psutil
    import torch

    import rln_fast  # noqa: F401 - part of the idle footprint
    from rln_fast import distributed

    torch.set_num_threads(a.threads or torch.get_num_threads())
    gc.collect()
    print(json.dumps({"idle_rss": psutil.Process().memory_info().rss}), flush=True)
    time.sleep(0.3)  # let the parent take its idle samples
    kw = {"psf": a.psf, "num_iter": a.iterations} if a.method == "rl" else {}
    summary = distributed.deconvolve_file(a.input, a.output, method=a.method,
                                          memory_budget=a.budget, device="cpu",
                                          progress=False, **kw)
    print(json.dumps({"summary": {k: v for k, v in summary.items() if k != "output"}}),
          flush=True)


def run_child(a: argparse.Namespace, method: str, out: Path) -> dict:
    import psutil

    cmd = [sys.executable, __file__, "--child", "--method", method, "--input", str(a.input),
           "--psf", str(a.psf), "--output", str(out), "--budget", a.budget,
           "--iterations", str(a.iterations)] + (["--threads", str(a.threads)] if a.threads else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    peak, samples = 0, 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
        except psutil.Error:
            break
        if lines:  # only after the idle footprint is reported
            peak, samples = max(peak, rss), samples + 1
        time.sleep(0.02)
    reader.join()
    err = proc.stderr.read()
    info: dict = {}
    for line in lines:
        try:
            info.update(json.loads(line))
        except ValueError:
            pass
    if proc.returncode != 0 or "idle_rss" not in info:
        raise SystemExit(f"{method} run failed ({proc.returncode}): {err.strip()[-2000:]}")
    budget = _bytes(a.budget)
    above = peak - info["idle_rss"]
    return {"method": method, "seconds": time.perf_counter() - t0, "samples": samples,
            "idle_rss_mib": info["idle_rss"] / 2**20, "peak_rss_mib": peak / 2**20,
            "peak_above_idle_mib": above / 2**20, "budget_mib": budget / 2**20,
            "ratio_to_budget": above / budget, "within_limit": above <= LIMIT * budget,
            "summary": info.get("summary")}


def _bytes(budget: str) -> int:
    from rln_fast import tiling

    return tiling.parse_memory(budget)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 512])
    ap.add_argument("--budget", default="256MB")
    ap.add_argument("--methods", nargs="+", default=["rln", "rl"], choices=["rln", "rl"])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/rln_fast_memory"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--psf", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    a.input, a.psf = a.work / "input.tif", a.work / "psf.tif"
    shape = tuple(a.shape)
    if not a.input.exists():
        make_input(a.input, a.psf, shape)
    runs = []
    for method in a.methods:
        out = a.work / f"out_{method}.ome.zarr"
        r = run_child(a, method, out)
        runs.append(r)
        print(f"{method:4s} idle {r['idle_rss_mib']:7.1f} MiB  peak {r['peak_rss_mib']:7.1f} MiB  "
              f"above idle {r['peak_above_idle_mib']:7.1f} MiB = {r['ratio_to_budget']:.2f}x "
              f"the budget ({'ok' if r['within_limit'] else 'OVER'} <= {LIMIT}x)  "
              f"{r['seconds']:.0f} s, {r['summary']['blocks']} blocks of "
              f"{tuple(r['summary']['block'])}", flush=True)
        if not a.keep:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
    import torch

    result = {"shape": shape, "dtype": "float32", "input_bytes": a.input.stat().st_size,
              "budget": a.budget, "limit": LIMIT, "rl_iterations": a.iterations,
              "host": platform.node(), "cores": os.cpu_count(),
              "torch": torch.__version__, "torch_threads": a.threads or torch.get_num_threads(),
              "runs": runs}
    dest = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"bench_memory_{platform.node() or 'host'}.json").write_text(
        json.dumps(result, indent=1))
    if not a.keep:
        a.input.unlink()
        a.psf.unlink()


if __name__ == "__main__":
    main()
