"""scripts/evaluate_default_model.py: the measures the model card's numbers come from."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from rln_fast import psf as psf_models

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evaluate_default_model.py"


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ev():
    return _load_script(_SCRIPT)


@pytest.fixture
def tr():
    """scripts/train_default_model.py, loaded afresh for each test (tests patch it)."""
    return _load_script(_SCRIPT.parent / "train_default_model.py")


@pytest.fixture(scope="module")
def psf():
    return psf_models.gaussian((9, 11, 11), sigma=(2.0, 1.5, 1.5)).astype(np.float64)


def _truth(shape=(24, 32, 32)) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.zeros(shape)
    t[8:16, 10:22, 9:20] = rng.uniform(0.3, 1.0, (8, 12, 11))  # zero border: no edge effects
    return t


def test_scores_ignore_units(ev):
    gt = _truth()
    x = gt + np.random.default_rng(1).normal(0, 0.05, gt.shape)
    a, b = ev.scores(x, gt), ev.scores(3.0 * x + 7.0, gt)
    assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-9)
    assert a["ssim"] == pytest.approx(b["ssim"], abs=1e-9)
    assert ev.scores(gt, gt)["psnr"] > 100


def test_reblur_residual_is_zero_for_the_exact_answer_without_noise_or_haze(ev, psf):
    gt = _truth()
    clean = ev._circular_blur(gt, psf)
    assert ev.reblur_residual(gt, clean, psf) < 1e-6
    # Haze in the input that the answer rightly leaves out raises the measure.
    hazy = clean + 0.2 * clean.max() * np.exp(-((np.arange(gt.shape[2]) - 5) / 6.0) ** 2)
    assert ev.reblur_residual(gt, hazy, psf) > 0.05


def test_semi_synthetic_pair_scales_and_noises_as_documented(ev, psf):
    t = _truth()
    gt, raw = ev.semi_synthetic_pair(t, psf, peak=400.0, background=20.0, haze=0.0, seed=3)
    blurred = ev._circular_blur(gt, psf)
    assert blurred.max() == pytest.approx(400.0, rel=1e-5)
    # Poisson around blur + background: mean matches, variance ~ mean.
    resid = raw - (np.clip(blurred, 0, None) + 20.0)
    assert abs(resid.mean()) < 0.5
    assert np.var(resid) == pytest.approx(np.mean(blurred + 20.0), rel=0.1)
    again = ev.semi_synthetic_pair(t, psf, 400.0, 20.0, 0.0, 3)[1]
    np.testing.assert_array_equal(raw, again)


def test_background_stats_on_the_input_itself(ev):
    rng = np.random.default_rng(2)
    vol = rng.normal(100.0, 1.0, (10, 40, 40))
    vol[:, 10:30, 10:30] += 1000.0  # the "nucleus": a quarter of the voxels
    s = ev.background_stats(vol, vol)
    assert s["nucleus_level"] == pytest.approx(1000.0 + 100.0 - np.percentile(vol, 0.01), rel=0.01)
    assert 0 < s["bg_mean"] < 0.01 and s["bg_mean"] < s["bg_p999"] < 0.01


def test_the_training_script_never_draws_the_held_out_phantoms(ev, tr, monkeypatch, capsys):
    assert list(tr.EVALUATION_SEEDS) == ev.HELD_OUT_SEEDS
    for seed, n in ((899_999, 3), (900_008, 1), (-1, 4)):
        monkeypatch.setattr("sys.argv", ["train_default_model.py", "out", "--data-seed", str(seed),
                                         "--volumes", str(n)])
        with pytest.raises(SystemExit) as err:
            tr.main()
        assert err.value.code == 2
        assert "held-out phantoms 900001-900008" in capsys.readouterr().err


def test_the_training_script_passes_its_gradients_width_and_mse_weight_options(tr, monkeypatch):
    seen = []
    monkeypatch.setattr(tr, "train", lambda config, out, **kw: seen.append(config))
    cases = (([], "paper", None, 1.0), (["--gradients", "exact"], "exact", None, 1.0),
             (["--width", "2"], "paper", 2, 1.0), (["--mse-weight", "10"], "paper", None, 10.0))
    for extra, gradients, width, mse_weight in cases:
        monkeypatch.setattr("sys.argv", ["train_default_model.py", "out", "--steps", "1", *extra])
        tr.main()
        assert (seen[-1].gradients, seen[-1].width, seen[-1].mse_weight) == (gradients, width, mse_weight)
        assert seen[-1].microscopy_every == 2


def test_the_training_script_passes_the_share_of_microscopy_volumes(tr, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(tr, "train", lambda config, out, **kw: seen.append(config))
    monkeypatch.setattr("sys.argv", ["train_default_model.py", "out", "--recipe", "mixed", "--microscopy-every", "4"])
    tr.main()
    assert (seen[-1].recipe, seen[-1].microscopy_every) == ("mixed", 4)
    monkeypatch.setattr("sys.argv", ["train_default_model.py", "out", "--microscopy-every", "4"])
    with pytest.raises(SystemExit) as err:  # the official recipe has no microscopy volumes
        tr.main()
    assert err.value.code == 2 and "needs --recipe mixed" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["train_default_model.py", "out", "--recipe", "mixed", "--microscopy-every", "0"])
    with pytest.raises(ValueError, match="microscopy_every"):
        tr.main()


def test_scores_inside_the_object_leave_the_background_out(ev):
    z, y, x = np.mgrid[:24, :32, :32].astype(np.float64)
    gt = np.exp(-((z - 12) ** 2 / 18 + (y - 16) ** 2 / 40 + (x - 16) ** 2 / 40))
    region = ev.object_region(gt)
    assert 0.02 < region.mean() < 0.5 and np.all(gt[region] > 0.2 * gt.max())
    whole = ev.scores(gt + 0.05 * np.cos(x), gt)
    assert ev.scores(gt + 0.05 * np.cos(x), gt, np.ones_like(region))["psnr"] == pytest.approx(whole["psnr"])
    # Errors only in the background: the object's own scores stay near perfect.
    noisy_bg = gt + np.where(gt < 0.05, 0.05 * np.random.default_rng(0).standard_normal(gt.shape), 0.0)
    inside, outside = ev.scores(noisy_bg, gt, region), ev.scores(noisy_bg, gt)
    assert inside["psnr"] > outside["psnr"] + 15 and inside["ssim"] > 0.99 > outside["ssim"]


_DIAGNOSTICS = sorted(p.stem for p in (_SCRIPT.parent / "diagnostics").glob("*.py"))


def test_the_diagnostics_are_found():
    assert {"rl_from_rln", "sparse_capacity", "background_residue", "no_background_truth",
            "distill_flip_ensemble", "average_weights"} <= set(_DIAGNOSTICS)


@pytest.mark.parametrize("name", _DIAGNOSTICS)
def test_the_model_cards_diagnostics_still_import_and_parse(name):
    import subprocess
    import sys

    script = _SCRIPT.parent / "diagnostics" / f"{name}.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "Diagnostic" in done.stdout


def test_the_microscopy_variant_diagnostic_changes_what_it_is_asked_to(monkeypatch, capsys):
    from rln_fast import synth

    script = _load_script(_SCRIPT.parent / "diagnostics" / "microscopy_variant.py")
    monkeypatch.setattr(synth, "MICRO_PHOTONS", synth.MICRO_PHOTONS)  # both restored after the test
    monkeypatch.setattr(synth, "microscopy_pair", synth.microscopy_pair)
    seen = []
    monkeypatch.setattr(script, "train",
                        lambda config, out, **kw: seen.append((config, synth.MICRO_PHOTONS, synth.microscopy_pair)))
    monkeypatch.setattr("sys.argv", ["microscopy_variant.py", "out", "--photons", "300", "3000", "--steps", "2"])
    script.main()
    config, photons, pair = seen[-1]
    assert photons == (300.0, 3000.0) and (config.steps, config.lr, config.recipe) == (2, 0.0003, "mixed")
    assert not hasattr(pair, "keywords")  # the objects outside the volume kept
    monkeypatch.setattr("sys.argv", ["microscopy_variant.py", "out", "--no-outside-objects"])
    script.main()
    assert seen[-1][2].keywords == {"outside_objects": False}
    for name in ("MICRO_GAIN", "MICRO_OFFSET", "MICRO_READ_NOISE"):
        monkeypatch.setattr(synth, name, getattr(synth, name))
    monkeypatch.setattr("sys.argv", ["microscopy_variant.py", "out", "--ideal-camera"])
    script.main()
    assert (synth.MICRO_GAIN, synth.MICRO_OFFSET, synth.MICRO_READ_NOISE) == ((1.0, 1.0), (0.0, 0.0), (0.0, 0.0))
    monkeypatch.setattr(synth, "microscopy_pair", synth.microscopy_pair.func)
    monkeypatch.setattr("sys.argv", ["microscopy_variant.py", "out", "--no-texture"])
    script.main()
    assert seen[-1][2].keywords == {"textured": False}
    monkeypatch.setattr(synth, "microscopy_pair", seen[-1][2].func)
    monkeypatch.setattr("sys.argv", ["microscopy_variant.py", "out", "--sharp-edges", "--no-outside-objects"])
    script.main()
    assert seen[-1][2].keywords == {"outside_objects": False, "sharp_edges": True}
    monkeypatch.setattr("sys.argv", ["microscopy_variant.py", "out", "--microscopy-every", "4"])
    script.main()
    assert seen[-1][0].microscopy_every == 4 and seen[-2][0].microscopy_every == 2
    for argv, message in ((["--photons", "3000", "300"], "LOW <= HIGH"), ([], "nothing to change"),
                          (["--microscopy-every", "0"], ">= 1")):
        monkeypatch.setattr("sys.argv", ["microscopy_variant.py", "out", *argv])
        with pytest.raises(SystemExit):
            script.main()
        assert message in capsys.readouterr().err


# The model card's stages 5, 7 and 9: (edit, the stage it was made from, the stage trained
# from it; None for the shipped default).
_FLIP_EDITS = [
    ("rln_stage5_4b_flip010.pt", "rln_stage4b_p9999_mixed_1400.pt", "rln_stage6_5_400.pt"),
    ("rln_stage7_6_flip010.pt", "rln_stage6_5_400.pt", "rln_stage8_7_400.pt"),
    ("rln_stage9_8_flip010.pt", "rln_stage8_7_400.pt", None),
]


@pytest.mark.parametrize("edit, source, trained", _FLIP_EDITS)
def test_each_flip_edit_stage_is_rebuilt_exactly_by_the_model_cards_command(tmp_path, edit, source, trained):
    """The model card's command rebuilds each kept edit stage bit for bit from the kept stage
    before it, and the stage trained next records it as its start."""
    import json
    import subprocess
    import sys

    import torch

    from rln_fast.models.rln import RLN

    results = _SCRIPT.parents[1] / "benchmarks" / "results"
    out = tmp_path / "edit.pt"
    done = subprocess.run([sys.executable, str(_SCRIPT.parent / "diagnostics" / "average_weights.py"),
                           str(out), "--toward-flip-average", str(results / source), "0.1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rebuilt, kept, before = RLN.load(out), RLN.load(results / edit), RLN.load(results / source)
    for name, value in kept.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name
    assert not torch.equal(before.e1, kept.e1)  # the edit did change the kernels
    model = RLN.load(results / trained) if trained is not None else RLN.from_pretrained()
    assert json.loads(model.metadata["config"])["init_model"] == f"benchmarks/results/{edit}"
    assert not torch.equal(model.e1, kept.e1)  # and it was trained from there


def test_the_default_models_stages_name_the_kept_files():
    import json

    from rln_fast.models.rln import RLN

    root = _SCRIPT.parents[1]
    stages = json.loads(RLN.from_pretrained().metadata["stages"])
    assert stages[-1].startswith("10: this model")
    for entry in stages[:-1]:
        path = entry.split(" ", 2)[1]
        assert (root / path).is_file(), entry


def _evaluation(rln_psnr: dict, rl_psnr: float = 30.0, ssim: float = 0.9) -> dict:
    rows = [{"volume": v, "rln": {"psnr": p, "ssim": ssim}, "rl_best_psnr": {"psnr": rl_psnr, "ssim": 0.8},
             "rl_best_ssim": {"psnr": rl_psnr - 0.1, "ssim": 0.85}} for v, p in rln_psnr.items()]
    phantom = {"rln": {"psnr": 31.0, "ssim": 0.9}, "rl_best_psnr": {"psnr": 30.0, "ssim": 0.8},
               "rl_best_ssim": {"psnr": 30.0, "ssim": 0.8}}
    return {"semi_synthetic": {"rows": rows}, "phantoms": {"rows": [phantom]},
            "dapi": {"targets": {"bg_mean_le_input": True}}}


def test_the_tradeoff_diagnostic_scores_each_model_against_its_own_rl(tmp_path, capsys, monkeypatch):
    import json

    script = _load_script(_SCRIPT.parent / "diagnostics" / "tradeoff.py")
    volumes = ("dapi_nucleus", "dapi_nucleus_dim", "flowdec_bars", "flowdec_beads")
    losing = _evaluation(dict(zip(volumes, (31.0, 29.5, 28.0, 30.5), strict=True)))
    m = script.margins(losing)
    assert m["flowdec_bars"]["psnr"] == pytest.approx(-2.0) and m["worst_nucleus_psnr"] == pytest.approx(-0.5)
    assert m["flowdec_bars"]["ssim"] == pytest.approx(0.05)  # against RL's best-SSIM count
    assert m["phantoms_all_above"] and not m["semi_synthetic_all_above"]
    winning = _evaluation(dict.fromkeys(volumes, 30.0))
    assert script.margins(winning)["semi_synthetic_all_above"]  # a tie counts as met
    assert not script.margins(_evaluation(dict.fromkeys(volumes, 30.0), ssim=0.84))["semi_synthetic_all_above"]
    assert script.margins(_evaluation({"flowdec_bars": 40.0})) is None
    paths = []
    for name, d in (("a_evaluation.json", losing), ("b_evaluation.json", winning),
                    ("short_evaluation.json", _evaluation({"flowdec_bars": 40.0}))):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(d))
    monkeypatch.setattr("sys.argv", ["tradeoff.py", str(tmp_path / "out"), *map(str, paths)])
    script.main()
    written = json.loads((tmp_path / "out" / "tradeoff.json").read_text())
    assert written["summary"]["semi_synthetic_target_met_by"] == ["b"]
    assert written["summary"]["best_bars_margin"]["model"] == "b"
    assert written["summary"]["best_bars_with_nuclei_above"]["model"] == "b"
    assert set(written["models"]) == {"a", "b"} and written["skipped"] == [str(paths[2])]
    printed = capsys.readouterr().out
    assert "skipped" in printed
    assert (tmp_path / "out" / "tradeoff.png").is_file() != ("matplotlib is not installed" in printed)


def test_rl_at_one_count_names_the_volumes_rln_beats_at_each_count(ev):
    def row(volume, rln_psnr, rl_psnr_by_count):
        return {"volume": volume, "rln": {"psnr": rln_psnr, "ssim": 0.9},
                "rl_by_iterations": {str(k): {"psnr": p, "ssim": 0.8} for k, p in zip(ev.RL_ITERATIONS, rl_psnr_by_count, strict=True)}}

    n = len(ev.RL_ITERATIONS)
    rising = [20.0 + i for i in range(n)]  # RL improves with every count, as on the bars
    rows = [row("nucleus", 25.0, [30.0] * n), row("bars", 21.5, rising)]
    one = ev._one_count(rows)
    assert set(one) == {str(k) for k in ev.RL_ITERATIONS}
    first, second, third = (str(k) for k in ev.RL_ITERATIONS[:3])
    assert one[first]["rln_beats_rl_on"] == one[second]["rln_beats_rl_on"] == ["bars"]
    assert not one[first]["rln_beats_rl_on_all"] and one[third]["rln_beats_rl_on"] == []
    rows = [row("nucleus", 31.0, [30.0] * n), row("bars", 21.5, rising)]
    assert ev._one_count(rows)[first]["rln_beats_rl_on_all"]
    rows[0]["rl_by_iterations"][first]["ssim"] = 0.95  # RL's SSIM above RLN's there
    assert ev._one_count(rows)[first]["rln_beats_rl_on"] == ["bars"]


def test_the_cropped_psf_diagnostic_keeps_the_centre_and_says_how_much_light(psf):
    script = _load_script(_SCRIPT.parent / "diagnostics" / "rl_cropped_psf.py")
    p = psf / psf.sum()
    box, kept = script.cropped(p, 2)
    assert box.shape == (5, 5, 5) and box.sum() == pytest.approx(1.0)
    assert np.unravel_index(box.argmax(), box.shape) == (2, 2, 2)  # still centred
    assert kept == pytest.approx(p[2:7, 3:8, 3:8].sum()) and 0 < kept < 1
    whole, all_light = script.cropped(p, 100)  # larger than the PSF: all of it
    assert whole.shape == p.shape and all_light == pytest.approx(1.0)
    with pytest.raises(ValueError, match=">= 0"):
        script.cropped(p, -1)
