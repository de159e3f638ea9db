"""Evaluates a trained RLN against Richardson-Lucy: held-out phantoms, semi-synthetic real structure, DAPI.

Usage: python scripts/evaluate_default_model.py MODEL.pt OUT_DIR [--data DIR] [--phantoms N]
       [--cache DIR] [--no-pictures] [--p-high P] [--ensemble 1|2|4|8]

Three evaluations, all with the default model's PSF (widefield Born-Wolf at the DAPI demo
stack's acquisition); none of their data is ever training data:

(a) phantoms: the official recipe (rln_fast.synth) with held-out seeds 900001+.
(b) semi-synthetic volumes whose truth is real structure: the truth is a real stack
    deconvolved (RL, then smoothed by a Gaussian so that it is band-limited and free of RL's
    noise) or flowdec's "bars" ground truth; it is re-blurred with the PSF (circular), a
    background of 20 photons and out-of-focus haze (the truth shifted sideways and heavily
    blurred, as from objects above and below) are added, and Poisson noise at about 400
    photons at the peak (150 for the dim volume) is drawn with a fixed seed.
(c) the DAPI stack itself, no truth: the background (input voxels below the input's 40th
    percentile) of each output, its mean and its 99.9th percentile as fractions of the
    nucleus level (the median of the voxels above the input's 90th percentile), all above the
    input's 0.01st percentile (the camera offset); and the re-blur residual
    ||a·(psf * out) + b - input|| / ||input - offset|| (reflect padding; a, b a least-squares
    fit, since RLN's output units are not the input's), against RL at 20 iterations.

(b) also reports (c)'s re-blur residual of the truth, RLN and RL-20 against the volume's input:
what the exact answer scores on that measure when the input holds noise and haze.

In (a) and (b) both methods are scored after a least-squares affine fit to the truth (their
units differ): PSNR over the truth's range, SSIM by skimage.metrics.structural_similarity.
RL is plain Richardson-Lucy with periodic edges (the simulations' own forward model), scored
at 10, 20, 40, 80, 120, 200 and 300 iterations; its best count per volume and per metric is
used. Each row of (a) and (b) also scores RLN and RL (at its best-PSNR count) inside the
object alone ("inside_object": truth above 0.2 of its maximum; the fit and PSNR over those
voxels, SSIM the mean of its map there), since the whole-volume scores weigh the background heavily.
Every row also keeps RL's scores at each count ("rl_by_iterations"), and (b) says, for each
count, on which volumes RLN beats RL run that many iterations ("rl_at_one_count": a user who
runs RL at one count for every volume, without the per-volume oracle; not a target).
RL's scores and the truths of (b) do not depend on the model: --cache DIR keeps them
between runs.
Writes OUT_DIR/evaluation.json and pictures OUT_DIR/dapi.png, OUT_DIR/semi_synthetic.png,
OUT_DIR/phantoms.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

# The model's PSF and the held-out seeds come from the training script, so that the two cannot
# drift apart (it refuses those seeds as training data).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default_model import EVALUATION_SEEDS, model_psf  # noqa: E402

from rln_fast import rl, synth  # noqa: E402
from rln_fast.deconvolve import norm_percentiles, rln_deconvolve  # noqa: E402
from rln_fast.models.rln import RLN  # noqa: E402

HELD_OUT_SEEDS = list(EVALUATION_SEEDS)
RL_ITERATIONS = [10, 20, 40, 80, 120, 200, 300]
# The object region of the scores "inside the object": the truth above this fraction of its
# maximum (the nucleus, the bars, the bead), without the background around it.
OBJECT_LEVEL = 0.2
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# (name, source, peak photons, background photons, haze fraction of the peak, noise seed)
SEMI_SYNTHETIC = [
    ("dapi_nucleus", "dapi", 400.0, 20.0, 0.15, 1),
    ("dapi_nucleus_dim", "dapi_flipped", 150.0, 20.0, 0.25, 2),
    ("flowdec_bars", "bars", 400.0, 20.0, 0.15, 3),
    ("flowdec_beads", "beads", 400.0, 20.0, 0.15, 4),
]


def evaluation_psf() -> np.ndarray:
    """The default model's PSF (``train_default_model.model_psf``) in float64, as every score here uses it."""
    return model_psf().astype(np.float64)


def _fit(x: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """a·x + b, float64, with a and b the least-squares fit to gt (over ``region`` if given)."""
    xs, gs = (x, gt) if region is None else (x[region], gt[region])
    a = np.vstack([xs.ravel(), np.ones(xs.size)]).T.astype(np.float64)
    coef = np.linalg.lstsq(a, gs.ravel().astype(np.float64), rcond=None)[0]
    return (x * coef[0] + coef[1]).astype(np.float64)


def scores(x: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> dict:
    """PSNR (dB, the truth's range) and SSIM of x against gt after the least-squares affine fit
    of x to gt; with ``region`` (a boolean mask), the fit, PSNR and the mean of SSIM's map over
    those voxels only."""
    from skimage.metrics import structural_similarity

    f, g = _fit(x, gt, region), gt.astype(np.float64)
    rng = float(g.max() - g.min())
    if region is None:
        return {"psnr": float(10 * np.log10(rng ** 2 / np.mean((f - g) ** 2))),
                "ssim": float(structural_similarity(f, g, data_range=rng))}
    _, ssim_map = structural_similarity(f, g, data_range=rng, full=True)
    return {"psnr": float(10 * np.log10(rng ** 2 / np.mean((f[region] - g[region]) ** 2))),
            "ssim": float(ssim_map[region].mean())}


def object_region(gt: np.ndarray) -> np.ndarray:
    """The object itself: the truth above OBJECT_LEVEL of its maximum."""
    return gt > OBJECT_LEVEL * gt.max()


def _circular_blur(vol: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """vol ⊛ psf (sum 1, centred), circular, float64: the forward model of rln_fast.synth."""
    kernel = np.fft.ifftshift(synth._align_psf(psf / psf.sum(), vol.shape))
    return np.fft.irfftn(np.fft.rfftn(vol.astype(np.float64)) * np.fft.rfftn(kernel), s=vol.shape, axes=(0, 1, 2))


def _reflect_blur(vol: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """vol * psf with the volume mirror-padded by the PSF's half size, cropped back."""
    from scipy.signal import fftconvolve

    pad = [(min(p // 2, n - 1),) * 2 for p, n in zip(psf.shape, vol.shape, strict=True)]
    big = np.pad(vol.astype(np.float64), pad, mode="reflect")
    out = fftconvolve(big, psf / psf.sum(), mode="same")
    return out[tuple(slice(a, a + n) for (a, _), n in zip(pad, vol.shape, strict=True))]


def _rl_scores(raw: np.ndarray, gt: np.ndarray, psf: np.ndarray) -> tuple[dict, np.ndarray]:
    """({iterations: scores}, estimate at the best-PSNR count) of one plain periodic RL run."""
    out, best = {}, {}

    def score_at(i, estimate):
        if i in RL_ITERATIONS:
            out[i] = scores(estimate.cpu().numpy(), gt)
            if not best or out[i]["psnr"] > best["psnr"]:
                best.update(psnr=out[i]["psnr"], estimate=estimate.cpu().numpy().copy())

    rl.richardson_lucy(raw, psf, max(RL_ITERATIONS), acceleration=None, edges="periodic",
                       background=0, progress=False, callback=score_at)
    return out, best["estimate"]


def _cached_rl(cache: Path | None, key: str, raw: np.ndarray, gt: np.ndarray,
               psf: np.ndarray) -> tuple[dict, np.ndarray]:
    digest = hashlib.sha256(raw.tobytes() + gt.tobytes() + psf.astype(np.float32).tobytes()).hexdigest()[:16]
    path = cache / f"rl_{key}_{digest}.json" if cache is not None else None
    est_path = cache / f"rl_{key}_{digest}.npy" if cache is not None else None
    if path is not None and path.is_file() and est_path.is_file():
        return {int(k): v for k, v in json.loads(path.read_text()).items()}, np.load(est_path)
    res, est = _rl_scores(raw, gt, psf)
    if path is not None:
        np.save(est_path, est)
        path.write_text(json.dumps(res))
    return res, est


def _compare(name: str, gt: np.ndarray, raw: np.ndarray, psf: np.ndarray, model: RLN,
             cache: Path | None, ensemble: int = 1) -> tuple[dict, np.ndarray, np.ndarray]:
    rl_all, rl_best = _cached_rl(cache, name, raw, gt, psf)
    best_psnr = max(rl_all.items(), key=lambda kv: kv[1]["psnr"])
    best_ssim = max(rl_all.items(), key=lambda kv: kv[1]["ssim"])
    y = rln_deconvolve(raw, model, ensemble=ensemble, progress=False)
    row = {"volume": name, "rln": scores(y, gt),
           "rl_best_psnr": {"iterations": best_psnr[0], **best_psnr[1]},
           "rl_best_ssim": {"iterations": best_ssim[0], **best_ssim[1]},
           "input": scores(raw, gt),
           "rl_by_iterations": {str(k): v for k, v in sorted(rl_all.items())}}
    row["rln_beats_rl"] = bool(row["rln"]["psnr"] >= row["rl_best_psnr"]["psnr"]
                               and row["rln"]["ssim"] >= row["rl_best_ssim"]["ssim"])
    # Not a target: the whole-volume scores weigh the background, here the object alone.
    obj = object_region(gt)
    row["inside_object"] = {"rln": scores(y, gt, obj), "rl_best_psnr": scores(rl_best, gt, obj),
                            "fraction": float(obj.mean())}
    print(json.dumps(row), flush=True)
    return row, y, rl_best


def _one_count(rows: list[dict]) -> dict:
    """Not a target (issue 14 scores RL at its best count per volume, an oracle): for each RL
    iteration count, the volumes where RLN beats RL run that many iterations, PSNR and SSIM,
    i.e. a user who runs RL at one count for every volume."""
    out = {}
    for k in RL_ITERATIONS:
        won = [r["volume"] for r in rows if r["rln"]["psnr"] >= r["rl_by_iterations"][str(k)]["psnr"]
               and r["rln"]["ssim"] >= r["rl_by_iterations"][str(k)]["ssim"]]
        out[str(k)] = {"rln_beats_rl_on": won, "rln_beats_rl_on_all": len(won) == len(rows)}
    return out


def _summary(rows: list[dict]) -> dict:
    s = {m: {k: float(np.mean([r[m][k] for r in rows])) for k in ("psnr", "ssim")}
         for m in ("input", "rl_best_psnr", "rl_best_ssim", "rln")}
    s["rln_beats_rl_psnr"] = int(sum(r["rln"]["psnr"] >= r["rl_best_psnr"]["psnr"] for r in rows))
    s["rln_beats_rl_ssim"] = int(sum(r["rln"]["ssim"] >= r["rl_best_ssim"]["ssim"] for r in rows))
    s["volumes"] = len(rows)
    return s


# --------------------------------------------------------------------------- (b) truths


def _smooth(vol: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(vol.astype(np.float64), sigma, mode="reflect")


def _truth_from_stack(stack: np.ndarray, psf: np.ndarray, iterations: int = 50) -> np.ndarray:
    """A real stack deconvolved into a plausible truth: RL (Bertero edges), smoothed by a
    Gaussian (σ 1 voxel), its floor (1st percentile) removed, scaled to a maximum of 1."""
    est = rl.richardson_lucy(stack.astype(np.float32), psf, iterations, acceleration=None,
                             background="auto", progress=False)
    t = _smooth(np.asarray(est), 1.0)
    t = np.clip(t - np.percentile(t, 1), 0, None)
    return t / t.max()


def _pad_to(vol: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """vol centred in zeros of at least ``shape`` (RL needs the image at least the PSF's size)."""
    extra = [max(0, s - n) for s, n in zip(shape, vol.shape, strict=True)]
    return np.pad(vol, [(e // 2, e - e // 2) for e in extra])


def _cached_truth(cache: Path | None, key: str, stack: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """_truth_from_stack(stack, psf), kept in ``cache`` (keyed by the stack and PSF) when given."""
    digest = hashlib.sha256(np.ascontiguousarray(stack).tobytes()
                            + np.ascontiguousarray(psf, dtype=np.float64).tobytes()).hexdigest()[:16]
    path = cache / f"truth_{key}_{digest}.npy" if cache is not None else None
    if path is not None and path.is_file():
        return np.load(path)
    t = _truth_from_stack(stack, psf)
    if path is not None:
        np.save(path, t)
    return t


def _truths(data: Path, psf: np.ndarray, cache: Path | None = None) -> dict[str, np.ndarray]:
    """Truth volumes, each at least the PSF's size + 15 voxels per axis (zero-padded)."""
    import tifffile

    out = {}
    dapi = data / "deconwolf" / "dapi_001.tif"
    if dapi.is_file():
        t = _cached_truth(cache, "dapi", tifffile.imread(dapi), psf)
        out["dapi"] = t
        # The same nucleus upside down in z and mirrored in x: another placement in the PSF.
        out["dapi_flipped"] = np.ascontiguousarray(t[::-1, :, ::-1])
    bars = data / "flowdec" / "bars-25pct__actual.tif"
    if bars.is_file():
        b = _smooth(tifffile.imread(bars), 0.7)
        out["bars"] = b / b.max()
    beads = data / "flowdec" / "bead-25pct__data.tif"
    kernel = data / "flowdec" / "bead-25pct__kernel.tif"
    if beads.is_file() and kernel.is_file():
        k = tifffile.imread(kernel).astype(np.float64)
        out["beads"] = _cached_truth(cache, "beads", tifffile.imread(beads), k)
    least = tuple(p + 15 for p in psf.shape)
    return {k: _pad_to(v, least) for k, v in out.items()}


def semi_synthetic_pair(truth: np.ndarray, psf: np.ndarray, peak: float, background: float,
                        haze: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(gt, raw): gt = truth scaled so that its blur peaks at ``peak`` photons; raw =
    Poisson(gt ⊛ psf + background + haze), the haze being the truth shifted by half the volume
    in y and x, blurred by a Gaussian σ (4, 8, 8) voxels and scaled to ``haze``·peak."""
    blurred = _circular_blur(truth, psf)
    k = peak / blurred.max()
    gt, blurred = truth * k, blurred * k
    h = np.roll(truth, (truth.shape[1] // 2, truth.shape[2] // 2), axis=(1, 2))
    h = _smooth(h, (4.0, 8.0, 8.0))
    h = h * (haze * peak / max(h.max(), 1e-12))
    rng = np.random.default_rng(seed)
    raw = rng.poisson(np.clip(blurred, 0, None) + background + h).astype(np.float32)
    return gt.astype(np.float32), raw


# --------------------------------------------------------------------------- (c) DAPI


def background_stats(vol: np.ndarray, inp: np.ndarray) -> dict:
    """Background (input < its 40th pct) mean and 99.9th pct of vol, as fractions of the
    nucleus level (median of vol where the input > its 90th pct), above the input's p0.01."""
    off = float(np.percentile(inp, 0.01))
    bg = inp < np.percentile(inp, 40)
    nucleus = float(np.median(vol[inp > np.percentile(inp, 90)])) - off
    v = vol[bg].astype(np.float64) - off
    return {"bg_mean": float(v.mean() / nucleus), "bg_p999": float(np.percentile(v, 99.9) / nucleus),
            "nucleus_level": nucleus}


def _rl20(raw: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """RL-20 as issue 14 measured it on the DAPI stack: Biggs, no background term."""
    return np.asarray(rl.richardson_lucy(raw, psf, 20, acceleration="biggs", background=0,
                                         progress=False))


def reblur_residual(vol: np.ndarray, inp: np.ndarray, psf: np.ndarray) -> float:
    """||a·(psf * vol) + b − input|| / ||input − offset||, a and b the least-squares fit (RLN's
    output units are not the input's), offset the input's 0.01st percentile."""
    off = float(np.percentile(inp, 0.01))
    r = _fit(_reflect_blur(vol, psf), inp) - inp
    return float(np.linalg.norm(r) / np.linalg.norm(inp.astype(np.float64) - off))


# --------------------------------------------------------------------------- pictures


def _norm(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [0.5, 99.8])
    return np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)


def _panel(vol: np.ndarray) -> np.ndarray:
    return np.concatenate([_norm(vol[vol.shape[0] // 2]), _norm(vol.max(axis=0))], axis=0)


def _save(grid: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray((grid * 255).astype(np.uint8)).save(path)


def _row(vols: list[np.ndarray], height: int) -> np.ndarray:
    from PIL import Image

    tiles = []
    for v in vols:
        a = _norm(v[v.shape[0] // 2])
        w = max(1, round(a.shape[1] * height / a.shape[0]))
        im = Image.fromarray((a * 255).astype(np.uint8)).resize((w, height), Image.NEAREST)
        tiles.append(np.asarray(im, dtype=np.float64) / 255)
        tiles.append(np.ones((height, 2)))
    return np.concatenate(tiles, axis=1)


def _grid(rows: list[np.ndarray]) -> np.ndarray:
    w = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 2), (0, w - r.shape[1])), constant_values=1) for r in rows]
    return np.concatenate(padded, axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out_dir")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder with deconwolf/ and flowdec/")
    ap.add_argument("--phantoms", type=int, default=8)
    ap.add_argument("--cache", default=None,
                    help="folder keeping RL's scores and the deconvolved truths of (b) between runs")
    ap.add_argument("--no-pictures", action="store_true")
    ap.add_argument("--semi", default=",".join(s[0] for s in SEMI_SYNTHETIC),
                    help="comma-separated semi-synthetic volumes to run (default: all)")
    ap.add_argument("--p-high", type=float, default=None,
                    help="diagnostic: the upper percentile of rln_deconvolve's normalisation "
                         "(default: the model's own, norm_percentiles), to see how the model "
                         "depends on it")
    ap.add_argument("--ensemble", type=int, default=1, choices=[1, 2, 4, 8],
                    help="rln_deconvolve's flip ensemble (default 1: none)")
    args = ap.parse_args()
    if not 0 <= args.phantoms <= len(HELD_OUT_SEEDS):
        ap.error(f"--phantoms must be 0..{len(HELD_OUT_SEEDS)}")
    model = RLN.load(args.model)
    low = norm_percentiles(model)[0]
    if args.p_high is not None and not low < args.p_high <= 100:
        ap.error(f"--p-high must be in ({low}, 100]")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    pictures = not args.no_pictures
    if args.p_high is not None:
        model.metadata["norm_percentiles"] = [low, args.p_high]
    psf = evaluation_psf()
    result = {"model": str(args.model), "metadata": model.metadata,
              "norm_percentiles": list(norm_percentiles(model))}
    if args.p_high is not None:
        result["normalisation_p_high"] = args.p_high
    if args.ensemble != 1:
        result["ensemble"] = args.ensemble

    # (a) held-out phantoms
    rows, pics = [], []
    for seed in HELD_OUT_SEEDS[: args.phantoms]:
        gt, raw = synth.phantom_pair(psf, (128, 128, 128), seed=seed)
        row, y, rl_best = _compare(f"phantom_{seed}", gt, raw, psf, model, cache, args.ensemble)
        rows.append({"seed": seed, **row})
        if pictures and len(pics) < 2:
            pics.append(_row([gt, raw, rl_best, y], 160))
    if rows:
        result["phantoms"] = {"rows": rows, "mean": _summary(rows)}
    if pics:
        _save(_grid(pics), out / "phantoms.png")

    # (b) semi-synthetic volumes with real structure
    data = Path(args.data)
    truths = _truths(data, psf, cache)
    rows, pics = [], []
    wanted = {w for w in args.semi.split(",") if w}
    for name, source, peak, bg, haze, seed in SEMI_SYNTHETIC:
        if name not in wanted:
            continue
        if source not in truths:
            print(f"skipping {name}: {source} not found under {data}")
            continue
        gt, raw = semi_synthetic_pair(truths[source], psf, peak, bg, haze, seed)
        row, y, rl_best = _compare(name, gt, raw, psf, model, cache, args.ensemble)
        # (c)'s re-blur residual where the truth is known: what the exact answer scores on it.
        rl20 = _rl20(raw, psf)
        row["reblur_residual"] = {k: reblur_residual(v, raw, psf)
                                  for k, v in (("truth", gt), ("rln", y), ("rl20", rl20))}
        rows.append({**row, "peak_photons": peak, "background": bg, "haze": haze, "shape": list(gt.shape)})
        if pictures:
            pics.append(_row([gt, raw, rl_best, y], 160))
    if rows:
        result["semi_synthetic"] = {"rows": rows, "mean": _summary(rows), "rl_at_one_count": _one_count(rows)}
    if pics:
        _save(_grid(pics), out / "semi_synthetic.png")

    # (c) the DAPI stack, no truth
    dapi = data / "deconwolf" / "dapi_001.tif"
    if dapi.is_file():
        import tifffile

        vol = tifffile.imread(dapi).astype(np.float32)
        rl20 = _rl20(vol, psf)
        y = rln_deconvolve(vol, model, ensemble=args.ensemble, progress=False)
        d = {"file": dapi.name, "shape": list(vol.shape), "rl_iterations": 20}
        for key, v in (("input", vol), ("rl20", rl20), ("rln", y)):
            d[key] = background_stats(v, vol)
            if key != "input":
                d[key]["reblur_residual"] = reblur_residual(v, vol, psf)
        inp, r = d["input"], d["rln"]
        d["targets"] = {
            "bg_mean_le_input": r["bg_mean"] <= inp["bg_mean"],
            "bg_p999_le_max_025_input": r["bg_p999"] <= max(0.25, inp["bg_p999"]),
            "reblur_le_1.25_rl20": r["reblur_residual"] <= 1.25 * d["rl20"]["reblur_residual"],
        }
        result["dapi"] = d
        print(json.dumps(d), flush=True)
        if pictures:
            _save(np.concatenate([_panel(v) for v in (vol, rl20, y)], axis=1), out / "dapi.png")
    (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k]["mean"] for k in ("phantoms", "semi_synthetic") if k in result}, indent=2))


if __name__ == "__main__":
    main()
