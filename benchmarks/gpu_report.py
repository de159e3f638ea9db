"""GPU report: every GPU target of rln_fast measured side by side in one run, as one JSON.

On a CUDA machine (benchmarks/gpu_check.sh calls it):
    python benchmarks/gpu_report.py --out DIR
CPU smoke mode, tiny sizes, the same JSON keys (the test suite runs it, so a broken argument,
path or key fails CI on machines without a GPU):
    python benchmarks/gpu_report.py --smoke --out DIR

Sections, in order (--skip drops some; compile is optional and last):
  layers       each fused RLN conv layer vs cuDNN fp32 and TF32
  rln          FusedRLN vs plain PyTorch eager fp32 and TF32 (time, Gvox/s, peak bytes/voxel)
  deconvolve   rln_deconvolve on a large volume (time, Gvox/s, peak bytes/voxel, max error vs
               the CPU result on a crop)
  rl           one Richardson-Lucy iteration: default path (Bertero + scaled heavy ball, auto background) and periodic path
               vs its four FFTs, plain torch and CuPy (skipped with a reason when absent)
  train        one training step (forward + loss + backward + Adam) vs plain PyTorch fp32, TF32
  profile      where the time goes: FusedRLN as one z-slab vs its slabs (time, peak), and the
               top kernels (torch.profiler) of one FusedRLN forward and of 4 periodic RL iterations
  compile      torch.compile of the plain RLN, fp32 and TF32, vs FusedRLN

The RLN weights are the official checkpoint (default ../shared/official_rln/model.ckpt beside
the checkout, where gpu_check.sh puts it); a missing checkpoint is an error unless
--random-weights is given. Every comparison checks that the results agree before timing;
every failure exits non-zero. Times are medians after warm-up (CUDA events on the GPU).
The JSON is rewritten after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from plain_rln import LAYERS, plain_copy, plain_layer  # noqa: E402

import rln_fast  # noqa: E402
from rln_fast import ops  # noqa: E402

SECTIONS = ("layers", "rln", "deconvolve", "rl", "train", "profile", "compile")
DEFAULT_CHECKPOINT = ROOT.parent / "shared" / "official_rln" / "model.ckpt"

# Sizes of the GPU run (the targets) and of the CPU smoke run.
FULL = {"shape": (128, 512, 512), "deconvolve_shape": (256, 1024, 1024), "crop": (48, 96, 96),
        "rl_shapes": "128x1024x1024,256x2048x2048", "psf": (15, 31, 31), "reps": 20,
        "train_batch": 4, "train_crop": 64}
SMOKE = {"shape": (8, 24, 40), "deconvolve_shape": (20, 48, 40), "crop": (6, 12, 10),
         "rl_shapes": "16x32x32,12x40x24", "psf": (5, 7, 7), "reps": 2,
         "train_batch": 2, "train_crop": 16}


class Mismatch(RuntimeError):
    """Ours and a baseline disagree: timing them would compare different results."""


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds per call: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def peak_bytes(fn, device: torch.device) -> float | None:
    """Extra memory fn needs at its peak, in bytes: the CUDA allocator's high-water mark on the
    GPU; on the CPU the process's peak RSS after a reset (Linux; None where it cannot be read)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _proc_status_kib("VmRSS")
        fn()
        return float(max(0, _proc_status_kib("VmHWM") - base) * 1024)
    except OSError:
        return None


def per_voxel(nbytes: float | None, vox: int) -> float | None:
    return None if nbytes is None else nbytes / vox


@contextlib.contextmanager
def tf32(on: bool):
    """TF32 for cuDNN convs and matmuls on (True) or off; no effect on the CPU."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def require_close(what: str, err: float, tol: float) -> float:
    if not err <= tol:  # also catches NaN
        raise Mismatch(f"{what}: relative error {err:.3g} exceeds {tol:g}")
    return err


def _rounded(d: dict) -> str:
    return json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in d.items()})


def _gvox(vox: int, ms: float) -> float:
    return vox / (ms / 1e3) / 1e9


# ----------------------------------------------------------------------------- sections


def bench_layer(chans, cout, has_skip, shape, reps, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(1, c, *shape, device=device, generator=g) for c in chans]
    w = torch.randn(cout, sum(chans), 3, 3, 3, device=device, generator=g) * 0.2
    b = torch.randn(cout, device=device, generator=g)
    skip = torch.randn(1, 1, *shape, device=device, generator=g) if has_skip else None
    with torch.inference_mode():
        with tf32(False):
            err = require_close(f"conv3d {sum(chans)}->{cout}", rel_err(
                ops.conv3d(xs, w, b, "softplus", skip), plain_layer(xs, w, b, skip)), 1e-4)
            t_ours = timeit(lambda: ops.conv3d(xs, w, b, "softplus", skip), device, reps)
            t_fp32 = timeit(lambda: plain_layer(xs, w, b, skip), device, reps)
        with tf32(True):
            t_tf32 = timeit(lambda: plain_layer(xs, w, b, skip), device, reps)
    flop = 2 * 27 * sum(chans) * cout * xs[0][0, 0].numel()
    return {"layer": f"{sum(chans)}->{cout}", "skip": has_skip, "rel_err_vs_cudnn_fp32": err,
            "ours_ms": t_ours * 1e3, "cudnn_fp32_ms": t_fp32 * 1e3, "cudnn_tf32_ms": t_tf32 * 1e3,
            "ratio_vs_fp32": t_fp32 / t_ours, "ratio_vs_tf32": t_tf32 / t_ours,
            "ours_tflops": flop / t_ours / 1e12}


def bench_layers(shape, reps, device) -> list[dict]:
    torch.backends.cudnn.benchmark = True
    rows = []
    for chans, cout, has_skip in LAYERS:
        row = bench_layer(chans, cout, has_skip, shape, reps, device)
        rows.append(row)
        print(f"  conv3d {row['layer']:>6}: ours {row['ours_ms']:8.3f} ms  fp32 {row['cudnn_fp32_ms']:8.3f} ms "
              f"({row['ratio_vs_fp32']:.2f}x)  tf32 {row['cudnn_tf32_ms']:8.3f} ms ({row['ratio_vs_tf32']:.2f}x)  "
              f"err {row['rel_err_vs_cudnn_fp32']:.1e}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def load_rln(checkpoint: Path | None, random_weights: bool):
    """The official RLN, or (only with random_weights) a seeded random one; never silently."""
    from rln_fast.models.rln import RLN

    if random_weights:
        torch.manual_seed(0)
        return RLN(), "random initialisation (--random-weights)"
    if checkpoint is None or not Path(str(checkpoint) + ".index").is_file():
        raise FileNotFoundError(
            f"gpu_report.py: the official checkpoint {checkpoint}(.index) is missing; pass "
            "--checkpoint PREFIX, or --random-weights to time random weights on purpose")
    return RLN.from_official_checkpoint(checkpoint), f"official checkpoint {checkpoint}"


def bench_rln(model, shape, reps, device) -> dict:
    """FusedRLN vs the plain eager RLN, fp32 and TF32; and the device result vs the CPU one."""
    fused_cpu = model.eval().fuse()
    out: dict = {"shape": list(shape)}
    small = torch.rand(1, 1, 12, 20, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref_cpu = fused_cpu(small)
        dev_model = model.to(device)
        fused = dev_model.fuse()
        plain = plain_copy(dev_model)
        out["small_rel_err_device_vs_cpu"] = require_close(
            "FusedRLN device vs CPU", rel_err(fused(small.to(device)), ref_cpu), 1e-4)
        x = torch.rand(1, 1, *shape, device=device, generator=torch.Generator(device).manual_seed(2))
        vox = x.numel()
        with tf32(False):
            out["rel_err_fused_vs_plain"] = require_close("FusedRLN vs plain RLN",
                                                          rel_err(fused(x), plain(x)), 1e-4)
            out["fused_ms"] = timeit(lambda: fused(x), device, reps) * 1e3
            out["fused_peak_bytes_per_voxel"] = per_voxel(peak_bytes(lambda: fused(x), device), vox)
            out["plain_eager_ms"] = timeit(lambda: plain(x), device, max(2, reps // 4)) * 1e3
            out["plain_eager_peak_bytes_per_voxel"] = per_voxel(peak_bytes(lambda: plain(x), device), vox)
        with tf32(True):
            out["plain_eager_tf32_ms"] = timeit(lambda: plain(x), device, max(2, reps // 4)) * 1e3
    for k in ("fused", "plain_eager", "plain_eager_tf32"):
        out[f"{k}_gvox_per_s"] = _gvox(vox, out[f"{k}_ms"])
    out["ratio_vs_plain_eager"] = out["plain_eager_ms"] / out["fused_ms"]
    out["ratio_vs_plain_eager_tf32"] = out["plain_eager_tf32_ms"] / out["fused_ms"]
    print("  RLN " + _rounded(out), flush=True)
    model.to("cpu")
    return out


def bench_deconvolve(model, shape, crop, device) -> dict:
    """rln_deconvolve of one large volume on the device; a crop checked against the CPU."""
    from rln_fast.deconvolve import rln_deconvolve
    from rln_fast.tiling import RLN_HALO

    fused = model.eval().fuse().to(device)
    vol = torch.rand(*shape, device=device, generator=torch.Generator(device).manual_seed(3))
    vox = vol.numel()

    def run():
        # vol is freed by the `del` below, after its last use here.
        return rln_deconvolve(vol, fused, normalize=None, device=device, progress=False)  # noqa: F821

    y = run()  # warm-up, and the result checked below
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_bytes(run, device)
    # The crop's core sits at even offsets away from the border; with RLN_HALO voxels of context
    # on every side its output is the whole volume's (module tiling).
    lo = [max(0, (s - c) // 2) // 2 * 2 for s, c in zip(shape, crop, strict=True)]
    core = tuple(slice(a, a + c) for a, c in zip(lo, crop, strict=True))
    ctx = tuple(slice(max(0, a - RLN_HALO), min(s, a + c + RLN_HALO)) for a, c, s in zip(lo, crop, shape, strict=True))
    inner = tuple(slice(k.start - o.start, k.stop - o.start) for k, o in zip(core, ctx, strict=True))
    ref = rln_deconvolve(vol[ctx].cpu(), model.eval().fuse(), normalize=None, device="cpu",
                         progress=False)[inner]
    got = y[core].cpu()
    err = float((got.double() - ref.double()).abs().max())
    out = {"shape": list(shape), "seconds": seconds, "gvox_per_s": vox / seconds / 1e9,
           "peak_bytes_per_voxel": per_voxel(peak, vox), "crop": list(crop),
           "crop_max_abs_err_vs_cpu": err,
           "crop_rel_err_vs_cpu": require_close("rln_deconvolve crop vs CPU", rel_err(got, ref), 1e-4)}
    print("  rln_deconvolve " + _rounded(out), flush=True)
    del y, vol
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _cupy_rl(img, otf, n):
    import cupy as cp

    x = cp.full_like(img, float(img.mean()))
    for _ in range(n):
        blurred = cp.fft.irfftn(cp.fft.rfftn(x) * otf, s=img.shape)
        x = x * cp.fft.irfftn(cp.fft.rfftn(img / blurred) * otf.conj(), s=img.shape)
    return x


def _per_iter(run, device, n=4) -> float:
    """Seconds per RL iteration: (time of n + 1 iterations - time of 1) / n."""
    return (timeit(lambda: run(n + 1), device, 2) - timeit(lambda: run(1), device, 2)) / n


def bench_rl_shape(shape, psf_np, reps, device) -> dict:
    from rln_fast.bench import plain_rl_periodic
    from rln_fast.rl import richardson_lucy

    g = torch.Generator(device=device).manual_seed(0)
    img = torch.rand(shape, device=device, generator=g) + 0.5
    vox = img.numel()
    psf = torch.from_numpy(psf_np).to(device)
    k = torch.zeros(shape, device=device)
    k[tuple(slice(0, n) for n in psf.shape)] = psf
    otf = torch.fft.rfftn(torch.roll(k, [-(n // 2) for n in psf.shape], (0, 1, 2)))
    del k

    def periodic(n):
        return richardson_lucy(img, psf_np, n, edges="periodic", acceleration=None, background=0,
                               progress=False)

    def default(n):  # edges="bertero", acceleration="shb", background="auto"
        return richardson_lucy(img, psf_np, n, progress=False)

    def plain(n):
        return plain_rl_periodic(img, None, n, otf=otf)

    def four_ffts():
        a = torch.fft.irfftn(torch.fft.rfftn(img) * otf, s=shape)
        return torch.fft.irfftn(torch.fft.rfftn(a) * otf, s=shape)

    row: dict = {"shape": list(shape), "psf": list(psf.shape)}
    with torch.inference_mode():
        row["rel_err_periodic_vs_plain_torch"] = require_close(
            f"RL periodic {shape} vs plain torch", rel_err(periodic(3), plain(3)), 1e-3)
        t_fft = timeit(four_ffts, device, reps)
        t_periodic, t_default, t_plain = _per_iter(periodic, device), _per_iter(default, device), _per_iter(plain, device)
        row.update({
            "four_ffts_ms": t_fft * 1e3,
            "periodic_ms_per_iter": t_periodic * 1e3, "default_ms_per_iter": t_default * 1e3,
            "plain_torch_ms_per_iter": t_plain * 1e3,
            "periodic_over_four_ffts": t_periodic / t_fft, "default_over_four_ffts": t_default / t_fft,
            "plain_over_four_ffts": t_plain / t_fft, "ratio_vs_plain_torch": t_plain / t_periodic,
            "periodic_peak_bytes_per_voxel": per_voxel(peak_bytes(lambda: periodic(2), device), vox),
            "default_peak_bytes_per_voxel": per_voxel(peak_bytes(lambda: default(2), device), vox),
            "plain_peak_bytes_per_voxel": per_voxel(peak_bytes(lambda: plain(2), device), vox),
        })
    row.update({"cupy_ms_per_iter": None, "ratio_vs_cupy": None, "cupy_skipped": None})
    if device.type != "cuda":
        row["cupy_skipped"] = "CuPy runs on CUDA only"
    else:
        try:
            import cupy as cp
        except ImportError as e:
            row["cupy_skipped"] = f"CuPy is not installed ({e})"
        else:
            torch.cuda.empty_cache()
            ci, co = cp.from_dlpack(img), cp.from_dlpack(otf)
            t_cp = _per_iter(lambda n: _cupy_rl(ci, co, n), device)
            row["cupy_ms_per_iter"], row["ratio_vs_cupy"] = t_cp * 1e3, t_cp / t_periodic
            del ci, co
            cp.get_default_memory_pool().free_all_blocks()
    return row


def bench_rl(shapes, psf_shape, reps, device) -> list[dict]:
    from rln_fast import psf as psf_models

    psf = psf_models.gaussian(psf_shape, sigma=(2.0, 1.0, 1.0))
    rows = []
    for shape in shapes:
        row = bench_rl_shape(shape, psf, reps, device)
        print("  RL " + _rounded(row), flush=True)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_train(batch: int, crop: int, reps: int, device) -> dict:
    """One training step of the rln_fast RLN vs the plain PyTorch RLN (fp32 and TF32)."""
    from benchmarks.bench_train import _check_agree, _models, _stepper
    from rln_fast.train import TrainConfig, _Stream, _to_device, _Volumes

    c = TrainConfig(n_volumes=1, n_val=0, crop=(crop,) * 3, batch_size=batch, device=str(device))
    x, gt = _to_device(*_Stream(c, _Volumes(c)).next_batch(), c, device)
    ours, plain = _models(str(device))
    with tf32(False):
        loss = _check_agree(ours, plain, x, gt)  # raises AssertionError when they differ
        t_ours = timeit(_stepper(ours, x, gt, lambda t: ours(t, return_intermediates=True)), device, reps)
        t_plain = timeit(_stepper(plain, x, gt, lambda t: plain(t, return_intermediates=True)), device, reps)
    with tf32(True):
        t_tf32 = timeit(_stepper(plain, x, gt, lambda t: plain(t, return_intermediates=True)), device, reps)
    out = {"shape": [batch, 1, crop, crop, crop], "loss_checked": loss, "ours_ms": t_ours * 1e3,
           "plain_fp32_ms": t_plain * 1e3, "plain_tf32_ms": t_tf32 * 1e3,
           "ratio_vs_plain_fp32": t_plain / t_ours, "ratio_vs_plain_tf32": t_tf32 / t_ours}
    print("  train step " + _rounded(out), flush=True)
    return out


def _top_kernels(fn, device, top: int = 10) -> list[dict]:
    """The `top` operators (CUDA: kernels) by their own time over one call of fn, from
    torch.profiler: name, calls, total ms."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm-up: cuFFT plans, allocator
    sync(device)
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    rows = []
    for e in prof.key_averages():
        us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
              if device.type == "cuda" else e.self_cpu_time_total)
        if us > 0:
            rows.append({"name": e.key[:120], "calls": int(e.count), "ms": us / 1e3})
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def _spectrum_mul_ms(img: torch.Tensor, reps: int, device) -> dict:
    """The RL job multiplies each spectrum by a real OTF off the CPU (half the OTF's memory),
    and torch then casts the real operand per element. The same in-place product three ways,
    each checked against the out-of-place complex one first."""
    spec = torch.fft.rfftn(img)
    otf = torch.rand(spec.shape, device=device, generator=torch.Generator(device).manual_seed(3))
    otf_c = otf.to(spec.dtype)
    want = spec * otf_c
    ways = {"real_otf": lambda: spec.mul_(otf), "complex_otf": lambda: spec.mul_(otf_c),
            "view_as_real": lambda: torch.view_as_real(spec).mul_(otf.unsqueeze(-1))}
    out = {}
    for name, fn in ways.items():
        spec.copy_(want / otf_c)
        fn()
        require_close(f"spectrum product ({name})",
                      rel_err(torch.view_as_real(spec), torch.view_as_real(want)), 1e-5)
        out[name] = timeit(fn, device, reps) * 1e3
    return out


def bench_profile(model, shape, rl_shape, psf_shape, reps, device) -> dict:
    """Where the time goes, for the next round of kernel work: FusedRLN as one z-slab against
    its default slabs (time, peak), and the top kernels of one FusedRLN forward and of one
    periodic RL run of 4 iterations (set-up included)."""
    from rln_fast import psf as psf_models
    from rln_fast.models.rln import FusedRLN
    from rln_fast.rl import richardson_lucy

    psf_np = psf_models.gaussian(psf_shape, sigma=(2.0, 1.0, 1.0))  # bench_rl's PSF
    out: dict = {"shape": list(shape), "rl_shape": list(rl_shape)}
    with torch.inference_mode():
        fused = model.to(device).eval().fuse()
        x = torch.rand(1, 1, *shape, device=device, generator=torch.Generator(device).manual_seed(2))
        vox = x.numel()
        with tf32(False):
            sliced = fused(x)
            out["fused_slabs"] = len(FusedRLN._slabs(shape[0], shape[1] * shape[2]))
            out["fused_ms"] = timeit(lambda: fused(x), device, reps) * 1e3
            old = FusedRLN._MIN_SLAB_VOXELS
            FusedRLN._MIN_SLAB_VOXELS = 1 << 62  # one slab, whatever the size
            try:
                out["fused_one_slab_rel_err"] = require_close("FusedRLN one slab vs slabs",
                                                              rel_err(fused(x), sliced), 1e-6)
                out["fused_one_slab_ms"] = timeit(lambda: fused(x), device, reps) * 1e3
                out["fused_one_slab_peak_bytes_per_voxel"] = per_voxel(
                    peak_bytes(lambda: fused(x), device), vox)
            finally:
                FusedRLN._MIN_SLAB_VOXELS = old
            del sliced
            out["fused_top_kernels"] = _top_kernels(lambda: fused(x), device)
        x = None  # the volume goes before the RL run's
        g = torch.Generator(device=device).manual_seed(0)
        img = torch.rand(rl_shape, device=device, generator=g) + 0.5
        out["rl_periodic_top_kernels"] = _top_kernels(
            lambda: richardson_lucy(img, psf_np, 4, edges="periodic", acceleration=None, background=0,
                                    progress=False), device)
        out["spectrum_mul_ms"] = _spectrum_mul_ms(img, reps, device)
    model.to("cpu")
    print("  profile " + _rounded({k: v for k, v in out.items() if not k.endswith("kernels")}), flush=True)
    for k in ("fused_top_kernels", "rl_periodic_top_kernels"):
        print(f"  {k}: " + "; ".join(f"{r['name'][:60]} x{r['calls']} {r['ms']:.3g} ms"
                                    for r in out[k][:6]), flush=True)
    return out


def bench_compile(model, shape, reps, device, fused_ms: float, backend: str) -> dict:
    """torch.compile of the plain RLN, fp32 and TF32, timed after compiling once each."""
    plain = plain_copy(model.eval().to(device))
    x = torch.rand(1, 1, *shape, device=device, generator=torch.Generator(device).manual_seed(2))
    out: dict = {"compile_backend": backend}
    for name, on in (("plain_compile", False), ("plain_compile_tf32", True)):
        torch._dynamo.reset()
        with tf32(on), torch.inference_mode():
            compiled = torch.compile(plain, backend=backend)
            t0 = time.perf_counter()
            y = compiled(x)
            sync(device)
            out[f"{name}_seconds_to_compile"] = time.perf_counter() - t0
            if not on:
                out["rel_err_compile_vs_eager"] = require_close("compiled vs eager RLN",
                                                                rel_err(y, plain(x)), 1e-4)
            out[f"{name}_ms"] = timeit(lambda c=compiled: c(x), device, max(2, reps // 4)) * 1e3
        out[f"{name}_gvox_per_s"] = _gvox(x.numel(), out[f"{name}_ms"])
        out[f"ratio_vs_{name}"] = out[f"{name}_ms"] / fused_ms
    print("  RLN compile " + _rounded(out), flush=True)
    model.to("cpu")
    return out


# ----------------------------------------------------------------------------- driver


def _shape(s: str) -> tuple[int, int, int]:
    try:
        t = tuple(int(v) for v in s.lower().split("x"))
    except ValueError:
        t = ()
    if len(t) != 3 or min(t) < 2:
        raise argparse.ArgumentTypeError(f"expected DxHxW with every side >= 2, got {s!r}")
    return t


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for gpu_report.json (created), or a path ending in .json")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke run at tiny sizes (same JSON keys); no GPU needed")
    ap.add_argument("--device", default=None, help="default: cpu with --smoke, else cuda")
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                    help="official checkpoint prefix (.../model.ckpt); default %(default)s")
    ap.add_argument("--random-weights", action="store_true",
                    help="time a seeded random RLN instead of the checkpoint (never implied)")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    ap.add_argument("--shape", type=_shape, default=None, help="RLN shape DxHxW")
    ap.add_argument("--deconvolve-shape", type=_shape, default=None)
    ap.add_argument("--rl-shapes", default=None, help="comma-separated DxHxW list")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (default inductor; eager, i.e. tracing only, with --smoke)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: torch's; 1 with --smoke, steady on a busy machine)")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    sizes = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("gpu_report.py: no CUDA GPU here; use --smoke for the CPU smoke run")
    if device.type == "cuda" and not rln_fast.backend_info()["cuda"]:
        raise RuntimeError("gpu_report.py: rln_fast._C was built without CUDA kernels; the report "
                           "would time the reference fallback")
    if "compile" not in args.skip and "rln" in args.skip:
        raise RuntimeError("gpu_report.py: the compile baseline needs the rln section "
                           "(its FusedRLN time); do not skip rln, or skip compile too")
    # fp32 everywhere unless a section asks for TF32 (tf32(True)): cuDNN's TF32 default would
    # make FusedRLN's one cuDNN layer and the plain baselines round differently.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    shape = args.shape or sizes["shape"]
    reps = args.reps or sizes["reps"]
    rl_shapes = [_shape(s) for s in (args.rl_shapes or sizes["rl_shapes"]).split(",")]
    out = args.out if args.out.suffix == ".json" else args.out / "gpu_report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    model, weights = load_rln(args.checkpoint, args.random_weights)
    report: dict = {
        "mode": "smoke" if args.smoke else "full", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "backend": rln_fast.backend_info(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "weights": weights,
        "tf32_effective": device.type == "cuda", "skipped": sorted(args.skip),
    }

    def save() -> None:  # after every section, so a run cut short still leaves its numbers
        out.write_text(json.dumps(report, indent=2))

    def section(name: str, fn) -> None:
        if name in args.skip:
            return
        print(f"{name}:", flush=True)
        t0 = time.perf_counter()
        report[name] = fn()
        report.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        save()

    save()
    section("layers", lambda: bench_layers(shape, reps, device))
    section("rln", lambda: bench_rln(model, shape, reps, device))
    section("deconvolve", lambda: bench_deconvolve(
        model, args.deconvolve_shape or sizes["deconvolve_shape"], sizes["crop"], device))
    section("rl", lambda: bench_rl(rl_shapes, sizes["psf"], reps, device))
    section("train", lambda: bench_train(sizes["train_batch"], sizes["train_crop"],
                                         max(2, reps // 4), device))
    section("profile", lambda: bench_profile(model, shape, rl_shapes[0], sizes["psf"], reps, device))
    if "compile" not in args.skip:
        backend = args.compile_backend or ("eager" if args.smoke else "inductor")
        section("compile", lambda: bench_compile(model, shape, reps, device,
                                                 report["rln"]["fused_ms"], backend))
    print(f"wrote {out}", flush=True)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except Exception as e:  # every failure is one line and a non-zero exit
        print(f"gpu_report.py failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if not isinstance(e, (FileNotFoundError, Mismatch)):
            import traceback

            traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
