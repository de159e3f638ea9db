"""Evaluates a trained RLN against Richardson-Lucy on held-out phantoms and shows it on the DAPI stack.

Usage: python scripts/evaluate_default_model.py MODEL.pt OUT_DIR [--dapi PATH]
Writes OUT_DIR/evaluation.json (PSNR and SSIM per phantom, RL at its best iteration count)
and OUT_DIR/dapi.png (input / RL / RLN: middle slice and maximum projection).
Both methods are scored after a least-squares affine fit to the ground truth (their units
differ), PSNR over the truth's range, SSIM by skimage.metrics.structural_similarity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rln_fast import psf as psf_models
from rln_fast import rl, synth
from rln_fast.deconvolve import rln_deconvolve
from rln_fast.models.rln import RLN

VOXEL_SIZE = (0.3, 0.13, 0.13)
PSF_ARGS = {"na": 1.45, "wavelength": 0.461, "ni": 1.512}
PSF_SHAPE = (33, 65, 65)
HELD_OUT_SEEDS = [900_001 + i for i in range(8)]  # training used seeds < 1000 and 1_000_000+
RL_ITERATIONS = [10, 20, 40, 80, 120, 200, 300]


def _fit(x: np.ndarray, gt: np.ndarray) -> np.ndarray:
    a = np.vstack([x.ravel(), np.ones(x.size)]).T.astype(np.float64)
    coef = np.linalg.lstsq(a, gt.ravel().astype(np.float64), rcond=None)[0]
    return (x * coef[0] + coef[1]).astype(np.float64)


def scores(x: np.ndarray, gt: np.ndarray) -> dict:
    from skimage.metrics import structural_similarity

    f, g = _fit(x, gt), gt.astype(np.float64)
    rng = float(g.max() - g.min())
    return {"psnr": float(10 * np.log10(rng ** 2 / np.mean((f - g) ** 2))),
            "ssim": float(structural_similarity(f, g, data_range=rng))}


def _panel(vol: np.ndarray) -> np.ndarray:
    sl, mip = vol[vol.shape[0] // 2], vol.max(axis=0)
    out = []
    for a in (sl, mip):
        lo, hi = np.percentile(a, [0.5, 99.8])
        out.append(np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1))
    return np.concatenate(out, axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out_dir")
    ap.add_argument("--dapi", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "deconwolf" / "dapi_001.tif"))
    ap.add_argument("--phantoms", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = RLN.load(args.model)
    psf = psf_models.born_wolf(PSF_SHAPE, VOXEL_SIZE, **PSF_ARGS)
    rows = []
    for seed in HELD_OUT_SEEDS[: args.phantoms]:
        gt, raw = synth.phantom_pair(psf, (128, 128, 128), seed=seed)
        # One plain RL run, scored at each listed iteration count through the callback.
        rl_scores = {}

        def score_at(i, estimate, gt=gt, rl_scores=rl_scores):
            if i in RL_ITERATIONS:
                rl_scores[i] = scores(estimate.cpu().numpy(), gt)

        rl.richardson_lucy(raw, psf, max(RL_ITERATIONS), acceleration=None, edges="periodic", background=0,
                           progress=False,
                           callback=score_at)
        best_psnr = max(rl_scores.items(), key=lambda kv: kv[1]["psnr"])
        best_ssim = max(rl_scores.items(), key=lambda kv: kv[1]["ssim"])
        rln = scores(rln_deconvolve(raw, model, progress=False), gt)
        rows.append({"seed": seed, "rln": rln,
                     "rl_best_psnr": {"iterations": best_psnr[0], **best_psnr[1]},
                     "rl_best_ssim": {"iterations": best_ssim[0], **best_ssim[1]},
                     "input": scores(raw, gt)})
        print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for m in ("input", "rl_best_psnr", "rl_best_ssim", "rln"):
        summary[m] = {k: float(np.mean([r[m][k] for r in rows])) for k in ("psnr", "ssim")}
    summary["rln_beats_rl_psnr"] = sum(r["rln"]["psnr"] > r["rl_best_psnr"]["psnr"] for r in rows)
    summary["rln_beats_rl_ssim"] = sum(r["rln"]["ssim"] > r["rl_best_ssim"]["ssim"] for r in rows)
    result = {"model": str(args.model), "metadata": model.metadata, "phantoms": rows, "mean": summary}
    dapi = Path(args.dapi)
    if dapi.is_file():
        import tifffile
        from PIL import Image

        vol = tifffile.imread(dapi).astype(np.float32)
        dpsf = psf_models.born_wolf(PSF_SHAPE, VOXEL_SIZE, **PSF_ARGS)
        rl20 = rl.richardson_lucy(vol, dpsf, 20, progress=False)
        rln = rln_deconvolve(vol, model, progress=False)
        grid = np.concatenate([_panel(v) for v in (vol, rl20, rln)], axis=1)
        Image.fromarray((grid * 255).astype(np.uint8)).save(out / "dapi.png")
        result["dapi"] = {"file": dapi.name, "shape": list(vol.shape), "rl_iterations": 20,
                          "panels": "columns: input, RL (20 it.), RLN; rows: middle slice, max projection"}
    (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
