"""Diagnostic: RLNs made by averaging weights: the model card's runs 7 and 8a, and stage 5.

Usage: python scripts/diagnostics/average_weights.py OUT.pt --mix A.pt B.pt ALPHA
       python scripts/diagnostics/average_weights.py OUT.pt --flip-average MODEL.pt [--axes z,y,x]
       python scripts/diagnostics/average_weights.py OUT.pt --toward-flip-average MODEL.pt BETA

--mix: every weight and batch-norm statistic (1 − ALPHA)·A + ALPHA·B; B's metadata (so its
normalisation percentiles). Meaningful when B was fine-tuned from A, as the default model's
stages were from stage 1.
--flip-average: every conv kernel of MODEL replaced by its mean over the 8 flips of its
three spatial axes (``rln_fast.train.flip_symmetrize``), batch norms kept: the network then
commutes with flips of an even-sized volume. --axes z (or y,x) averages over the flips of
those axes only.
--toward-flip-average: every conv kernel w of MODEL replaced by (1 − BETA)·w + BETA·(its flip
mean), batch norms kept; MODEL's metadata, with the step recorded (and appended to its
"stages" when it has them, MODEL named in place of "this model"). Stage 5 of the shipped
default is stage 4b with BETA = 0.1 (stage 6 is stage 5 fine-tuned).
Evaluate OUT.pt with ``evaluate_default_model.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json

from rln_fast.models.rln import RLN
from rln_fast.train import flip_symmetrize, toward_flip_mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--mix", nargs=3, metavar=("A", "B", "ALPHA"))
    group.add_argument("--flip-average", metavar="MODEL")
    group.add_argument("--toward-flip-average", nargs=2, metavar=("MODEL", "BETA"))
    ap.add_argument("--axes", default="z,y,x", help="with --flip-average: the axes whose flips are averaged")
    args = ap.parse_args()
    if args.mix:
        a, b, alpha = RLN.load(args.mix[0]), RLN.load(args.mix[1]), float(args.mix[2])
        if not 0.0 <= alpha <= 1.0:
            ap.error(f"ALPHA must be in [0, 1], got {alpha}")
        sa, sb = a.state_dict(), b.state_dict()
        mixed = {k: (1 - alpha) * sa[k] + alpha * sb[k] if sb[k].is_floating_point() else sb[k] for k in sb}
        b.load_state_dict(mixed)
        b.metadata = {**b.metadata, "weight_average": f"{1 - alpha:g} x {args.mix[0]} + {alpha:g} x {args.mix[1]}"}
        out = b
    elif args.toward_flip_average:
        path, beta = args.toward_flip_average[0], float(args.toward_flip_average[1])
        if not 0.0 <= beta <= 1.0:
            ap.error(f"BETA must be in [0, 1], got {beta}")
        out = RLN.load(path)
        toward_flip_mean(out, beta)
        meta = dict(out.metadata)
        meta["toward_flip_average"] = beta
        if isinstance(meta.get("stages"), str):
            stages = json.loads(meta["stages"])
            last = stages[-1].split(":")[0]  # e.g. "4b"
            stages[-1] = stages[-1].replace("this model", path)
            label = str(int("".join(itertools.takewhile(str.isdigit, last)) or 0) + 1)
            stages.append(f"{label}: this model (the conv kernels of stage {last} moved {beta:g} of the "
                          "way to their means over the 8 axis flips; no training)")
            meta["stages"] = json.dumps(stages)
        out.metadata = meta
    else:
        names = args.axes.split(",")
        if not names or any(a not in ("z", "y", "x") for a in names) or len(set(names)) != len(names):
            ap.error(f"--axes: distinct names from z, y, x separated by commas, got {args.axes!r}")
        dims = [2 + "zyx".index(a) for a in names]
        out = RLN.load(args.flip_average)
        state = {k: flip_symmetrize(v, dims) if v.dim() == 5 else v for k, v in out.state_dict().items()}
        out.load_state_dict(state)
        out.metadata = {**out.metadata, "flip_averaged_kernels": args.axes}
    out.save(args.out)


if __name__ == "__main__":
    main()
