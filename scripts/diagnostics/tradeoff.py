"""Diagnostic: every evaluated model's margins over RL's best, on the bars against the nuclei.

Usage: python scripts/diagnostics/tradeoff.py OUT_DIR [EVALUATION.json ...]

Issue 14 asks for one model that beats RL at its best iteration count on every semi-synthetic
volume. This reads ``evaluate_default_model.py``'s JSONs (by default every JSON under ``benchmarks/results/``
with semi-synthetic rows, and the shipped model's ``evaluation.json``), takes each one's margins
over its own RL best (RLN − RL, PSNR dB and SSIM), and writes

- ``OUT_DIR/tradeoff.json``: per model, the margin on each semi-synthetic volume, the worst
  nucleus margin, and whether every issue-14 target measured there is met;
- ``OUT_DIR/tradeoff.png``: the bars' PSNR margin against the worst nucleus's, one point per
  model (needs matplotlib). A model that met the semi-synthetic target would sit in the upper
  right quadrant.

A JSON without all four semi-synthetic volumes is skipped and named in the output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUCLEI = ("dapi_nucleus", "dapi_nucleus_dim")
VOLUMES = (*NUCLEI, "flowdec_bars", "flowdec_beads")


def margins(evaluation: dict) -> dict | None:
    """The model's margins over RL's best per semi-synthetic volume, or None if one is missing."""
    rows = {r["volume"]: r for r in evaluation.get("semi_synthetic", {}).get("rows", [])}
    if any(v not in rows for v in VOLUMES):
        return None
    out = {}
    for v in VOLUMES:
        r = rows[v]
        out[v] = {"psnr": r["rln"]["psnr"] - r["rl_best_psnr"]["psnr"],
                  "ssim": r["rln"]["ssim"] - r["rl_best_ssim"]["ssim"]}
    phantoms = evaluation.get("phantoms", {}).get("rows", [])
    out["phantoms_all_above"] = bool(phantoms) and all(
        r["rln"]["psnr"] >= r["rl_best_psnr"]["psnr"] and r["rln"]["ssim"] >= r["rl_best_ssim"]["ssim"]
        for r in phantoms)
    out["n_phantoms"] = len(phantoms)
    targets = evaluation.get("dapi", {}).get("targets")
    out["dapi_targets"] = targets
    out["worst_nucleus_psnr"] = min(out[v]["psnr"] for v in NUCLEI)
    out["worst_nucleus_ssim"] = min(out[v]["ssim"] for v in NUCLEI)
    out["semi_synthetic_all_above"] = all(out[v]["psnr"] >= 0 and out[v]["ssim"] >= 0 for v in VOLUMES)
    return out


def label(path: Path) -> str:
    name = path.name.removesuffix(".json").removesuffix("evaluation").rstrip("_")
    return name or path.parent.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("evaluations", nargs="*")
    args = ap.parse_args()
    paths = [Path(p) for p in args.evaluations] or sorted(
        (ROOT / "benchmarks" / "results").glob("**/*.json")) + [
        ROOT / "rln_fast" / "weights" / "evaluation.json"]
    models, skipped = {}, []
    for p in paths:
        evaluation = json.loads(p.read_text())
        if not args.evaluations and not (isinstance(evaluation, dict) and "semi_synthetic" in evaluation):
            continue  # another benchmark's JSON
        m = margins(evaluation)
        if m is None:
            skipped.append(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p))
        else:
            name = "default (shipped)" if p.parent.name == "weights" else label(p)
            if name in models:  # the same file name in another folder
                name = f"{p.parent.name}/{name}"
            models[name] = m
    if not models:
        sys.exit("no evaluation JSON with all four semi-synthetic volumes")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    met = sorted(k for k, m in models.items() if m["semi_synthetic_all_above"])
    best_bars = max(models, key=lambda k: models[k]["flowdec_bars"]["psnr"])
    summary = {"n_models": len(models), "semi_synthetic_target_met_by": met,
               "best_bars_margin": {"model": best_bars, **models[best_bars]["flowdec_bars"],
                                    "worst_nucleus_psnr": models[best_bars]["worst_nucleus_psnr"]},
               "best_bars_with_nuclei_above": None}
    keep = [k for k, m in models.items() if m["worst_nucleus_psnr"] >= 0 and m["worst_nucleus_ssim"] >= 0]
    if keep:
        k = max(keep, key=lambda k: models[k]["flowdec_bars"]["psnr"])
        summary["best_bars_with_nuclei_above"] = {"model": k, **models[k]["flowdec_bars"]}
    (out / "tradeoff.json").write_text(json.dumps({"summary": summary, "models": models,
                                                   "skipped": skipped}, indent=1) + "\n")
    try:
        plot(models, out / "tradeoff.png")
    except ImportError:
        print("matplotlib is not installed: tradeoff.png not written (pip install matplotlib)")
    print(json.dumps(summary, indent=1))
    for s in skipped:
        print("skipped (not all four volumes):", s)


def plot(models: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6))
    for k, m in models.items():
        ssim_ok = m["worst_nucleus_ssim"] >= 0
        shipped = k.startswith("default")
        marker = "*" if shipped else ("^" if "ensemble" in k else "o")
        ax.scatter(m["worst_nucleus_psnr"], m["flowdec_bars"]["psnr"], s=90 if shipped else 24,
                   c="C3" if shipped else ("C0" if ssim_ok else "0.6"), marker=marker,
                   zorder=3 if shipped else 2)
    ax.set_ylim(top=max(ax.get_ylim()[1], 1.0))  # room for the target's quadrant
    ax.set_xlim(right=max(ax.get_xlim()[1], 1.0))
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("worst nucleus: RLN − RL best, PSNR (dB)")
    ax.set_ylabel("bars: RLN − RL best, PSNR (dB)")
    ax.set_title(f"{len(models)} evaluated models. Blue: both nuclei's SSIM ≥ RL's; grey: not;\n"
                 "triangle: flip ensemble (8x the time); star: shipped", fontsize=9)
    ax.text(0.98, 0.96, "issue 14's target", transform=ax.transAxes, ha="right", va="top", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
