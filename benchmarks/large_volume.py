"""A volume larger than the memory budget, TIFF -> OME-Zarr with `rln-fast deconvolve`, killed
halfway and resumed: time, peak RSS, and a check that the resumed output is what an unbroken
run writes.

    python benchmarks/large_volume.py --shape 128 4096 4096 --budget 1GB --work /tmp/large

The input (uint16, generated here and deleted afterwards unless --keep) is a synthetic
widefield phantom tiled across the plane, with Poisson noise. The command runs in a child
process whose resident memory (RSS, with its children) is sampled every 0.2 s; it is killed
(SIGKILL, as a crash or a scheduler would) once about half the blocks are recorded, then run
again to finish. Afterwards a sample of blocks finished before and after the kill is
recomputed here from the input and compared bit for bit. Results go to
benchmarks/results/large_volume_<host>.json ($OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_input(path: Path, shape: tuple[int, int, int]) -> None:
    import tifffile
    import torch

    from rln_fast import synth
    from rln_fast.train import default_psf

    d = shape[0]
    _, raw = synth.phantom_pair(default_psf(), shape=(d, 256, 256), seed=7)
    raw = np.asarray(raw, np.float32)
    mm = tifffile.memmap(path, shape=shape, dtype=np.uint16, bigtiff=True, imagej=False,
                         metadata={"axes": "ZYX"})
    gen = torch.Generator().manual_seed(0)
    for y in range(0, shape[1], 256):
        for x in range(0, shape[2], 256):
            tile = raw[:, : min(256, shape[1] - y), : min(256, shape[2] - x)]
            lam = torch.from_numpy(np.ascontiguousarray(tile)) * 20 + 100
            mm[:, y:y + tile.shape[1], x:x + tile.shape[2]] = (
                torch.poisson(lam, generator=gen).clamp_(0, 65535).numpy().astype(np.uint16))
        mm.flush()
    del mm


def run_command(args: list[str], kill_at_blocks: int | None, record: Path) -> dict:
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    killed = False
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        if kill_at_blocks is not None and record.is_dir():
            done = sum(1 for p in record.iterdir() if p.name[0].isdigit())
            if done >= kill_at_blocks:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
        time.sleep(0.2)
    out, err = proc.communicate()
    return {"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak, "returncode": proc.returncode,
            "killed": killed, "stdout": out.strip()[-2000:], "stderr": err.strip()[-2000:]}


def check_blocks(inp: Path, out: Path, budget: str, n: int, seed: int = 0) -> dict:
    """Recompute n random blocks here and compare them with the written output."""
    from rln_fast import distributed, io

    src = io.open_volume(inp)
    job = distributed.make_job(src, method="rln", device="cpu")
    core, tiles = distributed._plan(job, src.shape, None, budget)
    import zarr  # the output is read block by block, never whole

    arr = zarr.open_group(str(out), mode="r")["0"]
    worst = 0.0
    picked = random.Random(seed).sample(tiles, min(n, len(tiles)))
    for t in picked:
        mine = job.compute(src[t.outer])[t.inner].cpu().numpy()
        theirs = np.asarray(arr[t.core])
        worst = max(worst, float(np.abs(mine - theirs).max()))
    return {"blocks_checked": [list(t.index) for t in picked], "max_abs_diff": worst,
            "block": list(core), "n_blocks": len(tiles)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs=3, type=int, default=[128, 4096, 4096])
    ap.add_argument("--budget", default="1GB")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rln_fast_large"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--check-blocks", type=int, default=6)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    inp, out = a.work / "input.tif", a.work / "output.ome.zarr"
    shape = tuple(a.shape)
    t = time.perf_counter()
    if not inp.exists():
        make_input(inp, shape)
    gen_s = time.perf_counter() - t
    cmd = [sys.executable, "-m", "rln_fast.cli", "deconvolve", str(inp), str(out),
           "--memory-budget", a.budget, "--device", "cpu", "--no-progress"]
    env_threads = {"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}
    os.environ.update(env_threads)
    from rln_fast import distributed, io

    src = io.open_volume(inp)
    _, tiles = distributed._plan(distributed.make_job(src, method="rln", device="cpu"),
                                 src.shape, None, a.budget)
    record = out.with_name(out.name + ".blocks")
    first = run_command(cmd, kill_at_blocks=len(tiles) // 2, record=record)
    left = sum(1 for p in record.iterdir() if p.name[0].isdigit()) if record.is_dir() else 0
    second = run_command(cmd, kill_at_blocks=None, record=record)
    check = check_blocks(inp, out, a.budget, a.check_blocks)
    import torch

    from rln_fast.models.rln import RLN

    model_bytes = sum(v.numel() * v.element_size() for v in RLN.from_pretrained().state_dict().values())
    result = {
        "shape": shape, "input_bytes": inp.stat().st_size, "dtype": "uint16", "budget": a.budget,
        "host": platform.node(), "cpu": platform.processor(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "generate_input_s": gen_s,
        "blocks": len(tiles), "blocks_recorded_at_kill": left,
        "first_run_killed": first, "second_run": second,
        "output_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "peak_rss_gib": max(first["peak_rss_bytes"], second["peak_rss_bytes"]) / 2**30,
        "model_bytes": model_bytes, "resume_check": check,
    }
    dest = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"large_volume_{platform.node() or 'host'}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("first_run_killed", "second_run")},
                     indent=1))
    print("first run:", {k: first[k] for k in ("seconds", "peak_rss_bytes", "returncode", "killed")})
    print("second run:", {k: second[k] for k in ("seconds", "peak_rss_bytes", "returncode")},
          second["stdout"], second["stderr"][-500:])
    if not a.keep:
        inp.unlink()
        import shutil

        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
