"""Use rln_fast.nn layers in your own PyTorch model, and check them against plain torch layers.

    python examples/custom_model_layers.py [--small] [--device cuda]

The model is one learnt Richardson–Lucy step, the building block of RLN:
    fp    = softplus(conv(x))               forward projection, 4 channels
    ratio = x / (mean_c(fp) + eps)          RL ratio
    bp    = softplus(conv(ratio))           back projection, 4 channels
    out   = conv(x · mean_c(bp))            RL update, then a 1-channel read-out
rln_fast.nn fuses each line into one kernel (the conv with its bias and activation; the
channel mean with the division or the product), so no intermediate of the plain version is
written to memory. FusedConv3d.from_conv3d wraps an existing nn.Conv3d, so a trained plain
model converts with its weights. The script runs both versions on the same weights, compares
outputs and gradients in float64, and trains the fused one for a few steps.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from rln_fast.nn import FusedConv3d, RLDivide, RLMultiply

EPS = 1e-4


class PlainRLStep(nn.Module):
    """The reference: nn.Conv3d and elementwise torch."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.fp = nn.Conv3d(1, channels, 3, padding=1)
        self.bp = nn.Conv3d(1, channels, 3, padding=1)
        self.out = nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, 1, D, H, W]
        fp = F.softplus(self.fp(x))
        ratio = x / (fp.mean(1, keepdim=True) + EPS)
        bp = F.softplus(self.bp(ratio))
        return self.out(x * bp.mean(1, keepdim=True))


class FusedRLStep(nn.Module):
    """The same step on rln_fast.nn: three fused convs, one fused divide, one fused multiply."""

    def __init__(self, plain: PlainRLStep) -> None:
        super().__init__()
        self.fp = FusedConv3d.from_conv3d(plain.fp, act="softplus")
        self.bp = FusedConv3d.from_conv3d(plain.bp, act="softplus")
        self.out = FusedConv3d.from_conv3d(plain.out)
        self.divide = RLDivide(eps=EPS)
        self.multiply = RLMultiply()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, 1, D, H, W]
        ratio = self.divide(x, self.fp(x))
        return self.out(self.multiply(x, self.bp(ratio)))


def compare(plain: nn.Module, fused: nn.Module, x: torch.Tensor) -> float:
    """Largest relative difference over the output and every gradient (input and weights)."""
    worst = 0.0
    results = []
    for model in (plain, fused):
        xi = x.clone().requires_grad_(True)
        model.zero_grad()
        y = model(xi)
        (y * y).mean().backward()  # any scalar loss
        results.append([y.detach(), xi.grad, *(p.grad for p in model.parameters())])
    for a, b in zip(*results, strict=True):
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--small", action="store_true", help="a 16x24x24 volume, 3 training steps")
    args = p.parse_args()
    torch.manual_seed(0)
    shape = (2, 1, 16, 24, 24) if args.small else (2, 1, 64, 128, 128)

    # 1. Same weights, float64: the fused layers must agree with plain torch to rounding.
    plain = PlainRLStep().double().to(args.device)
    fused = FusedRLStep(plain).to(args.device)
    x = torch.rand(shape, dtype=torch.float64, device=args.device) + 0.1  # positive, like light
    diff = compare(plain, fused, x)
    print(f"float64, output and all gradients: largest relative difference {diff:.1e}")
    if not diff < 1e-10:
        raise SystemExit(f"fused and plain layers disagree ({diff:.1e})")

    # 2. float32 speed, forward + backward.
    plain, fused = plain.float(), fused.float()
    x32 = x.float()
    for name, model in (("plain torch", plain), ("rln_fast.nn", fused)):
        model(x32).sum().backward()  # warm-up
        t0 = time.perf_counter()
        model(x32).sum().backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"{name:>12}: forward + backward {1e3 * (time.perf_counter() - t0):7.1f} ms")

    # 3. The fused model trains like any nn.Module: here to undo a small blur.
    target = x32
    blurred = F.avg_pool3d(F.pad(target[:, 0], (1, 1, 1, 1, 1, 1), mode="replicate")[:, None],
                           3, stride=1)
    opt = torch.optim.Adam(fused.parameters(), lr=1e-2)
    for step in range(1, (3 if args.small else 50) + 1):
        opt.zero_grad()
        loss = F.mse_loss(fused(blurred), target)
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.5f}")


if __name__ == "__main__":
    main()
