"""scripts/train_chain.py: plans of training stages run in one process, resumable, with a deadline."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rln_fast.models.rln import RLN
from rln_fast.train import toward_flip_mean

from .test_evaluation import _load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_chain.py"
TINY = "--steps 2 --crop 16 --volumes 2 --val-every 2 --device cpu"


def _plan(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "plan.txt"
    p.write_text(text)
    return p


@pytest.fixture()
def chain():
    return _load_script(SCRIPT)


@pytest.mark.parametrize("text, match", [
    ("A train --steps 2\n", "expected 'NAME: train"),
    ("A b: train --steps 2\n", "expected 'NAME: train"),
    ("A: fit --steps 2\n", "verb must be 'train' or 'flip'"),
    ("A: train --init {B}\nB: train\n", r"\{B\} names no stage defined before 'A'"),
    ("A: train\nA: flip 0.1 {A}\n", "defined twice"),
    ("A: train\nB: flip 1.5 {A}\n", "FRACTION must be a number in"),
    ("A: train\nB: flip {A}\n", "'flip' takes FRACTION MODEL"),
    ("# only a comment\n\n", "no stages"),
])
def test_a_malformed_plan_is_refused_with_its_line(tmp_path, chain, text, match):
    with pytest.raises(ValueError, match=match):
        chain.read_plan(_plan(tmp_path, text))


def test_the_shipped_plans_parse_and_name_existing_start_models(chain):
    for plan in sorted((ROOT / "scripts" / "chains").glob("*.txt")):
        stages = chain.read_plan(plan)
        for s in stages:
            for i, word in enumerate(s.args):
                if word == "--init" and "{" not in s.args[i + 1]:
                    assert (ROOT / s.args[i + 1]).is_file(), (plan.name, s.line)


def _run(tmp_path, plan, out, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), str(plan), str(out), "--threads", "2", *extra],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_a_chain_trains_edits_resumes_and_packs(tmp_path, chain):
    plan = _plan(tmp_path, f"# a tiny chain\nT1: train {TINY} --recipe mixed --microscopy-every 4\n"
                           "F2: flip 0.25 {T1}   # an edit\n"
                           f"T3: train {TINY} --recipe mixed --microscopy-every 4 --init {{F2}} --lr 0.001\n"
                           f"X: train {TINY}\n")
    out = tmp_path / "out"
    r = _run(tmp_path, plan, "out", "--only", "T3", "--pack", str(tmp_path / "p.tar.gz"))  # cwd tmp_path
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "X").exists()  # --only: T3 and what it needs
    # generated up front, once for both stages: seeds 0, 1 and validation 1,000,000-1,000,001
    assert "4 training volumes generated" in r.stdout
    t1, f2, t3 = (RLN.load(out / n / "model.pt") for n in ("T1", "F2", "T3"))
    expected = RLN.load(out / "T1" / "model.pt")
    toward_flip_mean(expected, 0.25)
    for k, v in expected.state_dict().items():
        assert torch.equal(f2.state_dict()[k], v), k
    config = json.loads(t3.metadata["config"])
    assert config["init_model"] == str(Path("out") / "F2" / "model.pt") and config["lr"] == 0.001
    assert [line.split(":")[0] for line in json.loads(t3.metadata["chain"])] == ["T1", "F2", "T3"]
    assert t3.metadata["steps"] == 2
    import tarfile

    with tarfile.open(tmp_path / "p.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"T1/model.pt", "F2/model.pt", "T3/model.pt", "T3/loss.csv", "plan.json"} <= names
    assert not any(n.endswith("checkpoint.pt") for n in names)
    # Re-running keeps every finished stage as it is.
    before = (out / "T3" / "model.pt").stat().st_mtime_ns
    r = _run(tmp_path, plan, "out", "--only", "T3")
    assert r.returncode == 0 and (out / "T3" / "model.pt").stat().st_mtime_ns == before


def test_the_deadline_stops_at_a_checkpoint_and_a_rerun_finishes(tmp_path, chain):
    plan = _plan(tmp_path, f"T1: train {TINY.replace('--steps 2', '--steps 3')}\n")
    stage = chain.read_plan(plan)[0]
    args = chain.argparse.Namespace(smoke=False, device="cpu", threads=None, checkpoint_every=1)
    with pytest.raises(chain._OutOfTime):
        chain.run_stage(stage, [stage], tmp_path / "out", args, {}, deadline=time.time())
    assert (tmp_path / "out" / "T1" / "checkpoint.pt").is_file()
    assert not (tmp_path / "out" / "T1" / "done.json").exists()
    assert len((tmp_path / "out" / "T1" / "loss.csv").read_text().splitlines()) == 2  # header, step 1
    summary = chain.run_stage(stage, [stage], tmp_path / "out", args, {}, deadline=None)
    assert summary["steps"] == 3 and RLN.load(tmp_path / "out" / "T1" / "model.pt").metadata["steps"] == 3
    # A deadline already passed stops before the first stage, with exit 3 and how to go on.
    r = _run(tmp_path, plan, tmp_path / "late", "--deadline-s", "0")
    assert r.returncode == 3 and "re-run the same command" in r.stdout
    assert not (tmp_path / "late" / "T1").exists()


def test_bad_command_lines_are_refused(tmp_path):
    plan = _plan(tmp_path, f"T1: train {TINY}\n")
    r = _run(tmp_path, plan, tmp_path / "o", "--only", "T9")
    assert r.returncode == 2 and "no stages named ['T9']" in r.stderr
    r = _run(tmp_path, tmp_path / "missing.txt", tmp_path / "o")
    assert r.returncode == 2 and "missing.txt" in r.stderr
    bad = _plan(tmp_path, f"T1: train {TINY} --recipe official --microscopy-every 4\n")
    r = _run(tmp_path, bad, tmp_path / "o")
    assert r.returncode == 2 and "--microscopy-every needs --recipe mixed" in r.stderr
