"""GPU benchmark report: fused ops and RLN inference vs plain PyTorch (cuDNN) in one run, as JSON.

Run on a CUDA machine: python benchmarks/gpu_report.py --out benchmarks/results/gpu_<date>.json
Every comparison checks that the results agree before timing; times are medians of CUDA-event
timed repeats after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plain_rln import LAYERS, plain_copy, plain_layer  # noqa: E402

import rln_fast  # noqa: E402
from rln_fast import ops  # noqa: E402


def cuda_time(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def bench_layer(chans, cout, has_skip, shape, reps) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(1, c, *shape, device="cuda", generator=g) for c in chans]
    w = torch.randn(cout, sum(chans), 3, 3, 3, device="cuda", generator=g) * 0.2
    b = torch.randn(cout, device="cuda", generator=g)
    skip = torch.randn(1, 1, *shape, device="cuda", generator=g) if has_skip else None
    with torch.inference_mode():
        torch.backends.cudnn.allow_tf32 = False
        err = rel_err(ops.conv3d(xs, w, b, "softplus", skip), plain_layer(xs, w, b, skip))
        t_ours = cuda_time(lambda: ops.conv3d(xs, w, b, "softplus", skip), reps)
        t_fp32 = cuda_time(lambda: plain_layer(xs, w, b, skip), reps)
        torch.backends.cudnn.allow_tf32 = True
        t_tf32 = cuda_time(lambda: plain_layer(xs, w, b, skip), reps)
        torch.backends.cudnn.allow_tf32 = False
    flop = 2 * 27 * sum(chans) * cout * xs[0][0, 0].numel()
    return {"layer": f"{sum(chans)}->{cout}", "skip": has_skip, "rel_err_vs_cudnn_fp32": err,
            "ours_ms": t_ours * 1e3, "cudnn_fp32_ms": t_fp32 * 1e3, "cudnn_tf32_ms": t_tf32 * 1e3,
            "ratio_vs_fp32": t_fp32 / t_ours, "ratio_vs_tf32": t_tf32 / t_ours,
            "ours_tflops": flop / t_ours / 1e12}


def bench_layers(shape, reps):
    torch.backends.cudnn.benchmark = True
    rows = []
    for chans, cout, has_skip in LAYERS:
        row = bench_layer(chans, cout, has_skip, shape, reps)
        rows.append(row)
        print(f"  conv3d {row['layer']:>6}: ours {row['ours_ms']:7.2f} ms  cuDNN fp32 {row['cudnn_fp32_ms']:7.2f} ms "
              f"({row['ratio_vs_fp32']:.2f}x)  tf32 {row['cudnn_tf32_ms']:7.2f} ms ({row['ratio_vs_tf32']:.2f}x)  "
              f"{row['ours_tflops']:.1f} TFLOP/s  err {row['rel_err_vs_cudnn_fp32']:.1e}", flush=True)
        torch.cuda.empty_cache()
    return rows


def _load_rln(checkpoint):
    from rln_fast.models.rln import RLN
    if checkpoint and Path(str(checkpoint) + ".index").exists():
        return RLN.from_official_checkpoint(checkpoint), "official checkpoint"
    torch.manual_seed(0)
    return RLN(), "random initialisation (official checkpoint not found)"


def _gvox(out, vox):
    for k in ("fused", "plain_eager", "plain_eager_tf32", "plain_compile"):
        if f"{k}_ms" in out:
            out[f"{k}_gvox_per_s"] = vox / (out[f"{k}_ms"] / 1e3) / 1e9


def bench_rln(shape, reps, checkpoint):
    model, weights = _load_rln(checkpoint)
    fused_cpu = model.eval().fuse()
    out = {"shape": list(shape), "weights": weights}
    # Same output as the CPU path, on a small volume.
    small = torch.rand(1, 1, 24, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref_cpu = fused_cpu(small)
        gpu_model = model.to("cuda")
        fused = gpu_model.fuse()
        plain = plain_copy(gpu_model)
        out["small_rel_err_gpu_vs_cpu"] = rel_err(fused(small.cuda()).cpu(), ref_cpu)
        x = torch.rand(1, 1, *shape, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
        vox = x.numel()
        torch.backends.cudnn.allow_tf32 = False
        out["rel_err_fused_vs_plain"] = rel_err(fused(x), plain(x))
        torch.cuda.empty_cache()

        def peak(fn):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / vox

        out["fused_ms"] = cuda_time(lambda: fused(x), reps) * 1e3
        out["fused_peak_bytes_per_voxel"] = peak(lambda: fused(x))
        out["plain_eager_ms"] = cuda_time(lambda: plain(x), max(3, reps // 4)) * 1e3
        out["plain_eager_peak_bytes_per_voxel"] = peak(lambda: plain(x))
        torch.backends.cudnn.allow_tf32 = True
        out["plain_eager_tf32_ms"] = cuda_time(lambda: plain(x), max(3, reps // 4)) * 1e3
        torch.backends.cudnn.allow_tf32 = False
    _gvox(out, vox)
    out["ratio_vs_plain_eager"] = out["plain_eager_ms"] / out["fused_ms"]
    print("  RLN " + json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in out.items()}), flush=True)
    return out


def bench_rln_compile(shape, reps, checkpoint, fused_ms):
    """torch.compile of the plain RLN (default mode), timed after compiling once."""
    model, _ = _load_rln(checkpoint)
    plain = plain_copy(model.eval().to("cuda"))
    x = torch.rand(1, 1, *shape, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    compiled = torch.compile(lambda t: plain(t))
    with torch.inference_mode():
        compiled(x)
        out = {"plain_compile_seconds_to_compile": time.perf_counter() - t0,
               "plain_compile_ms": cuda_time(lambda: compiled(x), max(3, reps // 4)) * 1e3}
    _gvox(out, x.numel())
    out["ratio_vs_plain_compile"] = out["plain_compile_ms"] / fused_ms
    print("  RLN compile " + json.dumps({k: float(f"{v:.4g}") for k, v in out.items()}), flush=True)
    return out


def _plain_torch_rl(img, otf, n):
    """What users write today: periodic RL with torch.fft, no fusion."""
    x = torch.full_like(img, float(img.mean()))
    for _ in range(n):
        blurred = torch.fft.irfftn(torch.fft.rfftn(x) * otf, s=img.shape)
        ratio = img / blurred.clamp_min(1e-6)
        x = x * torch.fft.irfftn(torch.fft.rfftn(ratio) * otf.conj(), s=img.shape)
    return x


def _cupy_rl(img, otf, n):
    import cupy as cp

    x = cp.full_like(img, float(img.mean()))
    for _ in range(n):
        blurred = cp.fft.irfftn(cp.fft.rfftn(x) * otf, s=img.shape)
        ratio = img / cp.maximum(blurred, 1e-6)
        x = x * cp.fft.irfftn(cp.fft.rfftn(ratio) * otf.conj(), s=img.shape)
    return x


def bench_rl(shapes, reps):
    """One periodic RL iteration vs its four FFTs alone, plain torch and CuPy; peak memory."""
    from rln_fast import psf as psf_models
    from rln_fast.rl import richardson_lucy

    psf = psf_models.gaussian((15, 31, 31), sigma=(2.0, 1.0, 1.0))
    rows = []
    for shape in shapes:
        row = _bench_rl_shape(shape, psf, reps, richardson_lucy)
        print("  RL " + json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v)
                                     for k, v in row.items()}), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def _bench_rl_shape(shape, psf, reps, richardson_lucy) -> dict:
    """One shape; its volumes are freed when this returns."""
    g = torch.Generator(device="cuda").manual_seed(0)
    img = torch.rand(shape, device="cuda", generator=g) + 0.5
    vox = img.numel()
    k = torch.zeros(shape, device="cuda")
    c = [s // 2 for s in psf.shape]
    k[: psf.shape[0], : psf.shape[1], : psf.shape[2]] = torch.from_numpy(psf).cuda()
    k = torch.roll(k, shifts=[-x for x in c], dims=(0, 1, 2))
    otf = torch.fft.rfftn(k)
    del k

    def ours(n):
        return richardson_lucy(img, psf, n, edges="periodic", acceleration=None, background=0,
                               progress=False)

    with torch.inference_mode():
        err = rel_err(ours(3), _plain_torch_rl(img, otf, 3))

        def four_ffts():
            a = torch.fft.irfftn(torch.fft.rfftn(img) * otf, s=shape)
            return torch.fft.irfftn(torch.fft.rfftn(a) * otf, s=shape)

        t_fft = cuda_time(four_ffts, reps)
        n = 6
        t_ours = (cuda_time(lambda: ours(n + 1), 3) - cuda_time(lambda: ours(1), 3)) / n
        t_plain = (cuda_time(lambda: _plain_torch_rl(img, otf, n + 1), 3)
                   - cuda_time(lambda: _plain_torch_rl(img, otf, 1), 3)) / n
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ours(2)
        torch.cuda.synchronize()
        peak_ours = (torch.cuda.max_memory_allocated() - base) / vox
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _plain_torch_rl(img, otf, 2)
        torch.cuda.synchronize()
        peak_plain = (torch.cuda.max_memory_allocated() - base) / vox
    row = {"shape": list(shape), "psf": list(psf.shape), "rel_err_vs_plain_torch": err,
           "four_ffts_ms": t_fft * 1e3, "ours_ms_per_iter": t_ours * 1e3,
           "plain_torch_ms_per_iter": t_plain * 1e3, "ours_over_four_ffts": t_ours / t_fft,
           "plain_over_four_ffts": t_plain / t_fft, "ratio_vs_plain_torch": t_plain / t_ours,
           "ours_peak_bytes_per_voxel": peak_ours, "plain_peak_bytes_per_voxel": peak_plain}
    try:
        import cupy as cp

        torch.cuda.empty_cache()
        ci, co = cp.from_dlpack(img), cp.from_dlpack(otf)
        cp_time = (cuda_time(lambda: _cupy_rl(ci, co, n + 1), 3)
                   - cuda_time(lambda: _cupy_rl(ci, co, 1), 3)) / n
        row["cupy_ms_per_iter"] = cp_time * 1e3
        row["ratio_vs_cupy"] = cp_time / t_ours
        cp.get_default_memory_pool().free_all_blocks()
    except Exception as e:  # CuPy missing or out of memory: say so in the report
        row["cupy_error"] = f"{type(e).__name__}: {e}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 512, 512))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--checkpoint", default="_local/official_rln/model.ckpt")
    ap.add_argument("--skip", nargs="*", default=[], choices=["layers", "rln", "compile", "rl"])
    ap.add_argument("--rl-shapes", default="128x1024x1024,256x2048x2048")
    ap.add_argument("--fused-ms", type=float, default=None,
                    help="fused RLN time of an earlier run, for the compile baseline's ratio when --skip rln")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_report.py needs a CUDA GPU")
    report = {"backend": rln_fast.backend_info(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "shape": list(args.shape)}
    if "layers" not in args.skip:
        print("conv3d layers (fp32):", flush=True)
        report["conv3d_layers"] = bench_layers(tuple(args.shape), args.reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every section, so a run cut short still leaves its numbers
        args.out.write_text(json.dumps(report, indent=2))

    if "layers" not in args.skip:
        save()
    if "rln" not in args.skip:
        print("RLN inference:", flush=True)
        report["rln_inference"] = bench_rln(tuple(args.shape), args.reps, args.checkpoint, False)
        save()
    if "rl" not in args.skip:
        print("Richardson-Lucy (FFT, periodic):", flush=True)
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.rl_shapes.split(",")]
        report["richardson_lucy"] = bench_rl(shapes, args.reps)
        save()
    if "compile" not in args.skip:
        fused_ms = report["rln_inference"]["fused_ms"] if "rln_inference" in report else args.fused_ms
        if fused_ms is None:
            sys.exit("the compile baseline needs the fused time: run the rln section or pass --fused-ms")
        print("RLN plain torch.compile baseline:", flush=True)
        report.setdefault("rln_inference", {}).update(
            bench_rln_compile(tuple(args.shape), args.reps, args.checkpoint, fused_ms))
        save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
