"""RLN (Li et al., Nat Methods 2022) on rln_fast ops: training form, fused form, checkpoint I/O."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rln_fast import ops
from rln_fast.ops.reference import softplus as _softplus

__all__ = ["RLN", "FusedRLN"]

_FORMAT = "rln_fast.RLN"
_VERSION = 1

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01
_DIV_EPS = 1e-4  # the released graph's div_no_nan(a, b + 1e-4); the public source says 1e-3
_GAUSS_SIGMAS = (2.0, 0.5, 1.0, 1.5)  # per output channel of the Gaussian-initialised convs

# name -> (Cout, Cin) of every 3x3x3 conv, in the order of DESIGN's equations.
_CONVS: dict[str, tuple[int, int]] = {
    "e1": (4, 1), "e2": (4, 4), "e3": (4, 8), "e4": (8, 1), "e5": (8, 8), "e6": (8, 16),
    "e8": (4, 4),
    "u1": (4, 1), "u2": (4, 4), "u3": (8, 1), "u4": (8, 8), "u5": (8, 1), "u6": (8, 10),
    "u7": (8, 16),
}
_GAUSS_CONVS = ("e1", "e2", "e3", "u1", "u2")
_E7_SHAPE = (8, 4, 2, 2, 2)  # conv_transpose3d layout [Cin, Cout, kd, kh, kw]

# BN name -> channels, in the TF creation order: batch_normalization, _1, ..., _16.
_BNS: dict[str, int] = {
    "bn_e1": 4, "bn_e2": 4, "bn_e3": 4, "bn_t1": 1, "bn_e4": 8, "bn_e5": 8, "bn_e6": 8,
    "bn_e7": 4, "bn_e8": 4, "bn_t2": 1,
    "bn_u1": 4, "bn_u2": 4, "bn_t3": 1, "bn_u3": 8, "bn_u4": 8, "bn_t4": 1, "bn_u7": 8,
}

# Our parameter name -> TF variable name in the released checkpoint.
_TF_CONV_NAMES: dict[str, str] = {
    "e1": "estimation/e_1",
    "e2": "estimation/e_2",
    "e3": "estimation/e_3",
    "e4": "estimation/init_w/e_4",
    "e5": "estimation/init_w_1/e_5",
    "e6": "estimation/init_w_2/e_6",
    "e7": "estimation/init_w_3/e_7",
    "e8": "estimation/init_w_4/e_8",
    "u1": "update/u_1",
    "u2": "update/u_2",
    "u3": "update/init_w/u_3",
    "u4": "update/init_w_1/u_4",
    "u5": "update/init_w_2/u_5",
    "u6": "update/init_w_3/u_6",
    "u7": "update/init_w_4/u_7",
}
_TF_BN_FIELDS = (
    ("gamma", "weight"), ("beta", "bias"),
    ("moving_mean", "running_mean"), ("moving_variance", "running_var"),
)

INTERMEDIATE_KEYS = (
    "xdown", "FP1", "ratio1", "g1", "E1pre", "E1", "FP2", "ratio2", "g2", "E2pre", "E2",
    "output",
)

_GRADIENTS = ("exact", "paper")
_BN_MODES = ("torch", "official")


def _tf_bn_name(i: int) -> str:
    return "batch_normalization" if i == 0 else f"batch_normalization_{i}"


def _check_input(x: Any, who: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor (N, 1, D, H, W), got {type(x).__name__}")
    if x.dim() != 5 or x.shape[1] != 1:
        raise ValueError(
            f"{who}: x must have shape (N, 1, D, H, W) (one channel, axes z, y, x), "
            f"got shape {tuple(x.shape)}"
        )
    if min(x.shape[2:]) < 2:
        raise ValueError(
            f"{who}: every spatial side must be >= 2 (the estimation branch pools by 2), "
            f"got shape {tuple(x.shape)}"
        )


def _check_dtype(x: torch.Tensor, ref: torch.Tensor, who: str) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(
            f"{who}: x has dtype {x.dtype} but the model holds {ref.dtype}; "
            f"convert one of them (x.to({ref.dtype}) or model.to({x.dtype}))"
        )


def _output_padding(x: torch.Tensor) -> tuple[int, int, int]:
    # avg_pool3d floors, so an odd side needs one extra plane from the transposed conv.
    return (x.shape[2] % 2, x.shape[3] % 2, x.shape[4] % 2)


def _up2(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
         output_padding: tuple[int, int, int]) -> torch.Tensor:
    """e7, the stride-2 transposed conv, in the model's dtype even under torch.autocast: a
    float32 island, since the rln_fast ops around it take float32 or float64 only (they cast
    autocast's half inputs back to float32, which would only add rounding here)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.conv_transpose3d(x, w, b, stride=2, output_padding=output_padding)


def _mean_c(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=1, keepdim=True)


class _OfficialBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d whose train-mode running variance follows TF: biased batch variance.

    Normalisation itself uses the biased batch variance in both flavours; only the
    running update differs from nn.BatchNorm3d (which stores the unbiased one).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        y = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=(0, 2, 3, 4), correction=0)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        return y


def _gaussian_init_(w: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """w [4·width, Cin, 3, 3, 3] <- Gaussian per output channel (peak 1; each of the 4 sigmas
    on ``width`` consecutive channels) x U(0, 1) per input channel."""
    r = torch.arange(-1.0, 2.0, dtype=torch.float64)
    r2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2  # [3, 3, 3]
    sig = torch.tensor(_GAUSS_SIGMAS, dtype=torch.float64).repeat_interleave(w.shape[0] // len(_GAUSS_SIGMAS))
    g = torch.exp(-r2 / (2.0 * sig[:, None, None, None] ** 2))  # [Cout, 3, 3, 3], centre value 1
    u = torch.rand(w.shape[1], dtype=torch.float64, generator=generator)  # shared over Cout
    with torch.no_grad():
        w.copy_((g[:, None] * u[None, :, None, None, None]).to(w.dtype))


# name -> the channels of each input part of the conv (e7: its one input), at width 1; parts of
# one channel (x, the ratios, E1, E2) keep one channel at every width.
_CONV_INPUTS: dict[str, tuple[int, ...]] = {
    "e1": (1,), "e2": (4,), "e3": (4, 4), "e4": (1,), "e5": (8,), "e6": (8, 8), "e7": (8,),
    "e8": (4,), "u1": (1,), "u2": (4,), "u3": (1,), "u4": (8,), "u5": (1,), "u6": (8, 1, 1),
    "u7": (8, 8),
}
_ONE_CHANNEL_BNS = ("bn_t1", "bn_t2", "bn_t3", "bn_t4")


def _scaled_in(parts: tuple[int, ...], width: int) -> int:
    return sum(c if c == 1 else c * width for c in parts)


def _check_width(width: Any, who: str) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"{who}: width must be an integer >= 1, got {width!r}")
    return width


def _widen_in(w: torch.Tensor, parts: tuple[int, ...], width: int, factor: int, dim: int) -> torch.Tensor:
    """w's input channels (on ``dim``, the parts at ``width``) with each channel of every
    multi-channel part repeated ``factor`` times in place, each copy carrying 1/factor of its
    weight: fed the repeated channels, the conv computes what it did before."""
    out, lo = [], 0
    for c in parts:
        n = c if c == 1 else c * width
        piece = w.narrow(dim, lo, n)
        out.append(piece if c == 1 else piece.repeat_interleave(factor, dim=dim) / factor)
        lo += n
    if lo != w.shape[dim]:
        raise RuntimeError(f"_widen_in: parts {parts} at width {width} cover {lo} of {w.shape[dim]} channels")
    return torch.cat(out, dim=dim)


def _load_reason(e: Exception) -> str:
    """torch.load's failure in a few words, without its advice to retry with
    weights_only=False (which would run code from the file)."""
    text = str(e)
    m = re.search(r"unsupported GLOBAL ([\w.]+)", text)
    if m:
        return f"it asks to run {m[1]}, which is not weights; nothing from it was run"
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and "weights_only" not in ln and not ln.startswith("Check the doc")]
    detail = lines[0] if lines else ""
    if detail.startswith("Weights only load failed"):
        detail = detail.split(".", 1)[-1].strip()
    detail = detail[:120] if detail else "not a torch file"
    return f"{type(e).__name__}: {detail}"


class RLN(nn.Module):
    """Richardson-Lucy Network, training form (convs emit pre-BN outputs, BN as modules).

    Input x [N, 1, D, H, W] (axes z, y, x), any D, H, W >= 2; output [N, 1, D, H, W].
    15,968 trainable parameters at width 1 (60,952 at width 2): conv weights e1..e8, u1..u7
    (no biases; e7 is the stride-2 transposed conv, torch layout [Cin=8, Cout=4, 2, 2, 2] at
    width 1) and 17 BNs.

    gradients: "exact" (true gradients of the RL division/multiplication) or "paper"
    (the released training graph's surrogate gradients).
    bn: "torch" (nn.BatchNorm3d) or "official" (running variance updated with the
    biased batch variance, as TF does).
    width: every multi-channel layer has ``width`` times the official channels (not the
    official architecture unless 1; about width² times the parameters and the conv work).
    """

    def __init__(self, *, gradients: str = "exact", bn: str = "torch", width: int = 1) -> None:
        super().__init__()
        if gradients not in _GRADIENTS:
            raise ValueError(f"RLN: gradients must be one of {_GRADIENTS}, got {gradients!r}")
        if bn not in _BN_MODES:
            raise ValueError(f"RLN: bn must be one of {_BN_MODES}, got {bn!r}")
        self.gradients = gradients
        self.bn = bn
        self.width = _check_width(width, "RLN")
        self.metadata: dict[str, Any] = {}
        for name, (cout, _) in _CONVS.items():
            cin = _scaled_in(_CONV_INPUTS[name], width)
            self.register_parameter(name, nn.Parameter(torch.empty(cout * width, cin, 3, 3, 3)))
        self.e7 = nn.Parameter(torch.empty(_E7_SHAPE[0] * width, _E7_SHAPE[1] * width, *_E7_SHAPE[2:]))
        bn_cls = _OfficialBatchNorm3d if bn == "official" else nn.BatchNorm3d
        for name, c in _BNS.items():
            c = c if name in _ONE_CHANNEL_BNS else c * width
            self.add_module(name, bn_cls(c, eps=_BN_EPS, momentum=_BN_MOMENTUM))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Official init: Gaussians for e1-e3, u1, u2; N(0, 1) truncated at 2 sigma; BN identity."""
        for name in [*_CONVS, "e7"]:
            w = getattr(self, name)
            if name in _GAUSS_CONVS:
                _gaussian_init_(w, generator)
            else:
                nn.init.trunc_normal_(w, 0.0, 1.0, -2.0, 2.0, generator=generator)
        for name in _BNS:
            getattr(self, name).reset_parameters()

    def extra_repr(self) -> str:
        parts = [f"width={self.width}"] if self.width != 1 else []
        if self.gradients != "exact":
            parts.append(f"gradients={self.gradients!r}")
        if self.bn != "torch":
            parts.append(f"bn={self.bn!r}")
        return ", ".join(parts)

    def _bsp(self, bn: str, t: torch.Tensor) -> torch.Tensor:
        return _softplus(getattr(self, bn)(t))

    def forward(
        self, x: torch.Tensor, return_intermediates: bool = False
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """x [N, 1, D, H, W] -> output [N, 1, D, H, W], or a dict of [N, 1, ...] tensors.

        Intermediates (each one channel): xdown = avg_pool3d(x, 2) [N, 1, D//2, H//2, W//2];
        FP1 = mean_c(a3) (half resolution); ratio1 = xdown / (FP1 + 1e-4) before BN_t1;
        g1 = mean_c(u2); E1pre = x * g1; E1 = SP(BN_t2(E1pre)); FP2 = mean_c(c2);
        ratio2 = x / (FP2 + 1e-4) before BN_t3; g2 = mean_c(d2) (its +1 included);
        E2pre = E1 * g2; E2 = SP(BN_t4(E2pre)); output.
        """
        _check_input(x, "RLN")
        _check_dtype(x, self.e1, "RLN")
        if self.training and x.shape[0] * math.prod(s // 2 for s in x.shape[2:]) < 2:
            raise ValueError(
                "RLN: train mode needs more than one voxel per channel at half resolution "
                f"for the batch statistics, got shape {tuple(x.shape)}; use a larger batch "
                "or volume, or call .eval()"
            )
        g = self.gradients
        conv = ops.conv3d

        # H1, half resolution ("estimation").
        xd = F.avg_pool3d(x, 2)
        a1 = self._bsp("bn_e1", conv(xd, self.e1))
        a2 = self._bsp("bn_e2", conv(a1, self.e2))
        a3 = self._bsp("bn_e3", conv([a1, a2], self.e3)) + _softplus(xd)
        ratio1 = ops.rl_divide(xd, a3, eps=_DIV_EPS, gradients=g)
        r1 = self.bn_t1(ratio1)
        b1 = self._bsp("bn_e4", conv(r1, self.e4))
        b2 = self._bsp("bn_e5", conv(b1, self.e5))
        b3 = self._bsp("bn_e6", conv([b2, b1], self.e6))
        up = _up2(b3, self.e7, None, _output_padding(x))
        if up.shape[2:] != x.shape[2:]:
            raise RuntimeError(f"RLN: e7 produced {tuple(up.shape)} for input {tuple(x.shape)}")
        up = self._bsp("bn_e7", up)
        bp1 = self._bsp("bn_e8", conv(up, self.e8))
        e1pre = ops.rl_multiply(x, bp1, gradients=g)
        e1 = self._bsp("bn_t2", e1pre)

        # H2, full resolution ("update"): its forward projection acts on the raw x.
        c1 = self._bsp("bn_u1", conv(x, self.u1))
        c2 = self._bsp("bn_u2", conv(c1, self.u2)) + _softplus(x)
        ratio2 = ops.rl_divide(x, c2, eps=_DIV_EPS, gradients=g)
        r2 = self.bn_t3(ratio2)
        d1 = self._bsp("bn_u3", conv(r2, self.u3))
        d2 = self._bsp("bn_u4", conv(d1, self.u4)) + 1.0
        e2pre = ops.rl_multiply(e1, d2, gradients=g)
        e2 = self._bsp("bn_t4", e2pre)

        # H3, merge.
        m1 = conv(e2, self.u5, act="softplus")
        m2 = conv([m1, e2, e1], self.u6, act="softplus")
        m3 = self._bsp("bn_u7", conv([m1, m2], self.u7))
        out = _mean_c(m3)
        if not return_intermediates:
            return out
        return {
            "xdown": xd, "FP1": _mean_c(a3), "ratio1": ratio1, "g1": _mean_c(bp1),
            "E1pre": e1pre, "E1": e1, "FP2": _mean_c(c2), "ratio2": ratio2, "g2": _mean_c(d2),
            "E2pre": e2pre, "E2": e2, "output": out,
        }

    def widened(self, factor: int, noise: float = 0.0, generator: torch.Generator | None = None) -> RLN:
        """A copy with ``factor`` times the channels that computes the same function: each
        channel repeated ``factor`` times (its conv kernel, BN and running statistics copied),
        each copy's outgoing weights divided by ``factor``. ``noise`` > 0 adds N(0, (noise·the
        kernel's std)²) to every widened conv kernel so that the copies can part in training
        (the function then changes, more with more noise). Metadata is copied; train mode is kept."""
        factor = _check_width(factor, "RLN.widened")
        if not (noise >= 0.0 and math.isfinite(noise)):
            raise ValueError(f"RLN.widened: noise must be finite and >= 0, got {noise!r}")
        w0, w1 = self.width, self.width * factor
        out = RLN(gradients=self.gradients, bn=self.bn, width=w1).to(self.e1.device, self.e1.dtype)
        state = {}
        with torch.no_grad():
            for name in [*_CONVS, "e7"]:
                w = getattr(self, name).detach()
                out_dim, in_dim = (1, 0) if name == "e7" else (0, 1)
                w = w.repeat_interleave(factor, dim=out_dim)
                w = _widen_in(w, _CONV_INPUTS[name], w0, factor, in_dim)
                if noise > 0:
                    w = w + noise * float(w.std()) * torch.randn(w.shape, generator=generator).to(w)
                state[name] = w
            for name in _BNS:
                for key, v in getattr(self, name).state_dict().items():
                    wide = name not in _ONE_CHANNEL_BNS and v.dim() == 1
                    state[f"{name}.{key}"] = v.repeat_interleave(factor) if wide else v.clone()
        out.load_state_dict(state)
        out.metadata = dict(self.metadata)
        return out.train(self.training)

    # ---------------------------------------------------------------- fused form

    def fuse(self) -> FusedRLN:
        """The eval-only inference form: every BN that follows a conv folded in (running stats)."""
        return FusedRLN(self)

    # ---------------------------------------------------------------- official import

    @classmethod
    def from_official_checkpoint(cls, prefix: str | os.PathLike, **kw: Any) -> RLN:
        """Import the released TF1 checkpoint (prefix as ".../model.ckpt"); no TensorFlow needed.

        kw go to RLN(...) (gradients=, bn=). metadata["steps"] holds the Adam step count
        read from beta2_power (0.999**steps) when the checkpoint has it.
        """
        if kw.get("width", 1) != 1:
            raise ValueError("RLN.from_official_checkpoint: the released model has width 1, "
                             f"got width={kw['width']!r}")
        from rln_fast.models.tf_checkpoint import (
            CheckpointError,
            list_tf_checkpoint,
            read_tf_checkpoint,
        )

        # Only what the model uses: a bundle may hold other (large) tensors, never read.
        used = [*_TF_CONV_NAMES.values(), "beta2_power",
                *(f"{_tf_bn_name(i)}/{f}" for i in range(len(_BNS)) for f, _ in _TF_BN_FIELDS)]
        present = list_tf_checkpoint(str(prefix))  # the index only
        tensors = read_tf_checkpoint(str(prefix), [n for n in used if n in present])
        model = cls(**kw)

        def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in tensors:
                raise CheckpointError(
                    f"RLN.from_official_checkpoint: {prefix}: variable {name!r} is missing; "
                    "is this the released RLN (single-input) checkpoint?"
                )
            arr = np.asarray(tensors[name])
            if tuple(arr.shape) != shape:
                raise CheckpointError(
                    f"RLN.from_official_checkpoint: {prefix}: variable {name!r} has shape "
                    f"{list(arr.shape)}, expected {list(shape)}"
                )
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

        state: dict[str, torch.Tensor] = {}
        for ours, tf_name in _TF_CONV_NAMES.items():
            if ours == "e7":
                cin, cout = _E7_SHAPE[0], _E7_SHAPE[1]
                tf_shape: tuple[int, ...] = (2, 2, 2, cout, cin)
            else:
                cout, cin = _CONVS[ours]
                tf_shape = (3, 3, 3, cin, cout)
            # TF [kd, kh, kw, cin, cout] -> torch [cout, cin, kd, kh, kw]; for the transposed
            # conv the same permute gives conv_transpose3d's [Cin, Cout, k...]. No flip.
            state[ours] = get(tf_name, tf_shape).permute(4, 3, 0, 1, 2).contiguous()
        for i, (ours, c) in enumerate(_BNS.items()):
            for tf_field, field in _TF_BN_FIELDS:
                state[f"{ours}.{field}"] = get(f"{_tf_bn_name(i)}/{tf_field}", (c,))
            state[f"{ours}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)

        model.load_state_dict(state)
        model.metadata = {"source": "official_checkpoint", "checkpoint": os.path.basename(prefix)}
        b2 = tensors.get("beta2_power")
        if b2 is not None and 0.0 < float(b2) < 1.0:
            model.metadata["steps"] = round(math.log(float(b2)) / math.log(0.999))
        return model

    # ---------------------------------------------------------------- own format

    def save(self, path: str | os.PathLike) -> None:
        """Write config, weights (incl. BN running statistics) and metadata with torch.save."""
        torch.save(
            {
                "format": _FORMAT,
                "version": _VERSION,
                "config": {"gradients": self.gradients, "bn": self.bn,
                           **({"width": self.width} if self.width != 1 else {})},
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                "metadata": dict(self.metadata),
            },
            os.fspath(path),
        )

    @classmethod
    def from_pretrained(cls, name: str = "default") -> RLN:
        """The model shipped in rln_fast/weights/<name>.pt (trained by rln_fast on synthetic
        phantoms; rln_fast/weights/README.md is its model card). Nothing is downloaded."""
        path = Path(__file__).resolve().parents[1] / "weights" / f"{name}.pt"
        if not path.is_file():
            shipped = sorted(p.stem for p in path.parent.glob("*.pt"))
            raise FileNotFoundError(
                f"RLN.from_pretrained: no shipped model {name!r} at {path} (shipped: {shipped or 'none'}); "
                "pass a model you trained (RLN.load) or the released checkpoint "
                "(RLN.from_official_checkpoint)"
            )
        return cls.load(path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RLN:
        """Read a file written by RLN.save (weights_only: no code from the file runs)."""
        path = os.fspath(path)
        try:
            blob = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(
                f"RLN.load: {path} is not a readable rln_fast model file ({_load_reason(e)}); "
                "give a file written by RLN.save or rln-fast train"
            ) from e
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            got = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
            raise ValueError(
                f"RLN.load: {path} is not an rln_fast RLN file (format {got!r}, expected "
                f"{_FORMAT!r}); for the released TF checkpoint use RLN.from_official_checkpoint"
            )
        version = blob.get("version")
        if version != _VERSION:
            raise ValueError(
                f"RLN.load: {path} has format version {version!r}; this rln_fast reads "
                f"version {_VERSION}"
            )
        missing = [k for k in ("config", "state_dict", "metadata") if k not in blob]
        if missing:
            raise ValueError(f"RLN.load: {path} lacks {', '.join(missing)}")
        try:
            model = cls(**blob["config"])
        except TypeError as e:
            raise ValueError(f"RLN.load: {path} has an unknown config {blob['config']!r}") from e
        state = blob["state_dict"]
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [
            f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
            for k, v in expected.items()
            if k in state and tuple(state[k].shape) != tuple(v.shape)
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"RLN.load: {path} holds weights that do not fit RLN: missing {missing}, "
                f"unexpected {unexpected}, wrong shape {wrong}"
            )
        model.load_state_dict(state)
        model.metadata = dict(blob["metadata"])
        return model


def _fold(
    w: torch.Tensor, bn: nn.BatchNorm3d, out_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode bn into w (out channels on out_dim): w' = w*s, b' = beta - mean*s."""
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # [Cout]
    shape = [1] * w.dim()
    shape[out_dim] = -1
    w2 = w.double() * s.view(shape)
    b2 = bn.bias.double() - bn.running_mean.double() * s
    return w2.to(w.dtype).contiguous(), b2.to(w.dtype)


def _affine(bn: nn.BatchNorm3d) -> tuple[float, float]:
    """The one-channel eval-mode BN as y = scale * x + shift (Python floats)."""
    s = float(bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps))
    return s, float(bn.bias.double() - bn.running_mean.double() * s)


# The fused conv + divide/multiply kernels hold at most this many output channels (width 1's
# largest is 8); wider layers (RLN(width=2) and up) run the conv and the RL step separately.
_FUSED_MAX_COUT = 8


def _fused_divide(inputs, weight, bias, act, skip, x, eps, scale=1.0, shift=0.0):
    if weight.shape[0] <= _FUSED_MAX_COUT:
        return ops.conv3d_rl_divide(inputs, weight, bias, act, skip, x, eps, scale, shift)
    fp = ops.conv3d(inputs, weight, bias, act=act, skip=skip)
    return ops.rl_divide(x, fp, eps=eps, scale=scale, shift=shift)


def _fused_multiply(inputs, weight, bias, act, e, offset):
    if weight.shape[0] <= _FUSED_MAX_COUT:
        return ops.conv3d_rl_multiply(inputs, weight, bias, act, e, offset)
    bp = ops.conv3d(inputs, weight, bias, act=act)
    return _mean_c(bp) + offset if e is None else ops.rl_multiply(e, bp, offset=offset)


class FusedRLN(nn.Module):
    """RLN inference form: BNs folded into conv weight + bias; one conv3d call per layer.

    Eval-only (built from an RLN's running statistics; .train() raises, inputs that
    require grad are refused). Same forward signature and outputs as RLN in eval mode:
    x [N, 1, D, H, W] (axes z, y, x), any D, H, W >= 2 -> [N, 1, D, H, W] or the dict.
    BN_t1/BN_t3 stay outside e4/u3 (zero padding would see BN(0) != 0 at borders): they
    are rl_divide's scale/shift. BN_t2/BN_t4 are one-channel affines before softplus.
    """

    def __init__(self, model: RLN) -> None:
        super().__init__()
        with torch.no_grad():
            for name in _CONVS:
                bn = getattr(model, f"bn_{name}", None)
                w = getattr(model, name).detach()
                if bn is None:  # u5, u6: no BN, no bias
                    self.register_buffer(f"w_{name}", w.clone().contiguous())
                    self.register_buffer(f"b_{name}", None)
                else:
                    wf, bf = _fold(w, bn, out_dim=0)
                    self.register_buffer(f"w_{name}", wf)
                    self.register_buffer(f"b_{name}", bf)
            # conv_transpose3d weight is [Cin, Cout, k...]: BN channels on dim 1.
            wf, bf = _fold(model.e7.detach(), model.bn_e7, out_dim=1)
            self.register_buffer("w_e7", wf)
            self.register_buffer("b_e7", bf)
            self.t1 = _affine(model.bn_t1)
            self.t2 = _affine(model.bn_t2)
            self.t3 = _affine(model.bn_t3)
            self.t4 = _affine(model.bn_t4)
        self.metadata = dict(model.metadata)
        self.training = False

    def train(self, mode: bool = True) -> FusedRLN:
        if mode:
            raise RuntimeError(
                "FusedRLN is inference-only (BN folded with running statistics); "
                "train the RLN it came from and call .fuse() again"
            )
        return super().train(False)

    # FP + divide and BP + multiply: the conv's output channels are needed only through their
    # channel mean, so without intermediates they run as one fused op each.

    def _fp_divide(
        self,
        inputs: list[torch.Tensor],
        name: str,
        skip: torch.Tensor,
        affine: tuple[float, float],
        want: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """FP + DV: ratio = BN_t(skip / (mean_c(SP(conv(inputs)) + SP(skip)) + eps)), [N, 1, ...].

        With want, also returns the FP channel mean and the pre-BN ratio.
        """
        w, b = getattr(self, f"w_{name}"), getattr(self, f"b_{name}")
        if not want:  # FP's channels never reach memory
            return _fused_divide(inputs, w, b, "softplus", skip, skip, _DIV_EPS, *affine), {}
        fp = ops.conv3d(inputs, w, b, act="softplus", skip=skip)
        r = ops.rl_divide(skip, fp, eps=_DIV_EPS, scale=affine[0], shift=affine[1])
        return r, {"FP": _mean_c(fp), "ratio": ops.rl_divide(skip, fp, eps=_DIV_EPS)}

    def _bp_multiply(
        self,
        inputs: torch.Tensor,
        name: str,
        e: torch.Tensor,
        offset: float,
        want: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """BP + update: e * (mean_c(SP(conv(inputs))) + offset), [N, 1, ...]; with want, also g."""
        w, b = getattr(self, f"w_{name}"), getattr(self, f"b_{name}")
        if not want:  # BP's channels never reach memory
            return _fused_multiply(inputs, w, b, "softplus", e, offset), {}
        bp = ops.conv3d(inputs, w, b, act="softplus")
        return ops.rl_multiply(e, bp, offset=offset), {"g": _mean_c(bp) + offset}

    def _conv_sp(self, inputs: torch.Tensor | list[torch.Tensor], name: str) -> torch.Tensor:
        return ops.conv3d(inputs, getattr(self, f"w_{name}"), getattr(self, f"b_{name}"),
                          act="softplus")

    # Full-resolution multi-channel tensors (up, c1, d1, m1, m2) are the memory peak: without
    # intermediates they live for one z-slab at a time. A chain of k convs needs k planes of
    # halo; every kept plane is computed from exactly the inputs of an unsliced run, so the
    # result is bitwise the same as one slab.
    _MIN_SLAB_VOXELS = 1 << 24  # below this the volume is one slab

    @staticmethod
    def _slabs(depth: int, plane: int) -> list[tuple[int, int]]:
        if depth * plane < FusedRLN._MIN_SLAB_VOXELS:
            return [(0, depth)]
        step = max(16, -(-depth // 4))
        step += step % 2  # even slab starts keep the transposed conv's planes aligned
        return [(z0, min(depth, z0 + step)) for z0 in range(0, depth, step)]

    @staticmethod
    def _run_slabs(out: torch.Tensor, slabs, halo: int, fn) -> torch.Tensor:
        depth = out.shape[2]
        for z0, z1 in slabs:
            lo, hi = max(0, z0 - halo), min(depth, z1 + halo)
            out[:, :, z0:z1] = fn(lo, hi)[:, :, z0 - lo:z1 - lo]
        return out

    def _forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        D, H, W = x.shape[2:]
        slabs = self._slabs(D, H * W)
        # H1 at half resolution (1/8 of the voxels).
        xd = F.avg_pool3d(x, 2)
        a1 = self._conv_sp(xd, "e1")
        a2 = self._conv_sp(a1, "e2")
        r1 = _fused_divide([a1, a2], self.w_e3, self.b_e3, "softplus", xd, xd, _DIV_EPS, *self.t1)
        del a1, a2, xd
        b1 = self._conv_sp(r1, "e4")
        b2 = self._conv_sp(b1, "e5")
        b3 = self._conv_sp([b2, b1], "e6")
        del r1, b1, b2
        _, oh, ow = _output_padding(x)

        def e1pre_slab(lo: int, hi: int) -> torch.Tensor:
            # up planes [lo, hi) come from b3 planes [lo/2, ceil(hi/2)); lo is even.
            pad_z = 1 if (hi == D and D % 2) else 0
            up = _softplus(_up2(b3[:, :, lo // 2:hi // 2], self.w_e7, self.b_e7, (pad_z, oh, ow)))
            return _fused_multiply(up, self.w_e8, self.b_e8, "softplus", x[:, :, lo:hi], 0.0)

        e1 = self._run_slabs(torch.empty_like(x), slabs, 2, e1pre_slab)
        b3 = None  # frees the half-resolution features (the closure above is done with them)
        e1 = _softplus(e1.mul_(self.t2[0]).add_(self.t2[1]))

        # H2 at full resolution.
        def r2_slab(lo: int, hi: int) -> torch.Tensor:
            xs = x[:, :, lo:hi]
            return _fused_divide(self._conv_sp(xs, "u1"), self.w_u2, self.b_u2, "softplus",
                                 xs, xs, _DIV_EPS, *self.t3)

        r2 = self._run_slabs(torch.empty_like(x), slabs, 2, r2_slab)

        def e2pre_slab(lo: int, hi: int) -> torch.Tensor:
            return _fused_multiply(self._conv_sp(r2[:, :, lo:hi], "u3"), self.w_u4,
                                   self.b_u4, "softplus", e1[:, :, lo:hi], 1.0)

        e2 = self._run_slabs(torch.empty_like(x), slabs, 2, e2pre_slab)
        r2 = None  # frees the ratio volume
        e2 = _softplus(e2.mul_(self.t4[0]).add_(self.t4[1]))

        # H3, the merge: its output is the channel mean of m3, which never reaches memory.
        def out_slab(lo: int, hi: int) -> torch.Tensor:
            e2s, e1s = e2[:, :, lo:hi], e1[:, :, lo:hi]
            m1 = ops.conv3d(e2s, self.w_u5, None, act="softplus")
            m2 = ops.conv3d([m1, e2s, e1s], self.w_u6, None, act="softplus")
            return _fused_multiply([m1, m2], self.w_u7, self.b_u7, "softplus", None, 0.0)

        return self._run_slabs(torch.empty_like(x), slabs, 3, out_slab)

    def forward(
        self, x: torch.Tensor, return_intermediates: bool = False
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """x [N, 1, D, H, W] -> [N, 1, D, H, W], or the dict of RLN.forward."""
        _check_input(x, "FusedRLN")
        _check_dtype(x, self.w_e1, "FusedRLN")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "FusedRLN is inference-only: x requires grad; use the RLN training form"
            )
        if not return_intermediates:
            return self._forward_lean(x)
        want = True

        xd = F.avg_pool3d(x, 2)
        a1 = self._conv_sp(xd, "e1")
        a2 = self._conv_sp(a1, "e2")
        r1, i1 = self._fp_divide([a1, a2], "e3", xd, self.t1, want)
        b1 = self._conv_sp(r1, "e4")
        b2 = self._conv_sp(b1, "e5")
        b3 = self._conv_sp([b2, b1], "e6")
        # On an odd side the last plane gets no taps: it is the folded bias, i.e. BN(0).
        up = _softplus(_up2(b3, self.w_e7, self.b_e7, _output_padding(x)))
        e1pre, j1 = self._bp_multiply(up, "e8", x, 0.0, want)
        e1 = _softplus(self.t2[0] * e1pre + self.t2[1])

        c1 = self._conv_sp(x, "u1")
        r2, i2 = self._fp_divide([c1], "u2", x, self.t3, want)
        d1 = self._conv_sp(r2, "u3")
        # d2 = SP(BN(conv u4)) + 1: the +1 rides on rl_multiply's offset.
        e2pre, j2 = self._bp_multiply(d1, "u4", e1, 1.0, want)
        e2 = _softplus(self.t4[0] * e2pre + self.t4[1])

        m1 = ops.conv3d(e2, self.w_u5, None, act="softplus")
        m2 = ops.conv3d([m1, e2, e1], self.w_u6, None, act="softplus")
        m3 = self._conv_sp([m1, m2], "u7")
        out = _mean_c(m3)
        if not want:
            return out
        return {
            "xdown": xd, "FP1": i1["FP"], "ratio1": i1["ratio"], "g1": j1["g"],
            "E1pre": e1pre, "E1": e1, "FP2": i2["FP"], "ratio2": i2["ratio"], "g2": j2["g"],
            "E2pre": e2pre, "E2": e2, "output": out,
        }

    def extra_repr(self) -> str:
        return "eval-only, BN folded"
