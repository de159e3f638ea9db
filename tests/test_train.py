"""rln_fast.train: recipe parts (lr, SSIM, loss, crops, normalisation) and resumable training."""

from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest
import torch

from rln_fast import synth
from rln_fast.models.rln import RLN
from rln_fast.train import (
    CHECKPOINT_NAME,
    LOSS_CSV,
    MODEL_NAME,
    VAL_CSV,
    TrainConfig,
    _augment,
    _draw_crop,
    _normalize_torch,
    _Stream,
    _unscale,
    _Volumes,
    flip_symmetrize,
    global_ssim,
    learning_rate,
    normalize_crop,
    rln_loss,
    train,
)


def _tiny(**kw) -> TrainConfig:
    base = dict(
        phantom_shape=(24, 24, 24), n_volumes=2, n_val=1, crop=(16, 16, 16), batch_size=2,
        steps=6, checkpoint_every=3, val_every=3, device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_learning_rate_schedule():
    c = TrainConfig()
    assert learning_rate(0, c) == 0.025
    assert learning_rate(500, c) == 0.025
    assert math.isclose(learning_rate(1000, c), 0.025 * 0.95)
    assert math.isclose(learning_rate(750, c), 0.025 * 0.95**0.5)
    assert math.isclose(learning_rate(10_500, c), 0.025 * 0.95**20)
    c2 = TrainConfig(lr=0.01, lr_hold=0, lr_decay=0.5, lr_decay_steps=10)
    assert learning_rate(0, c2) == 0.01 and math.isclose(learning_rate(20, c2), 0.0025)


def test_global_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 8, 8, 8, generator=g)
    assert float(global_ssim(a, a)) == pytest.approx(1.0, abs=1e-6)
    b = torch.rand(2, 1, 8, 8, 8, generator=g)
    ma, mb = a.double().mean(), b.double().mean()
    va, vb = a.double().var(correction=0), b.double().var(correction=0)
    cov = ((a.double() - ma) * (b.double() - mb)).mean()
    ref = (2 * ma * mb + 1e-4) * (2 * cov + 9e-4) / ((ma**2 + mb**2 + 1e-4) * (va + vb + 9e-4))
    assert float(global_ssim(a, b)) == pytest.approx(float(ref), rel=1e-5)


def test_loss_formula():
    g = torch.Generator().manual_seed(1)
    x, gt = torch.rand(2, 1, 8, 8, 8, generator=g), torch.rand(2, 1, 8, 8, 8, generator=g)
    outs = {"E1pre": torch.rand(2, 1, 8, 8, 8, generator=g), "output": gt.clone()}
    loss, parts = rln_loss(outs, x, gt)
    e1 = ((outs["E1pre"] - 0.8 * gt - 0.2 * x) ** 2).mean()
    assert float(parts["mse_out"]) == 0.0 and float(parts["ssim"]) == pytest.approx(1.0)
    assert float(loss) == pytest.approx(0.1 * float(e1), abs=1e-6)


def test_mse_weight_scales_only_the_outputs_mse_term():
    g = torch.Generator().manual_seed(2)
    x, gt = torch.rand(2, 1, 8, 8, 8, generator=g), torch.rand(2, 1, 8, 8, 8, generator=g)
    outs = {"E1pre": torch.rand(2, 1, 8, 8, 8, generator=g), "output": torch.rand(2, 1, 8, 8, 8, generator=g)}
    base, parts = rln_loss(outs, x, gt)
    heavy, heavy_parts = rln_loss(outs, x, gt, TrainConfig(mse_weight=10.0))
    assert float(parts["mse_out"]) > 0.0
    assert float(heavy - base) == pytest.approx(9.0 * float(parts["mse_out"]), rel=1e-5)
    for k in parts:
        assert float(heavy_parts[k]) == float(parts[k])
    none, _ = rln_loss(outs, x, gt, TrainConfig(mse_weight=0.0))
    assert float(base - none) == pytest.approx(float(parts["mse_out"]), rel=1e-5)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mse_weight"):
            TrainConfig(mse_weight=bad)


def test_normalize_crop_rules():
    a = np.linspace(0, 10, 1001, dtype=np.float32)
    mi, ma = np.percentile(a, (0.01, 99.5))
    np.testing.assert_allclose(normalize_crop(a), (a - mi) / (ma - mi), rtol=1e-5, atol=1e-6)
    b = a + 100.0  # ma < 2·mi: divide by ma only
    np.testing.assert_allclose(normalize_crop(b), b / np.percentile(b, 99.5), rtol=1e-6)
    z = np.zeros(10, np.float32)
    np.testing.assert_array_equal(normalize_crop(z), z)
    assert normalize_crop(a).min() < 0 and normalize_crop(a).max() > 1  # no clipping


def test_normalize_torch_matches_numpy():
    g = np.random.default_rng(0)
    crops = np.stack([
        g.gamma(2.0, 50.0, (12, 12, 12)),  # (x - mi)/(ma - mi)
        100.0 + g.random((12, 12, 12)),  # ma < 2·mi
        np.zeros((12, 12, 12)),  # ma == 0
    ]).astype(np.float32)[:, None]
    got = _normalize_torch(torch.from_numpy(crops), (0.01, 99.5)).numpy()
    for a, b in zip(got, crops, strict=True):
        np.testing.assert_allclose(a, normalize_crop(b), rtol=1e-6, atol=1e-6)


def test_crop_redraw_bounded():
    gt = np.zeros((20, 20, 20), np.float32)
    gt[0, 0, 0] = 1.0
    rng = np.random.default_rng(0)
    # No 8³ crop reaches this threshold: redrawn exactly `retries` times, then accepted.
    start, draws = _draw_crop(gt, (8, 8, 8), rng, threshold=1.0, retries=20)
    assert draws == 21
    assert all(0 <= s <= 12 for s in start)
    start, draws = _draw_crop(gt, (8, 8, 8), rng, threshold=0.0, retries=20)
    assert draws == 1
    # A bright corner: crops are redrawn until they cover it.
    gt[:4, :4, :4] = 10.0
    for _ in range(10):
        start, draws = _draw_crop(gt, (16, 16, 16), rng, threshold=0.8 * gt.mean(), retries=1000)
        assert gt[start[0]:start[0] + 16, start[1]:start[1] + 16, start[2]:start[2] + 16].mean() >= 0.8 * gt.mean()


def test_augment_keeps_pairs_aligned():
    a = np.arange(4 * 5 * 5, dtype=np.float32).reshape(4, 5, 5)
    rng = np.random.default_rng(3)
    for _ in range(8):
        x, y = _augment([a, 2 * a], rng)
        np.testing.assert_array_equal(y, 2 * x)
        assert x.shape == a.shape and x.flags.c_contiguous


def test_config_checks():
    with pytest.raises(ValueError, match="crop"):
        TrainConfig(crop=(1, 16, 16))
    with pytest.raises(ValueError, match="gradients"):
        TrainConfig(gradients="approx")
    for width in (0, 1.5, True):
        with pytest.raises(ValueError, match="width"):
            TrainConfig(width=width)
    with pytest.raises(ValueError, match="norm_percentiles"):
        TrainConfig(norm_percentiles=(99.5, 0.01))
    with pytest.raises(ValueError, match="recipe"):
        TrainConfig(recipe="widefield")
    with pytest.raises(ValueError, match="norm_scope"):
        TrainConfig(norm_scope="tile")
    with pytest.raises(ValueError, match="init_model"):
        TrainConfig(init_model="/nonexistent/model.pt")
    with pytest.raises(ValueError, match="microscopy_every"):
        TrainConfig(recipe="mixed", microscopy_every=0)


def test_the_mixed_recipes_share_reaches_the_training_data(tmp_path, monkeypatch):
    from rln_fast import synth

    asked = []

    def pair(psf, shape, seed, device=None, *, recipe="official", microscopy_every=2):
        asked.append((seed, recipe, microscopy_every))
        gt = np.random.default_rng(seed).random(shape, dtype=np.float32) + 1.0
        return gt, gt.copy()

    monkeypatch.setattr(synth, "phantom_pair", pair)
    train(_tiny(steps=1, n_val=1, recipe="mixed", microscopy_every=3), tmp_path, progress=False)
    assert asked and all(a[1:] == ("mixed", 3) for a in asked)


def test_a_shared_pair_cache_generates_each_pair_once_and_changes_nothing(tmp_path, monkeypatch):
    calls = []
    real = synth.phantom_pair
    monkeypatch.setattr(synth, "phantom_pair", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    # Two chained runs: mixed one in 2, then one in 3 at other percentiles, both per volume.
    first = _tiny(steps=3, n_volumes=3, recipe="mixed", norm_scope="volume")
    second = _tiny(steps=3, n_volumes=3, recipe="mixed", microscopy_every=3, norm_scope="volume",
                   norm_percentiles=(0.01, 99.99))
    cache: dict = {}
    shared = [train(c, tmp_path / f"shared{i}", progress=False, pair_cache=cache)
              for i, c in enumerate((first, second))]
    # Seeds 0-2 (one epoch each) and validation seed 1,000,000 (official in both): seed 1 is
    # microscopy in the first run only and seed 2 in the second only, so they are generated
    # twice; seeds 0 and 1,000,000 once.
    assert sorted(calls) == [0, 1, 1, 2, 2, 1_000_000]
    # raw pairs, and the normalised ones of each percentiles (the same for both runs' seed 0)
    assert len(cache) == 6 + 2 * 4
    assert all(not a.flags.writeable for pair in cache.values() for a in pair if isinstance(a, np.ndarray))
    calls.clear()
    alone = [train(c, tmp_path / f"alone{i}", progress=False) for i, c in enumerate((first, second))]
    assert len(calls) == 8  # 4 per run
    for i, (a, b) in enumerate(zip(shared, alone, strict=True)):
        assert _rows(tmp_path / f"shared{i}" / LOSS_CSV) == _rows(tmp_path / f"alone{i}" / LOSS_CSV)
        for k, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)


def test_pairs_generated_in_worker_processes_are_the_ones_train_makes(tmp_path, monkeypatch):
    from rln_fast.train import generate_pairs

    configs = [_tiny(steps=3, n_volumes=3, recipe="mixed"), _tiny(steps=3, n_volumes=3, recipe="mixed",
                                                                   microscopy_every=3)]
    cache: dict = {}
    # seeds 0-2 and validation seed 1,000,000, of which seeds 1 and 2 change kind: 6 pairs
    assert generate_pairs(configs, cache, workers=2) == 6 and len(cache) == 6
    assert generate_pairs(configs, cache, workers=2) == 0  # all there
    calls = []
    real = synth.phantom_pair
    monkeypatch.setattr(synth, "phantom_pair", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    pre = train(configs[1], tmp_path / "pre", progress=False, pair_cache=cache)
    assert calls == []  # nothing left to generate
    alone = train(configs[1], tmp_path / "alone", progress=False)
    assert _rows(tmp_path / "pre" / LOSS_CSV) == _rows(tmp_path / "alone" / LOSS_CSV)
    for k, v in pre.state_dict().items():
        torch.testing.assert_close(alone.state_dict()[k], v, rtol=0, atol=0)


def test_pair_kind_names_the_generator_phantom_pair_uses():
    assert [synth.pair_kind(s, "mixed", 4) for s in range(4)] == ["official"] * 3 + ["microscopy"]
    assert [synth.pair_kind(s, "mixed_sparse") for s in range(3)] == ["official", "microscopy", "sparse"]
    assert synth.pair_kind(3, "official", 4) == "official" and synth.pair_kind(0, "microscopy") == "microscopy"
    with pytest.raises(ValueError, match="recipe"):
        synth.pair_kind(0, "confocal")
    with pytest.raises(ValueError, match="seed"):
        synth.pair_kind(-1, "mixed")


def test_loss_decreases(tmp_path):
    c = _tiny(steps=16, n_volumes=1, n_val=0, checkpoint_every=100)
    model = train(c, tmp_path, progress=False)
    losses = [float(r["loss"]) for r in _rows(tmp_path / LOSS_CSV)]
    assert len(losses) == 16
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert isinstance(model, RLN) and not model.training
    saved = RLN.load(tmp_path / MODEL_NAME)
    assert saved.metadata["steps"] == 16
    # The normalisation it trained with travels with it, for rln_deconvolve.
    assert saved.metadata["norm_percentiles"] == list(c.norm_percentiles)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[k], v.cpu(), rtol=0, atol=0)


class _Kill(Exception):
    pass


def test_resume_reproduces_unbroken_run(tmp_path):
    c = _tiny(steps=7)
    whole = train(c, tmp_path / "whole", progress=False)

    def kill_at_5(step, row):
        if step == 5:
            raise _Kill

    with pytest.raises(_Kill):  # dies after the checkpoint at step 3: steps 4, 5 are redone
        train(c, tmp_path / "broken", progress=False, callback=kill_at_5)
    assert [r["step"] for r in _rows(tmp_path / "broken" / LOSS_CSV)] == ["1", "2", "3", "4", "5"]
    seen: list[int] = []
    resumed = train(c, tmp_path / "broken", progress=False,  # new model, optimizer, data
                    callback=lambda step, row: seen.append(step))
    assert seen == [4, 5, 6, 7]  # resumed from the checkpoint, not restarted

    a, b = _rows(tmp_path / "whole" / LOSS_CSV), _rows(tmp_path / "broken" / LOSS_CSV)
    assert [r["step"] for r in b] == [str(i) for i in range(1, 8)]
    assert a == b  # every loss part and lr, to the last digit
    assert _rows(tmp_path / "whole" / VAL_CSV) == _rows(tmp_path / "broken" / VAL_CSV)
    sa, sb = whole.state_dict(), resumed.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)

    # Extending a finished run continues from its checkpoint.
    more = train(_tiny(steps=8), tmp_path / "broken", progress=False)
    assert len(_rows(tmp_path / "broken" / LOSS_CSV)) == 8 and more.metadata["steps"] == 8
    # A different recipe refuses to resume.
    with pytest.raises(ValueError, match="another config"):
        train(_tiny(steps=9, lr=0.01), tmp_path / "broken", progress=False)


def test_train_from_folder(tmp_path):
    psf = np.zeros((3, 3, 3), np.float32)
    psf[1, 1, 1] = 1.0
    synth.write_pairs(tmp_path / "data", 3, psf, (24, 24, 24), seed=0, progress=False)
    c = _tiny(data_dir=str(tmp_path / "data"), steps=2, val_every=2, augment=True)
    train(c, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / CHECKPOINT_NAME).exists()
    val = _rows(tmp_path / "run" / VAL_CSV)
    assert [r["step"] for r in val] == ["2"] and math.isfinite(float(val[0]["psnr"]))
    with pytest.raises(ValueError, match="n_val"):
        train(_tiny(data_dir=str(tmp_path / "data"), n_val=3), tmp_path / "run2", progress=False)


def test_volume_normalisation_cuts_crops_from_the_normalised_volume():
    c = _tiny(norm_scope="volume", n_volumes=1, n_val=0, batch_size=3)
    vols = _Volumes(c)
    x, gt = _Stream(c, vols).next_batch()
    raw_gt, raw_in = synth.phantom_pair(vols.psf(), c.phantom_shape, 0)
    norm_in = normalize_crop(raw_in, c.norm_percentiles)
    norm_gt = np.maximum(normalize_crop(raw_gt, c.norm_percentiles), 0.0)
    # Every crop is a window of the whole-volume normalised pair (found by matching it).
    for xi, gi in zip(x[:, 0], gt[:, 0], strict=True):
        hits = [(z, y, w) for z in range(9) for y in range(9) for w in range(9)
                if np.array_equal(norm_in[z:z + 16, y:y + 16, w:w + 16], xi)]
        assert len(hits) == 1
        z, y, w = hits[0]
        np.testing.assert_array_equal(norm_gt[z:z + 16, y:y + 16, w:w + 16], gi)
    # ... which is not what per-crop normalisation gives.
    assert not np.allclose(normalize_crop(x[0, 0], c.norm_percentiles), x[0, 0])


def test_gain_augment_scales_input_and_gt_alike():
    c = _tiny(norm_scope="volume", n_volumes=1, n_val=0, batch_size=1)
    vols = _Volumes(c)
    x0, g0 = _Stream(c, vols).next_batch()
    cg = _tiny(norm_scope="volume", n_volumes=1, n_val=0, batch_size=1, gain_augment=6.0)
    x1, g1 = _Stream(cg, _Volumes(cg)).next_batch()
    # The first crop is drawn before the gain: the same window, times one gain in [1, 6].
    gain = float(np.abs(x1).max() / np.abs(x0).max())
    assert 1.0 <= gain <= 6.0 and gain != 1.0
    np.testing.assert_allclose(x1, x0 * gain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g1, g0 * gain, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gain_augment"):
        _tiny(gain_augment=0.5)
    with pytest.raises(ValueError, match="norm_scope='volume'"):
        _tiny(gain_augment=2.0)
    # The stream records each crop's gain.
    stream = _Stream(cg, _Volumes(cg))
    x2, _ = stream.next_batch()
    np.testing.assert_allclose(x2, x0 * stream.gains[0], rtol=1e-5, atol=1e-6)


def test_gain_weighted_loss_scores_the_crop_before_its_gain():
    gen = torch.Generator().manual_seed(0)
    x0, gt0, e1, out = (torch.rand(3, 1, 8, 8, 8, generator=gen) for _ in range(4))
    gains = [1.0, 2.5, 6.0]
    g = torch.tensor(gains).view(-1, 1, 1, 1, 1)
    plain, _ = rln_loss({"E1pre": e1, "output": out}, x0, gt0)
    scaled_outputs = {"E1pre": e1 * g, "output": out * g}
    weighted, _ = rln_loss(*_unscale(scaled_outputs, x0 * g, gt0 * g, gains))
    torch.testing.assert_close(weighted, plain, rtol=1e-5, atol=1e-6)
    # Without the weighting the bright crops dominate.
    unweighted, _ = rln_loss(scaled_outputs, x0 * g, gt0 * g)
    assert unweighted > 2 * plain
    with pytest.raises(ValueError, match="gain_weighted needs gain_augment"):
        _tiny(norm_scope="volume", gain_weighted=True)


def test_gain_weighted_training_runs_and_resumes_bit_for_bit(tmp_path):
    c = _tiny(norm_scope="volume", n_volumes=1, n_val=0, steps=2, gain_augment=4.0,
              gain_weighted=True, checkpoint_every=1)
    whole = train(c, tmp_path / "whole", progress=False)
    train(dataclasses.replace(c, steps=1), tmp_path / "split", progress=False)
    resumed = train(c, tmp_path / "split", resume=True, progress=False)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    unweighted = train(dataclasses.replace(c, gain_weighted=False), tmp_path / "unweighted",
                       progress=False)
    assert not torch.equal(unweighted.e1, whole.e1)


def test_exact_gradients_change_the_updates_and_not_the_forward(tmp_path):
    c = _tiny(steps=2, n_val=0, checkpoint_every=100)
    paper = train(c, tmp_path / "paper", progress=False)
    exact = train(dataclasses.replace(c, gradients="exact"), tmp_path / "exact", progress=False)
    lp = [float(r["loss"]) for r in _rows(tmp_path / "paper" / LOSS_CSV)]
    le = [float(r["loss"]) for r in _rows(tmp_path / "exact" / LOSS_CSV)]
    # Step 1 scores the same start on the same batch; its update differs, so step 2's loss does.
    assert lp[0] == le[0] and lp[1] != le[1]
    assert exact.gradients == "exact" and paper.gradients == "paper"
    changed = [n for n, p in paper.named_parameters()
               if not torch.allclose(p, dict(exact.named_parameters())[n], rtol=0, atol=1e-7)]
    assert {"e1", "e4", "e8", "u1", "u3"} <= set(changed)


def test_init_model_starts_from_its_weights(tmp_path):
    start = RLN()
    start.reset_parameters(generator=torch.Generator().manual_seed(123))
    start.save(tmp_path / "start.pt")
    c = _tiny(steps=1, n_val=0, lr=1e-12, init_model=str(tmp_path / "start.pt"))
    model = train(c, tmp_path / "run", progress=False)
    fresh = train(_tiny(steps=1, n_val=0, lr=1e-12), tmp_path / "fresh", progress=False)
    for name, p in start.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), p.detach(),
                                   rtol=0, atol=1e-9)
    assert not torch.allclose(dict(fresh.named_parameters())["e7"], start.e7)


def test_microscopy_recipe_trains(tmp_path):
    c = _tiny(recipe="mixed", n_volumes=2, n_val=1, steps=2, val_every=2, checkpoint_every=2,
              phantom_shape=(24, 28, 28), norm_scope="volume")
    train(c, tmp_path, progress=False)
    val = _rows(tmp_path / VAL_CSV)
    assert [r["step"] for r in val] == ["2"] and math.isfinite(float(val[0]["psnr"]))


def _flip_error(model: RLN, shape=(1, 1, 16, 20, 24)) -> float:
    """Largest |model(flip(x)) flipped back − model(x)| over the three axis flips and all of them,
    relative to the output's largest value."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        y = model(x)
        err = max(float((model(x.flip(d)).flip(d) - y).abs().max()) for d in ([2], [3], [4], [2, 3, 4]))
        return err / float(y.abs().max())


def test_flip_symmetrize_is_a_projection():
    w = torch.randn(4, 3, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    s = flip_symmetrize(w)
    for d in ([2], [3], [4]):
        torch.testing.assert_close(s.flip(d), s, rtol=0, atol=1e-6)
    torch.testing.assert_close(flip_symmetrize(s), s, rtol=0, atol=1e-6)
    assert not torch.allclose(s, w)


def test_flip_symmetric_training_keeps_the_network_flip_equivariant(tmp_path):
    c = _tiny(steps=3, n_val=0, norm_scope="volume", flip_symmetric=True, augment=True)
    model = train(c, tmp_path / "sym", progress=False)
    for name, p in model.named_parameters():
        if p.dim() == 5:
            for d in ([2], [3], [4]):
                torch.testing.assert_close(p.detach().flip(d), p.detach(), rtol=0, atol=1e-6,
                                           msg=f"{name} is not symmetric under the flip of dim {d}")
    assert _flip_error(model) < 1e-5
    # The same run without the constraint is not equivariant: the check above can fail.
    free = train(dataclasses.replace(c, flip_symmetric=False), tmp_path / "free", progress=False)
    assert _flip_error(free) > 1e-3
    # And it resumes bit for bit (the hook is set again on the fresh model).
    split = tmp_path / "split"
    train(dataclasses.replace(c, steps=2), split, progress=False)
    resumed = train(c, split, progress=False)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flip_decay_moves_each_kernel_towards_its_flip_mean_after_every_step(tmp_path):
    c = _tiny(steps=1, n_val=0, norm_scope="volume", checkpoint_every=1)
    free = train(c, tmp_path / "free", progress=False)
    decayed = train(dataclasses.replace(c, flip_decay=0.25), tmp_path / "decay", progress=False)
    moved = 0
    for (name, a), b in zip(free.state_dict().items(), decayed.state_dict().values(), strict=True):
        # The first step's gradients are the same, so the decay is the only difference.
        want = a.lerp(flip_symmetrize(a), 0.25) if a.dim() == 5 else a
        torch.testing.assert_close(b, want, rtol=0, atol=1e-7, msg=name)
        moved += a.dim() == 5 and not torch.equal(a, b)
    assert moved > 0
    # More steps: the kernels' asymmetric part shrinks against the free run's, and the run
    # resumes bit for bit.
    longer = dataclasses.replace(c, steps=4, flip_decay=0.25)
    whole = train(longer, tmp_path / "whole", progress=False)
    free4 = train(dataclasses.replace(longer, flip_decay=0.0), tmp_path / "free4", progress=False)

    def asym(m):
        return sum(float((w - flip_symmetrize(w)).norm()) for w in m.state_dict().values() if w.dim() == 5)

    assert asym(whole) < 0.5 * asym(free4)
    train(dataclasses.replace(longer, steps=2), tmp_path / "split", progress=False)
    resumed = train(longer, tmp_path / "split", progress=False)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kw, match", [
    (dict(flip_decay=-0.1), "flip_decay must be in"),
    (dict(flip_decay=1.0), "flip_decay must be in"),
    (dict(flip_decay=float("nan")), "flip_decay must be in"),
    (dict(flip_decay=0.1, flip_symmetric=True), "no effect with flip_symmetric"),
])
def test_flip_decay_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kw)


def test_checkpoint_from_before_a_new_config_field_resumes(tmp_path):
    import json as _json

    c = _tiny(steps=2, n_val=0, checkpoint_every=1)
    train(dataclasses.replace(c, steps=1), tmp_path, progress=False)
    blob = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    old = _json.loads(blob["config"])
    del old["flip_symmetric"]  # as written before the field existed
    blob["config"] = _json.dumps(old)
    torch.save(blob, tmp_path / CHECKPOINT_NAME)
    assert train(c, tmp_path, progress=False).metadata["steps"] == 2
    with pytest.raises(ValueError, match="flip_symmetric"):  # the default is what it stood at
        train(dataclasses.replace(c, steps=3, flip_symmetric=True), tmp_path, progress=False)


def test_width_trains_a_wider_network_from_random_weights(tmp_path):
    c = _tiny(steps=2, n_val=0, checkpoint_every=1, width=2)
    model = train(c, tmp_path / "run", progress=False)
    assert model.width == 2 and RLN.load(tmp_path / "run" / MODEL_NAME).width == 2
    # Its random start is RLN(width=2)'s, seeded like width 1's: a different network.
    narrow = train(dataclasses.replace(c, width=None), tmp_path / "narrow", progress=False)
    assert narrow.width == 1
    assert sum(p.numel() for p in model.parameters()) > 3 * sum(p.numel() for p in narrow.parameters())


def test_width_must_match_an_init_models(tmp_path):
    RLN().save(tmp_path / "narrow.pt")
    c = _tiny(steps=1, n_val=0, init_model=str(tmp_path / "narrow.pt"), width=2)
    with pytest.raises(ValueError, match="width=2, but init_model"):
        train(c, tmp_path / "run", progress=False)
    assert train(dataclasses.replace(c, width=1), tmp_path / "ok", progress=False).width == 1


def test_a_wide_init_model_trains_at_its_width(tmp_path):
    start = RLN()
    start.reset_parameters(generator=torch.Generator().manual_seed(5))
    start.widened(2, noise=0.01, generator=torch.Generator().manual_seed(0)).save(tmp_path / "wide.pt")
    c = _tiny(steps=2, n_val=0, checkpoint_every=1, init_model=str(tmp_path / "wide.pt"))
    model = train(c, tmp_path / "run", progress=False)
    assert model.width == 2 and RLN.load(tmp_path / "run" / MODEL_NAME).width == 2
    # It resumes at its width too.
    train(dataclasses.replace(c, steps=1), tmp_path / "split", progress=False)
    resumed = train(c, tmp_path / "split", progress=False)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
