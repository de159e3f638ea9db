"""RLN training: the official recipe (DESIGN "Training"), every constant in TrainConfig; resumable.

One step: pick the next volume (volumes visited in a shuffled order, reshuffled each
pass), cut ``batch_size`` random crops from it (a crop is redrawn while its GT mean is
below ``crop_min_ratio`` × the volume's GT mean, at most ``crop_retries`` times),
normalise each crop by its own percentiles, run the RLN, and take one Adam step on

    loss = e1_weight·mse(E1pre, f·GT + (1 − f)·x) + mse_weight·mse(out, GT) − log((1 + SSIM(out, GT)) / 2)

with f = ``e1_gt_fraction``, mse_weight 1 (the recipe) and SSIM one global window over the
batch. Crops are cut on the host; they are normalised with numpy on the CPU and with
torch.quantile on a GPU (the two agree up to float rounding).

Reproducibility: the model is initialised from ``torch.Generator().manual_seed(seed)``;
the volume order, crop positions and augmentation come from one
``numpy.random.default_rng(seed)`` stream; synthetic volumes are pure functions of their
seeds. A checkpoint holds the model, the optimizer, that stream's state, the order and
the step, so a run killed and resumed gives the same losses as an unbroken run (bit for
bit on the CPU; on a GPU as far as its kernels are deterministic).

Files in ``out_dir``: ``checkpoint.pt`` (latest, written atomically), ``model.pt``
(``RLN.save`` format, at the end), ``loss.csv`` (step, loss parts, lr), ``val.csv``
(step, PSNR, SSIM on held-out volumes), ``loss.png`` (when matplotlib is installed).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rln_fast.models.rln import RLN, _check_width

__all__ = [
    "TrainConfig", "train", "learning_rate", "global_ssim", "rln_loss", "normalize_crop", "default_psf",
    "toward_flip_mean", "generate_pairs", "CHECKPOINT_NAME", "MODEL_NAME", "LOSS_CSV", "VAL_CSV",
]

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
LOSS_CSV = "loss.csv"
VAL_CSV = "val.csv"
LOSS_PNG = "loss.png"

_CKPT_FORMAT = "rln_fast.train_checkpoint"
_CKPT_VERSION = 1
_LOSS_FIELDS = ("step", "loss", "mse_e1", "mse_out", "ssim", "ssim_term", "lr")
_VAL_FIELDS = ("step", "psnr", "ssim")
# Config fields that do not change the loss trajectory: a resumed run may change them.
_RESUME_FREE = {"steps", "checkpoint_every", "val_every", "device", "cache_volumes"}


@dataclass
class TrainConfig:
    """Every constant of the training recipe. Defaults follow DESIGN "Training".

    Data: ``data_dir`` is a folder with ``gt/`` and ``input/`` holding pairs under the
    same file names (TIFF, (z, y, x)), e.g. written by ``rln_fast.synth.write_pairs``;
    the last ``n_val`` pairs (sorted by name) are held out for validation. Without
    ``data_dir``, ``n_volumes`` pairs are generated on the fly with
    ``synth.phantom_pair(psf, phantom_shape, data_seed + i)`` and ``n_val`` validation
    pairs with seeds ``val_seed + j``, with the ``recipe`` of ``synth.phantom_pair``
    (``synth.RECIPES``: "official", "microscopy", "mixed" or "mixed_sparse"; validation pairs
    use the same recipe; "mixed" makes one volume in ``microscopy_every`` a microscopy one,
    the recipe's 2 the odd seeds). ``psf``: array (z, y, x) or TIFF path at the
    phantom's voxel size; None gives a Gaussian PSF, σ (z, y, x) = (2, 1, 1) voxels,
    15³ (``default_psf()``).

    Normalisation: ``norm_scope="crop"`` (the recipe) normalises each crop by its own
    percentiles; "volume" normalises by the percentiles of the whole volume the crops come
    from, as ``rln_deconvolve``'s default "global" mode does at inference. ``gain_augment``
    G > 1 (not the recipe; "volume" only) multiplies each normalised crop and its GT by a
    gain log-uniform in [1, G]: objects brighter than the normalisation's reference, as in a
    sparse volume whose 99.5th percentile is background. ``gain_weighted`` (with a gain) scores
    each crop's loss on the network's output and the crop divided by the crop's gain, so that a
    bright crop weighs as much as a dim one (its MSE would otherwise grow with the gain squared).

    Model: ``init_model`` (path of an ``RLN.save`` file) starts from those weights instead of
    a random initialisation (fine-tuning; not the recipe), at that model's width. ``width``
    (not the recipe unless 1) is the width of a randomly initialised ``RLN(width=...)``; with
    an ``init_model`` it must be None or that model's. ``gradients="paper"`` and ``bn="official"`` reproduce the released training
    graph (surrogate RL gradients, TF's running-variance update); "exact"/"torch" are
    the alternatives (see ``RLN``).
    """

    # data
    data_dir: str | None = None
    psf: Any = None
    n_volumes: int = 100
    phantom_shape: tuple[int, int, int] = (128, 128, 128)
    data_seed: int = 0
    cache_volumes: int = 100
    recipe: str = "official"
    # "mixed" only: one volume in this many a microscopy one (the recipe: 2; phantom_pair's)
    microscopy_every: int = 2
    # validation
    n_val: int = 2
    val_seed: int = 1_000_000
    val_every: int = 500
    # batches
    batch_size: int = 4
    crop: tuple[int, int, int] = (64, 64, 64)
    crop_min_ratio: float = 0.8
    crop_retries: int = 20
    norm_percentiles: tuple[float, float] = (0.01, 99.5)
    norm_scope: str = "crop"
    augment: bool = False
    gain_augment: float = 1.0
    gain_weighted: bool = False
    # model constraint (not the recipe): every conv kernel kept equal to its mirror images in
    # z, y and x, so that the network commutes with flips of even-sized volumes
    flip_symmetric: bool = False
    # model regulariser (not the recipe): after every step each conv kernel w moves
    # flip_decay of the way to its mean over the 8 flips, w <- w - flip_decay*(w - flip mean)
    flip_decay: float = 0.0
    # loss
    e1_weight: float = 0.1
    # the output's mse term (the recipe: 1; the SSIM term is then ~15x larger on a trained model)
    mse_weight: float = 1.0
    e1_gt_fraction: float = 0.8
    ssim_c1: float = 1e-4
    ssim_c2: float = 9e-4
    # optimiser and schedule
    steps: int = 10_000
    lr: float = 0.025
    lr_hold: int = 500
    lr_decay: float = 0.95
    lr_decay_steps: int = 500
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # model
    gradients: str = "paper"
    bn: str = "official"
    seed: int = 0
    init_model: str | None = None
    width: int | None = None
    # run
    device: str | None = None
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        self.phantom_shape = tuple(int(s) for s in self.phantom_shape)  # type: ignore[assignment]
        self.crop = tuple(int(s) for s in self.crop)  # type: ignore[assignment]
        self.norm_percentiles = tuple(float(p) for p in self.norm_percentiles)  # type: ignore[assignment]
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.crop) != 3 or min(self.crop) < 2:
            raise ValueError(f"TrainConfig.crop must be 3 sides >= 2 (z, y, x), got {self.crop}")
        positive = ("batch_size", "steps", "checkpoint_every", "val_every", "n_volumes",
                    "cache_volumes", "lr_decay_steps", "microscopy_every")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("n_val", "crop_retries", "lr_hold", "seed", "data_seed", "val_seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {v!r}")
        lo, hi = self.norm_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(
                f"TrainConfig.norm_percentiles must be (low, high) with 0 <= low < high <= 100, "
                f"got {self.norm_percentiles}"
            )
        if self.gradients not in ("exact", "paper"):
            raise ValueError(f"TrainConfig.gradients must be 'exact' or 'paper', got {self.gradients!r}")
        from rln_fast.synth import RECIPES  # noqa: PLC0415 - synth is imported only to generate data

        if self.recipe not in RECIPES:
            raise ValueError(
                f"TrainConfig.recipe must be one of {RECIPES}, got {self.recipe!r}"
            )
        if self.norm_scope not in ("crop", "volume"):
            raise ValueError(f"TrainConfig.norm_scope must be 'crop' or 'volume', got {self.norm_scope!r}")
        if not (math.isfinite(self.gain_augment) and self.gain_augment >= 1.0):
            raise ValueError(f"TrainConfig.gain_augment must be a finite number >= 1, got {self.gain_augment!r}")
        if self.gain_augment > 1.0 and self.norm_scope != "volume":
            raise ValueError("TrainConfig.gain_augment needs norm_scope='volume' (per-crop "
                             "normalisation would undo the gain)")
        if self.gain_weighted and self.gain_augment == 1.0:
            raise ValueError("TrainConfig.gain_weighted needs gain_augment > 1 (there is no gain "
                             "to weigh the loss by)")
        if not (math.isfinite(self.mse_weight) and self.mse_weight >= 0.0):
            raise ValueError(f"TrainConfig.mse_weight must be a finite number >= 0, got {self.mse_weight!r}")
        if not (math.isfinite(self.flip_decay) and 0.0 <= self.flip_decay < 1.0):
            raise ValueError(f"TrainConfig.flip_decay must be in [0, 1), got {self.flip_decay!r}")
        if self.flip_decay > 0.0 and self.flip_symmetric:
            raise ValueError("TrainConfig.flip_decay has no effect with flip_symmetric=True (the "
                             "kernels are already their flip means); set one of them")
        if self.init_model is not None and not Path(self.init_model).is_file():
            raise ValueError(f"TrainConfig.init_model: {self.init_model} is not a file")
        if self.width is not None:
            _check_width(self.width, "TrainConfig")  # None: the init model's width, or 1
        if self.bn not in ("torch", "official"):
            raise ValueError(f"TrainConfig.bn must be 'torch' or 'official', got {self.bn!r}")


# --------------------------------------------------------------------------- recipe parts


def flip_symmetrize(w: torch.Tensor, dims: Sequence[int] = (2, 3, 4)) -> torch.Tensor:
    """The mean of a conv weight [.., .., kz, ky, kx] over its flips of ``dims``: every
    combination of them, 8 for the default three spatial axes."""
    out = torch.zeros_like(w)
    for flips in itertools.product((False, True), repeat=len(dims)):
        flipped = [d for d, f in zip(dims, flips, strict=True) if f]
        out += w.flip(flipped) if flipped else w
    return out / 2 ** len(dims)


def toward_flip_mean(model: RLN, fraction: float) -> None:
    """Edit ``model`` in place: every conv kernel w becomes (1 − fraction)·w + fraction·(its
    mean over the 8 flips of z, y and x); batch norms and biases are kept. The default model's
    stages 5, 7 and 9 are this edit of the stage before at fraction 0.1."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    state = {k: (1 - fraction) * v + fraction * flip_symmetrize(v) if v.dim() == 5 else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)


def _flip_decay(model: RLN, rate: float) -> None:
    """Move every conv kernel ``rate`` of the way to its flip mean (``TrainConfig.flip_decay``):
    a pull towards flip-symmetric kernels that the loss's gradients can resist, where
    ``flip_symmetric`` forces them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 5:
                p.lerp_(flip_symmetrize(p), rate)


def _make_flip_symmetric(model: RLN) -> None:
    """Make every conv kernel of ``model`` flip-symmetric and keep it so under training.

    The weights are replaced by their flip means and their gradients are flip-averaged by a
    hook; Adam's elementwise update then keeps them symmetric. With symmetric kernels the RLN
    commutes with flips of the volume's axes (exactly for even sizes, where the half-resolution
    branch's 2×2×2 pooling grid is flip-invariant): what ``ensemble=8`` averages at 8× the cost.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 5:
                p.copy_(flip_symmetrize(p))
                p.register_hook(flip_symmetrize)


def learning_rate(step: int, config: TrainConfig | None = None) -> float:
    """lr for the update that follows ``step`` applied updates: lr0 while step <= hold,
    then lr0·decay**((step − hold)/decay_steps) (continuous)."""
    c = config or TrainConfig()
    if step <= c.lr_hold:
        return c.lr
    return c.lr * c.lr_decay ** ((step - c.lr_hold) / c.lr_decay_steps)


def global_ssim(a: torch.Tensor, b: torch.Tensor, c1: float = 1e-4, c2: float = 9e-4) -> torch.Tensor:
    """SSIM with one window over all of a and b (any equal shapes), population variances."""
    mu_a, mu_b = a.mean(), b.mean()
    da, db = a - mu_a, b - mu_b
    var_a, var_b, cov = (da * da).mean(), (db * db).mean(), (da * db).mean()
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def rln_loss(
    outputs: dict[str, torch.Tensor],
    x: torch.Tensor,
    gt: torch.Tensor,
    config: TrainConfig | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The recipe's loss from RLN intermediates (``RLN(x, return_intermediates=True)``).

    x, gt [N, 1, D, H, W] normalised crops. Returns (loss, parts) with parts mse_e1,
    mse_out, ssim and ssim_term = −log((1 + ssim)/2), all 0-d tensors.
    """
    c = config or TrainConfig()
    f = c.e1_gt_fraction
    mse_e1 = F.mse_loss(outputs["E1pre"], f * gt + (1.0 - f) * x)
    out = outputs["output"]
    mse_out = F.mse_loss(out, gt)
    ssim = global_ssim(out, gt, c.ssim_c1, c.ssim_c2)
    ssim_term = -torch.log((1.0 + ssim) / 2.0)
    loss = c.e1_weight * mse_e1 + c.mse_weight * mse_out + ssim_term
    return loss, {"mse_e1": mse_e1, "mse_out": mse_out, "ssim": ssim, "ssim_term": ssim_term}


def _unscale(
    outputs: dict[str, torch.Tensor], x: torch.Tensor, gt: torch.Tensor, gains: Sequence[float]
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The loss's operands divided by each crop's gain (``TrainConfig.gain_weighted``)."""
    g = torch.tensor(gains, dtype=x.dtype, device=x.device).view(-1, *([1] * (x.dim() - 1)))
    scaled = {k: outputs[k] / g for k in ("E1pre", "output")}
    return scaled, x / g, gt / g


def normalize_crop(a: np.ndarray, percentiles: Sequence[float] = (0.01, 99.5)) -> np.ndarray:
    """The official per-crop normalisation (float32): mi, ma = linear percentiles;
    a if ma == 0, a/ma if ma < 2·mi, else (a − mi)/(ma − mi + 1e-20). No clipping."""
    mi, ma = np.percentile(a, percentiles)
    a64 = a.astype(np.float64)
    if ma == 0:
        out = a64
    elif ma < 2 * mi:
        out = a64 / ma
    else:
        out = (a64 - mi) / (ma - mi + 1e-20)
    return out.astype(np.float32)


def _normalize_torch(t: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """normalize_crop for every item of t [N, ...] at once, on t's device (float64 inside).

    Used on CUDA, where np.percentile on the host would stall the GPU for longer than a
    training step; equal to normalize_crop up to float rounding.
    """
    flat = t.reshape(t.shape[0], -1).double()
    q = torch.tensor([p / 100.0 for p in percentiles], dtype=torch.float64, device=t.device)
    mi, ma = torch.quantile(flat, q, dim=1)  # [N] each, linear interpolation
    view = (-1,) + (1,) * (t.dim() - 1)
    mi, ma, x = mi.view(view), ma.view(view), t.double()
    out = torch.where(ma == 0, x, torch.where(ma < 2 * mi, x / ma, (x - mi) / (ma - mi + 1e-20)))
    return out.to(t.dtype)


def _draw_crop(
    gt: np.ndarray,
    crop: Sequence[int],
    rng: np.random.Generator,
    threshold: float,
    retries: int,
) -> tuple[tuple[int, int, int], int]:
    """A crop start (z, y, x) whose GT mean >= threshold, redrawn at most ``retries`` times
    (then the last draw is taken). Returns (start, number of draws)."""
    draws = 0
    while True:
        start = tuple(int(rng.integers(0, s - c + 1)) for s, c in zip(gt.shape, crop, strict=True))
        draws += 1
        sl = tuple(slice(s, s + c) for s, c in zip(start, crop, strict=True))
        if gt[sl].mean(dtype=np.float64) >= threshold or draws > retries:
            return start, draws  # type: ignore[return-value]


def _augment(arrs: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    # Flips on each axis and a rot90 in the (y, x) plane only: the PSF is anisotropic in z.
    flips = rng.integers(0, 2, size=3)
    k = int(rng.integers(0, 4))
    out = []
    for a in arrs:
        for axis in range(3):
            if flips[axis]:
                a = np.flip(a, axis)
        out.append(np.ascontiguousarray(np.rot90(a, k, axes=(1, 2))))
    return out


def default_psf() -> np.ndarray:
    """The PSF used when TrainConfig.psf is None: Gaussian, σ (z, y, x) = (2, 1, 1) voxels, 15³."""
    from rln_fast import psf

    return psf.gaussian((15, 15, 15), 1.0, sigma=(2.0, 1.0, 1.0))


# --------------------------------------------------------------------------- data


class _Volumes:
    """Training and validation pairs (gt, input, gt mean), loaded or generated on demand."""

    def __init__(self, c: TrainConfig, pairs: MutableMapping[tuple, tuple[np.ndarray, np.ndarray]] | None = None
                 ) -> None:
        self.c = c
        self._cache: OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray, float]] = OrderedDict()
        self._psf: np.ndarray | None = None
        self._psf_digest: str | None = None
        self._pairs = pairs  # generated (gt, raw) pairs shared with other runs (train's pair_cache)
        if c.data_dir is not None:
            root = Path(c.data_dir)
            names = self._pair_names(root)
            if len(names) <= c.n_val:
                raise ValueError(
                    f"{root}: {len(names)} pairs, but n_val={c.n_val} are held out for "
                    "validation; add pairs or lower TrainConfig.n_val"
                )
            cut = len(names) - c.n_val
            self.train = [("file", n) for n in names[:cut]]
            self.val = [("file", n) for n in names[cut:]]
        else:
            lo, hi = c.data_seed, c.data_seed + c.n_volumes
            if c.n_val and not (c.val_seed >= hi or c.val_seed + c.n_val <= lo):
                raise ValueError(
                    f"TrainConfig: validation seeds [{c.val_seed}, {c.val_seed + c.n_val}) overlap "
                    f"training seeds [{lo}, {hi}); move val_seed"
                )
            self.train = [("synth", lo + i) for i in range(c.n_volumes)]
            self.val = [("synth", c.val_seed + j) for j in range(c.n_val)]

    @staticmethod
    def _pair_names(root: Path) -> list[str]:
        dirs = [root / "gt", root / "input"]
        for d in dirs:
            if not d.is_dir():
                raise FileNotFoundError(
                    f"{root}: expected folders gt/ and input/ with pairs under the same names "
                    f"(see rln_fast.synth.write_pairs); {d.name}/ is missing"
                )
        sets = [
            {p.name for p in d.iterdir() if p.suffix.lower() in (".tif", ".tiff")
             and not p.name.startswith(".")}
            for d in dirs
        ]
        if sets[0] != sets[1]:
            only = sorted(sets[0] ^ sets[1])[:5]
            raise ValueError(f"{root}: gt/ and input/ hold different file names, e.g. {only}")
        if not sets[0]:
            raise ValueError(f"{root}: gt/ and input/ hold no .tif files")
        return sorted(sets[0])

    def psf(self) -> np.ndarray:
        if self._psf is None:
            p = self.c.psf
            if p is None:
                p = default_psf()
            elif isinstance(p, (str, os.PathLike)):
                import tifffile

                p = tifffile.imread(p)
            self._psf = np.asarray(p, dtype=np.float32)
        return self._psf

    def _load(self, key: tuple[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
        kind, ref = key
        if kind == "file":
            import tifffile

            root = Path(self.c.data_dir)  # type: ignore[arg-type]
            gt = np.asarray(tifffile.imread(root / "gt" / ref), dtype=np.float32)
            inp = np.asarray(tifffile.imread(root / "input" / ref), dtype=np.float32)
            if gt.shape != inp.shape or gt.ndim != 3:
                raise ValueError(
                    f"{root}: pair {ref} has gt shape {gt.shape} and input shape {inp.shape}; "
                    "expected two equal 3-D (z, y, x) volumes"
                )
        else:
            gt, inp = self._generate(ref)
        if any(s < c for s, c in zip(gt.shape, self.c.crop, strict=True)):
            raise ValueError(
                f"volume {ref} has shape {gt.shape}, smaller than the crop {self.c.crop}; "
                "lower TrainConfig.crop"
            )
        if self.c.norm_scope == "volume" and kind == "synth" and self._pairs is not None:
            # Shared too: the percentiles of a 128³ pair cost ~0.1 s, a stage's first epoch ~20 s.
            norm_key = (self.pair_key(ref), "volume", self.c.norm_percentiles)
            if norm_key not in self._pairs:
                self._pairs[norm_key] = self._normalized(gt, inp)
            return self._pairs[norm_key]
        return self._normalized(gt, inp)

    def _normalized(self, gt: np.ndarray, inp: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        mean = float(gt.mean(dtype=np.float64))
        if self.c.norm_scope == "volume":
            # Normalised once, whole volume: crops are then cut from normalised arrays.
            inp = normalize_crop(inp, self.c.norm_percentiles)
            gt = np.maximum(normalize_crop(gt, self.c.norm_percentiles), 0.0)
            inp.setflags(write=False)
            gt.setflags(write=False)
        return gt, inp, mean

    def pair_key(self, seed: int) -> tuple:
        """The key of seed's generated pair in a shared cache: the same seed, shape, PSF and
        generator give the same pair whatever the recipe."""
        from rln_fast import synth

        if self._psf_digest is None:
            self._psf_digest = hashlib.sha1(self.psf().tobytes()).hexdigest()
        return (self._psf_digest, self.psf().shape, self.c.phantom_shape, seed,
                synth.pair_kind(seed, self.c.recipe, self.c.microscopy_every))

    def job(self, seed: int, threads: int | None = None) -> tuple:
        """The arguments of ``_generate_pair`` for seed's pair."""
        return (self.psf(), self.c.phantom_shape, seed, self.c.recipe, self.c.microscopy_every, threads)

    def _generate(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if self._pairs is None:
            return _generate_pair(self.job(seed))
        key = self.pair_key(seed)
        if key not in self._pairs:
            self._pairs[key] = _shared(_generate_pair(self.job(seed)))
        return self._pairs[key]

    def get(self, key: tuple[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        item = self._load(key)
        self._cache[key] = item
        while len(self._cache) > self.c.cache_volumes:
            self._cache.popitem(last=False)
        return item


def _generate_pair(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """synth.phantom_pair(psf, shape, seed, recipe=..., microscopy_every=...); ``threads``
    (the job's last item), when set, is the process's torch threads (a worker of
    generate_pairs)."""
    from rln_fast import synth

    psf, shape, seed, recipe, every, threads = job
    if threads is not None:
        torch.set_num_threads(threads)
    return synth.phantom_pair(psf, shape, seed, recipe=recipe, microscopy_every=every)


def _shared(pair: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    for a in pair:
        a.setflags(write=False)  # shared between runs: normalising makes new arrays
    return pair


def generate_pairs(configs: Sequence[TrainConfig], pair_cache: MutableMapping[tuple, tuple[np.ndarray, np.ndarray]],
                   workers: int | None = None, progress: bool = False) -> int:
    """Generate, in ``workers`` processes (default: one per CPU core, one torch thread each),
    every synthetic pair that ``train(config, ..., pair_cache=pair_cache)`` would generate for
    each of ``configs`` (training and validation seeds), and store them in ``pair_cache``.
    The pairs are the ones ``train`` would make itself, one by one on first use. Returns how
    many were generated (pairs already in the cache are kept)."""
    import concurrent.futures
    import multiprocessing

    jobs: dict[tuple, tuple] = {}
    for c in configs:
        if c.data_dir is not None:
            continue
        volumes = _Volumes(c, pair_cache)
        for _, seed in volumes.train + volumes.val:
            key = volumes.pair_key(seed)
            if key not in pair_cache and key not in jobs:
                jobs[key] = volumes.job(seed, threads=1)
    if not jobs:
        return 0
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="training volumes", unit="volume")
    # spawn, not fork: a forked child of a process that has run torch's thread pools can hang.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_generate_pair, job): key for key, job in jobs.items()}
        for f in concurrent.futures.as_completed(futures):
            pair_cache[futures[f]] = _shared(f.result())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return len(jobs)


class _Stream:
    """The seeded data stream: volume order, crops and augmentation; its state checkpoints."""

    def __init__(self, c: TrainConfig, volumes: _Volumes) -> None:
        self.c = c
        self.volumes = volumes
        self.rng = np.random.default_rng(c.seed)
        self.order: list[int] = []
        self.pos = 0
        self.gains: list[float] = []  # the gain of each crop of the last batch (1 without gain_augment)

    def state(self) -> dict[str, Any]:
        return {"rng": json.dumps(self.rng.bit_generator.state), "order": list(self.order),
                "pos": self.pos}

    def load_state(self, s: dict[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(s["rng"])
        self.order = [int(i) for i in s["order"]]
        self.pos = int(s["pos"])

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, gt) float32 [batch, 1, *crop]: raw crops (see ``_to_device`` for normalising)."""
        c = self.c
        if self.pos >= len(self.order):
            self.order = [int(i) for i in self.rng.permutation(len(self.volumes.train))]
            self.pos = 0
        gt, inp, mean = self.volumes.get(self.volumes.train[self.order[self.pos]])
        self.pos += 1
        xs, gts = [], []
        self.gains = []
        for _ in range(c.batch_size):
            threshold = c.crop_min_ratio * (mean if c.norm_scope == "crop" else float(gt.mean(dtype=np.float64)))
            start, _ = _draw_crop(gt, c.crop, self.rng, threshold, c.crop_retries)
            sl = tuple(slice(s, s + n) for s, n in zip(start, c.crop, strict=True))
            x_c, g_c = inp[sl], gt[sl]
            if c.augment:
                x_c, g_c = _augment([x_c, g_c], self.rng)
            if c.gain_augment > 1.0:
                # The same scene brighter than the normalisation's reference (a sparse volume
                # whose 99.5th percentile is background): input and GT scaled alike.
                gain = float(np.exp(self.rng.uniform(0.0, math.log(c.gain_augment))))
                x_c, g_c = x_c * np.float32(gain), g_c * np.float32(gain)
            else:
                gain = 1.0
            self.gains.append(gain)
            xs.append(x_c)
            gts.append(g_c)
        return np.stack(xs)[:, None], np.stack(gts)[:, None]


def _to_device(
    x: np.ndarray, gt: np.ndarray, c: TrainConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw crops [N, 1, *crop] -> normalised tensors on device: each crop by its own
    percentiles, GT then max(0, ·). numpy on the CPU, torch.quantile on other devices.
    With norm_scope "volume" the crops come normalised already."""
    if c.norm_scope == "volume":
        return torch.from_numpy(x).to(device), torch.from_numpy(gt).to(device)
    if device.type == "cpu":
        xn = np.stack([normalize_crop(a, c.norm_percentiles) for a in x])
        gn = np.stack([np.maximum(normalize_crop(a, c.norm_percentiles), 0.0) for a in gt])
        return torch.from_numpy(xn), torch.from_numpy(gn)
    xt = _normalize_torch(torch.from_numpy(x).to(device), c.norm_percentiles)
    gt_t = _normalize_torch(torch.from_numpy(gt).to(device), c.norm_percentiles).clamp_min_(0.0)
    return xt, gt_t


# --------------------------------------------------------------------------- files


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fingerprint(c: TrainConfig) -> dict[str, Any]:
    """The config as JSON-able values; an array PSF becomes its sha256."""
    d = dataclasses.asdict(c)
    p = c.psf
    if p is not None and not isinstance(p, (str, os.PathLike)):
        arr = np.ascontiguousarray(np.asarray(p, dtype=np.float32))
        d["psf"] = "sha256:" + hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()
    elif p is not None:
        d["psf"] = os.fspath(p)
    return json.loads(json.dumps(d))


def _read_csv(path: Path, upto: int) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto]


def _rewrite_csv(path: Path, fields: Sequence[str], rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fields))
            w.writeheader()
            w.writerows(rows)

    _atomic(path, write)


def _plot(out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = _read_csv(out / LOSS_CSV, 1 << 62)
    if not rows:
        return
    val = _read_csv(out / VAL_CSV, 1 << 62)
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10 if val else 5, 4), squeeze=False)
    ax = axes[0, 0]
    steps = [int(r["step"]) for r in rows]
    for key in ("loss", "mse_out", "ssim_term", "mse_e1"):
        ax.plot(steps, [float(r[key]) for r in rows], label=key, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    if val:
        ax = axes[0, 1]
        ax.plot([int(r["step"]) for r in val], [float(r["psnr"]) for r in val], "o-")
        ax.set_xlabel("step")
        ax.set_ylabel("validation PSNR (dB)")
    fig.tight_layout()
    _atomic(out / LOSS_PNG, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# --------------------------------------------------------------------------- training


def _validate(model: RLN, volumes: _Volumes, c: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean PSNR (dB, data range of the normalised GT) and global SSIM over the held-out pairs."""
    was_training = model.training
    model.eval()
    psnrs, ssims = [], []
    try:
        with torch.no_grad():
            for key in volumes.val:
                gt, inp, _ = volumes.get(key)
                if c.norm_scope == "crop":
                    inp = normalize_crop(inp, c.norm_percentiles)
                    gt = np.maximum(normalize_crop(gt, c.norm_percentiles), 0.0)
                x = torch.tensor(inp, device=device)  # a copy: cached volumes are read-only
                g = torch.tensor(gt, device=device)
                y = model(x[None, None])[0, 0]
                mse = float(((y - g) ** 2).mean())
                rng = float(g.max() - g.min())
                psnrs.append(10.0 * math.log10(rng * rng / mse) if mse > 0 else math.inf)
                ssims.append(float(global_ssim(y, g, c.ssim_c1, c.ssim_c2)))
    finally:
        model.train(was_training)
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}


def _save_checkpoint(path: Path, step: int, model: RLN, opt: torch.optim.Optimizer,
                     stream: _Stream, c: TrainConfig) -> None:
    blob = {
        "format": _CKPT_FORMAT,
        "version": _CKPT_VERSION,
        "step": step,
        "config": json.dumps(_fingerprint(c)),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "data": stream.state(),
        "torch_rng": torch.get_rng_state(),
    }
    _atomic(path, lambda tmp: torch.save(blob, tmp))


def _load_checkpoint(path: Path, c: TrainConfig, device: torch.device) -> dict[str, Any]:
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: not a readable training checkpoint ({type(e).__name__}: {e}); "
            "delete it or pass resume=False"
        ) from e
    if not isinstance(blob, dict) or blob.get("format") != _CKPT_FORMAT:
        raise ValueError(f"{path}: not an rln_fast training checkpoint; pass resume=False")
    if blob.get("version") != _CKPT_VERSION:
        raise ValueError(f"{path}: checkpoint version {blob.get('version')!r}, expected {_CKPT_VERSION}")
    old, new = json.loads(blob["config"]), _fingerprint(c)
    # A field added after the checkpoint was written stands at its default there.
    defaults = _fingerprint(TrainConfig())
    old = {**{k: defaults[k] for k in set(new) - set(old) if k in defaults}, **old}
    diff = sorted(k for k in set(old) | set(new)
                  if k not in _RESUME_FREE and old.get(k) != new.get(k))
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ValueError(
            f"{path}: the checkpoint was written with another config ({detail}); "
            "use the same config, another out_dir, or resume=False"
        )
    return blob


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    pair_cache: MutableMapping[tuple, tuple[np.ndarray, np.ndarray]] | None = None,
) -> RLN:
    """Train an RLN with ``config``, writing checkpoints and logs into ``out_dir``.

    resume: continue from ``out_dir/checkpoint.pt`` when present (the config must match,
    except steps, checkpoint_every, val_every, device, cache_volumes); otherwise start
    afresh, overwriting the logs. callback(step, row) runs after every update with the
    logged values (step = updates applied); an exception it raises stops the run, and a
    re-run resumes from the last checkpoint. pair_cache: a dict the
    caller keeps across runs (e.g. the stages of a chain) to generate each synthetic pair
    once; it holds every pair generated (raw, before normalisation) and, with norm_scope
    "volume", each normalised pair for each percentiles used, so it grows by two
    phantom-sized float32 volumes per seed and per percentiles. Returns the trained model in eval mode on the
    training device; it is also saved as ``out_dir/model.pt``.
    """
    c = config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    start = RLN.load(c.init_model) if c.init_model is not None else None
    if start is not None and c.width not in (None, start.width):
        raise ValueError(f"TrainConfig.width={c.width}, but init_model {c.init_model} has width "
                         f"{start.width} (RLN.widened makes a wider start)")
    width = start.width if start is not None else (c.width or 1)
    model = RLN(gradients=c.gradients, bn=c.bn, width=width)
    model.reset_parameters(generator=torch.Generator().manual_seed(c.seed))
    if start is not None:  # its width too (RLN.widened makes wider starts)
        model.load_state_dict(start.state_dict())
    if c.flip_symmetric:
        _make_flip_symmetric(model)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, betas=c.betas, eps=c.adam_eps)
    volumes = _Volumes(c, pair_cache)
    stream = _Stream(c, volumes)

    step = 0
    ckpt_path = out / CHECKPOINT_NAME
    if not resume and ckpt_path.exists():
        ckpt_path.unlink()  # else a run killed before its first checkpoint resumes the old one
    if resume and ckpt_path.exists():
        blob = _load_checkpoint(ckpt_path, c, device)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        stream.load_state(blob["data"])
        torch.set_rng_state(blob["torch_rng"].cpu())
        step = int(blob["step"])
    # Rows logged after the checkpoint (a killed run) are redone: drop them.
    _rewrite_csv(out / LOSS_CSV, _LOSS_FIELDS, _read_csv(out / LOSS_CSV, step) if step else [])
    _rewrite_csv(out / VAL_CSV, _VAL_FIELDS, _read_csv(out / VAL_CSV, step) if step else [])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, initial=min(step, c.steps), desc="RLN training", unit="step")
    try:
        with open(out / LOSS_CSV, "a", newline="") as loss_file:
            loss_log = csv.DictWriter(loss_file, fieldnames=list(_LOSS_FIELDS))
            while step < c.steps:
                x, gt = _to_device(*stream.next_batch(), c, device)
                lr = learning_rate(step, c)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                outputs = model(x, return_intermediates=True)
                if c.gain_weighted:
                    outputs, x, gt = _unscale(outputs, x, gt, stream.gains)
                loss, parts = rln_loss(outputs, x, gt, c)
                loss.backward()
                opt.step()
                if c.flip_decay > 0.0:
                    _flip_decay(model, c.flip_decay)
                step += 1

                vals = torch.stack([loss.detach(), *(p.detach() for p in parts.values())]).tolist()
                if not all(math.isfinite(v) for v in vals):
                    raise FloatingPointError(
                        f"RLN training: the loss is not finite at step {step} ({vals}); lower "
                        "TrainConfig.lr or check the data (empty or constant volumes?)"
                    )
                row = {"step": step, "loss": vals[0], **dict(zip(parts, vals[1:], strict=True)),
                       "lr": lr}
                loss_log.writerow(row)
                loss_file.flush()
                if step % c.checkpoint_every == 0 or step == c.steps:
                    _save_checkpoint(ckpt_path, step, model, opt, stream, c)
                    _plot(out)
                if volumes.val and (step % c.val_every == 0 or step == c.steps):
                    v = _validate(model, volumes, c, device)
                    with open(out / VAL_CSV, "a", newline="") as f:
                        csv.DictWriter(f, fieldnames=list(_VAL_FIELDS)).writerow({"step": step, **v})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{vals[0]:.4f}", lr=f"{lr:.2e}")
                if callback is not None:
                    callback(step, row)
    finally:
        if bar is not None:
            bar.close()

    model.eval()
    model.metadata = {"trained_by": "rln_fast.train", "steps": step,
                      "config": json.dumps(_fingerprint(c)),
                      # What rln_deconvolve normalises this model's input by (norm_percentiles).
                      "norm_percentiles": list(c.norm_percentiles)}
    _atomic(out / MODEL_NAME, model.save)
    _plot(out)
    return model
