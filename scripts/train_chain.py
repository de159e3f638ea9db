"""Runs a plan of RLN training stages in one process: the model card's chains, on a GPU or the CPU.

Usage: python scripts/train_chain.py PLAN OUT_DIR [--only NAME,...] [--device cpu|cuda] [--threads N]
       [--workers N] [--checkpoint-every N] [--deadline-s S] [--pack FILE.tar.gz] [--smoke]

PLAN is a text file, one stage per line ("#" starts a comment):

    NAME: train OPTIONS          scripts/train_default_model.py's options (no OUT_DIR)
    NAME: flip FRACTION MODEL    every conv kernel w of MODEL -> (1 - F)·w + F·(its flip mean)

In OPTIONS and MODEL, {OTHER} is the model of the plan's stage OTHER (OUT_DIR/OTHER/model.pt);
other paths are as given (run from the repository root: the models record them). Each stage writes OUT_DIR/NAME/ (model.pt, and for a training stage its
checkpoint and logs). Stages run in the plan's order and share the generated training volumes
(train's pair_cache), so a chain of stages on the same data generates each volume once; before
the first stage, --workers processes generate them all (on one H200 machine's 16 cores, one at a
time on first use took about 75 s of the first stage's 120).

Re-running resumes: a finished stage is kept, a training stage continues from its checkpoint.
--deadline-s stops at the first checkpoint after S seconds (exit 3; re-run to go on). --pack
rewrites one archive of every stage's model.pt and logs (not the checkpoints) after each stage:
what a GPU call brings back. --smoke runs every training stage for 2 steps on 2 volumes of 16³
crops: the check that a plan parses and runs, for CI. Every model records its chain
(metadata["chain"]: the plan lines that made it, in order).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shlex
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_default_model  # noqa: E402 - the stage command line

from rln_fast.models.rln import RLN  # noqa: E402
from rln_fast.train import LOSS_CSV, MODEL_NAME, VAL_CSV, generate_pairs, toward_flip_mean, train  # noqa: E402

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_REF = re.compile(r"\{([^{}]*)\}")
SMOKE = {"--steps": "2", "--volumes": "2", "--crop": "16", "--val-every": "2"}


class _OutOfTime(Exception):
    pass


@dataclass
class Stage:
    name: str
    kind: str  # "train" or "flip"
    args: list[str]
    line: str  # as written in the plan


def read_plan(path: str | Path) -> list[Stage]:
    """The plan's stages; ValueError naming the line for anything malformed, a repeated name or
    a {REF} to a stage not defined before it."""
    stages: list[Stage] = []
    names: set[str] = set()
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}, line {number}"
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name):
            raise ValueError(f"{where}: expected 'NAME: train OPTIONS' or 'NAME: flip FRACTION MODEL' "
                             f"(NAME of letters, digits, '.', '_', '-'), got {raw.strip()!r}")
        if name in names:
            raise ValueError(f"{where}: stage {name!r} is defined twice")
        words = shlex.split(rest)
        if not words or words[0] not in ("train", "flip"):
            raise ValueError(f"{where}: the stage's verb must be 'train' or 'flip', got {rest.strip()!r}")
        for ref in _REF.findall(rest):
            if ref not in names:
                raise ValueError(f"{where}: {{{ref}}} names no stage defined before {name!r}")
        if words[0] == "flip":
            if len(words) != 3:
                raise ValueError(f"{where}: 'flip' takes FRACTION MODEL, got {' '.join(words[1:])!r}")
            try:
                fraction = float(words[1])
            except ValueError:
                fraction = -1.0
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"{where}: the flip FRACTION must be a number in [0, 1], got {words[1]!r}")
        stages.append(Stage(name, words[0], words[1:], f"{name}: {rest.strip()}"))
        names.add(name)
    if not stages:
        raise ValueError(f"{path}: no stages")
    return stages


def _resolve(word: str, out: Path) -> str:
    return _REF.sub(lambda m: str(out / m.group(1) / MODEL_NAME), word)


def _chain(stages: list[Stage], upto: Stage) -> list[Stage]:
    """The stages that made ``upto``: those it names, recursively, in plan order of need, then it."""
    by_name = {s.name: s for s in stages}
    chain: list[Stage] = []

    def visit(s: Stage) -> None:
        for ref in _REF.findall(" ".join(s.args)):
            visit(by_name[ref])
        if s not in chain:
            chain.append(s)

    visit(upto)
    return chain


def _pack(out: Path, stages: list[Stage], archive: Path) -> None:
    """One .tar.gz of each stage's model.pt and logs, written atomically."""
    tmp = archive.with_name(archive.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for s in stages:
            for f in (MODEL_NAME, LOSS_CSV, VAL_CSV, "done.json"):
                p = out / s.name / f
                if p.is_file():
                    tar.add(p, arcname=f"{s.name}/{f}")
        log = io.BytesIO(json.dumps([s.line for s in stages], indent=1).encode())
        info = tarfile.TarInfo("plan.json")
        info.size = len(log.getvalue())
        tar.addfile(info, log)
    tmp.replace(archive)


def _parse(stage: Stage, folder: Path, out: Path, args: argparse.Namespace):
    words = [_resolve(w, out) for w in stage.args]
    if args.smoke:
        for flag, value in SMOKE.items():
            words += [flag, value]
    ap = train_default_model.parser()
    ns = ap.parse_args([str(folder), *words])
    if args.device is not None:
        ns.device = args.device
    if args.threads is not None:
        ns.threads = args.threads
    return ap, ns


def pregenerate(run: list[Stage], out: Path, args: argparse.Namespace, cache: dict) -> int:
    """Every training volume the unfinished training stages of ``run`` use, generated in
    args.workers processes into ``cache`` (their start models may not exist yet: the data do
    not depend on them)."""
    configs = []
    for s in run:
        if s.kind == "train" and not (out / s.name / "done.json").is_file():
            ap, ns = _parse(s, out / s.name, out, args)
            ns.init, ns.width = None, None
            configs.append(train_default_model.config(ap, ns))
    return generate_pairs(configs, cache, workers=args.workers)


def run_stage(stage: Stage, stages: list[Stage], out: Path, args: argparse.Namespace, cache: dict,
              deadline: float | None) -> dict:
    folder = out / stage.name
    done = folder / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    chain = json.dumps([s.line for s in _chain(stages, stage)])
    if stage.kind == "flip":
        source = _resolve(stage.args[1], out)
        model = RLN.load(source)
        toward_flip_mean(model, float(stage.args[0]))
        model.metadata = {**model.metadata, "toward_flip_average": float(stage.args[0]), "chain": chain}
        model.save(folder / MODEL_NAME)
        summary = {"stage": stage.name, "seconds": round(time.time() - t0, 2)}
    else:
        ap, ns = _parse(stage, folder, out, args)
        config = train_default_model.config(ap, ns)
        config.checkpoint_every = args.checkpoint_every
        every = max(1, config.steps // 10)

        def report(step: int, row: dict) -> None:
            if step % every == 0:
                print(f"  {stage.name} step {step}/{config.steps} loss {row['loss']:.4f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
            if deadline is not None and time.time() > deadline and step % config.checkpoint_every == 0:
                raise _OutOfTime

        model = train(config, folder, progress=False, callback=report, pair_cache=cache)
        model.metadata = {**model.metadata, "chain": chain}
        model.save(folder / MODEL_NAME)
        val = (folder / VAL_CSV).read_text().strip().splitlines()
        summary = {"stage": stage.name, "seconds": round(time.time() - t0, 2), "steps": config.steps,
                   "last_validation": val[-1] if len(val) > 1 else None,
                   "device": str(next(model.parameters()).device)}
    done.write_text(json.dumps(summary))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan")
    ap.add_argument("out_dir")
    ap.add_argument("--only", default=None, help="comma-separated stage names (and what they need)")
    ap.add_argument("--device", default=None, help="every training stage's device (default: the plan's, "
                    "else cuda when there is one)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="stop at the first checkpoint after this many seconds (exit 3; re-run resumes)")
    ap.add_argument("--pack", default=None, help="an archive of the models and logs, rewritten after each stage")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes that generate every stage's training volumes before the first "
                         "stage (default: one per CPU core; 0: each volume on first use instead)")
    ap.add_argument("--smoke", action="store_true", help="2 steps of every training stage on 2 volumes, 16³ crops")
    args = ap.parse_args()
    if args.checkpoint_every < 1:
        ap.error(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.workers is not None and args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    try:
        stages = read_plan(args.plan)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in stages}
        if unknown:
            ap.error(f"--only: no stages named {sorted(unknown)} in {args.plan}")
        needed: set[str] = set()
        for s in stages:
            if s.name in wanted:
                needed.update(c.name for c in _chain(stages, s))
        run = [s for s in stages if s.name in needed]
    else:
        run = stages
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = None if args.deadline_s is None else start + args.deadline_s
    cache: dict = {}
    print(f"{len(run)} stages to {out} (torch {torch.__version__}, "
          f"{'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda'})", flush=True)
    if args.workers != 0:
        t0 = time.time()
        n = pregenerate(run, out, args, cache)
        print(f"{n} training volumes generated in {time.time() - t0:.0f} s", flush=True)
    for stage in run:
        if deadline is not None and time.time() > deadline:
            print(f"deadline: stopped before {stage.name}; re-run the same command to go on", flush=True)
            sys.exit(3)
        print(f"{stage.line}", flush=True)
        try:
            summary = run_stage(stage, stages, out, args, cache, deadline)
        except _OutOfTime:
            print(f"deadline: {stage.name} stopped at a checkpoint; re-run the same command to go on", flush=True)
            if args.pack:
                _pack(out, run, Path(args.pack))
            sys.exit(3)
        print(f"  done: {json.dumps(summary)} ({time.time() - start:.0f} s in all)", flush=True)
        if args.pack:
            _pack(out, run, Path(args.pack))


if __name__ == "__main__":
    main()
