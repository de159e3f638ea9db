"""Diagnostic: a wider RLN that starts as a given one (the model card's width test).

Usage: python scripts/diagnostics/widen_model.py MODEL.pt OUT.pt [--factor F] [--noise S] [--seed N]

OUT.pt is ``RLN.widened(F, noise=S)`` of MODEL.pt: every multi-channel layer has F times
the channels (each channel repeated, its outgoing weights divided by F), so with --noise 0 it
computes what MODEL does; --noise S (default 0.01) adds N(0, (S·the kernel's std)²) to every
conv kernel, drawn with --seed, so that the copies can part when it is fine-tuned
(``train_default_model.py OUT --init OUT.pt ...`` trains at its width). Prints the largest
difference from MODEL on a random volume. MODEL's metadata is kept, the step appended to its
"stages".
"""

from __future__ import annotations

import argparse

import torch

from rln_fast.models.rln import RLN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = RLN.load(args.model).eval()
    try:
        wide = model.widened(args.factor, noise=args.noise, generator=torch.Generator().manual_seed(args.seed))
    except ValueError as e:
        ap.error(str(e))
    step = f"widened x{args.factor} (noise {args.noise:g}, seed {args.seed}) from {args.model}"
    if isinstance(wide.metadata.get("stages"), list):
        wide.metadata["stages"] = [*wide.metadata["stages"], step]
    wide.metadata["widened"] = step
    x = torch.rand(1, 1, 24, 48, 48, generator=torch.Generator().manual_seed(1)) * 4
    with torch.no_grad():
        diff = float((model(x) - wide.eval()(x)).abs().max())
    wide.save(args.out)
    params = sum(p.numel() for p in wide.parameters())
    print(f"{args.out}: width {wide.width}, {params} parameters; largest difference from {args.model} "
          f"on a random volume: {diff:.3g}")


if __name__ == "__main__":
    main()
