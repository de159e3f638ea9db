"""The rln-fast command and the quick-start demo."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from rln_fast.cli import main
from rln_fast.models.rln import RLN


def test_info_prints_backends():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["cpu"] is True and "cuda" in info


def test_demo_runs_on_a_small_volume(tmp_path):
    try:
        RLN.from_pretrained()
    except FileNotFoundError:
        pytest.fail("the default model rln_fast/weights/default.pt is not shipped")
    from rln_fast.demo import run_demo

    m = run_demo(tmp_path, num_iter=10, progress=False, shape=(36, 72, 72))  # the PSF is 33x65x65
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert json.loads((tmp_path / "demo.json").read_text())["psnr_db"] == m["psnr_db"]
    # Both methods sharpen: better than the blurred input against the truth.
    assert m["psnr_db"]["rl_10"] > m["psnr_db"]["input"]
    assert m["psnr_db"]["rln"] > m["psnr_db"]["input"]


def test_demo_errors_are_one_line(tmp_path, monkeypatch):
    import rln_fast.demo as demo

    def boom(*a, **k):
        raise FileNotFoundError("RLN.from_pretrained: no shipped model 'default'")

    monkeypatch.setattr(demo, "run_demo", boom)
    result = CliRunner().invoke(main, ["demo", "--out-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["rln-fast demo: RLN.from_pretrained: no shipped model 'default'"]


# --------------------------------------------------------------------------- --help stays light

_NO_TORCH = """
import sys
sys.argv = ["rln-fast", *sys.argv[1:]]
try:
    from rln_fast.cli import main  # what the executable (cli.entry) runs
    main()
except SystemExit as e:
    assert e.code in (0, None), e.code
heavy = sorted(m for m in ("torch", "numpy", "scipy", "tifffile", "tqdm") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("args", [["--help"], ["deconvolve", "--help"], ["rln", "--help"],
                                  ["psf", "--help"], ["synth", "--help"]])
def test_help_does_not_import_torch(args):
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Usage: rln-fast" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "HEAVY []"


_ENTRY = """
import atexit, sys
atexit.register(lambda: print("exit handler ran"))
sys.argv = ["rln-fast", *sys.argv[1:]]
from rln_fast.cli import entry
print("before", flush=False)
entry()
"""


@pytest.mark.parametrize("args,code", [(["--help"], 0), (["deconvolve", "missing.tif", "o.tif"], 1),
                                       (["nope"], 2)])
def test_executable_exits_quickly_with_the_status_and_everything_said(args, code):
    # cli.entry skips Python's module teardown (os._exit) after running the exit handlers and
    # flushing: the status, stdout (buffered, in a pipe), stderr and atexit must all survive.
    r = subprocess.run([sys.executable, "-c", _ENTRY, *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == code, r.stderr
    assert r.stdout.startswith("before") and r.stdout.rstrip().endswith("exit handler ran")
    if code == 1:
        assert r.stderr.strip() == "rln-fast deconvolve: input missing.tif does not exist; check the path"


def test_lazy_train_command_is_listed_and_built_on_use():
    from rln_fast.cli import _LazyGroup

    listing = CliRunner().invoke(main, ["--help"]).output
    row = next(ln for ln in listing.splitlines() if ln.strip().startswith("train "))
    built = main.get_command(click.Context(main), "train")
    assert isinstance(built, click.Command) and "--steps" in CliRunner().invoke(
        main, ["train", "--help"]).output
    # The summary shown before the command is built is the built command's own.
    assert row.split(None, 1)[1].rstrip(".") in built.get_short_help_str(200)
    assert isinstance(main, _LazyGroup) and "train" in main.list_commands(click.Context(main))


def test_import_rln_fast_is_lazy_but_complete():
    code = ("import sys, rln_fast as rf; assert 'torch' not in sys.modules; "
            "names = [getattr(rf, n) for n in rf.__all__]; "
            "from rln_fast import RLN, richardson_lucy, deconvolve_file; "
            "assert rf.rl.richardson_lucy is richardson_lucy and rf.models.rln.RLN is RLN; "
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    import rln_fast

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rln_fast.nope  # noqa: B018


@pytest.mark.parametrize(("progress", "quiet", "tty", "shown"), [
    (None, False, True, True), (None, False, False, False), (True, False, False, True),
    (False, False, True, False), (True, True, True, False), (None, True, True, False)])
def test_progress_rule(monkeypatch, progress, quiet, tty, shown):
    from rln_fast import cli

    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    assert cli._show_progress(progress, quiet) is shown


def test_every_computing_command_has_threads_quiet_and_progress():
    ctx = click.Context(main)
    for name in ("deconvolve", "rln", "synth", "train", "bench", "demo", "psf"):
        opts = {o for p in main.get_command(ctx, name).params for o in p.opts + p.secondary_opts}
        assert {"--threads", "-q", "--quiet"} <= opts, name
        if name != "psf":  # psf has no long step
            assert {"--progress", "--no-progress"} <= opts, name


def test_quiet_psf_prints_nothing(tmp_path):
    r = CliRunner().invoke(main, ["psf", "gaussian", str(tmp_path / "p.tif"), "--shape", "5", "5",
                                  "5", "--voxel-size", "0.3", "0.1", "0.1", "--sigma", "0.3",
                                  "0.1", "0.1", "-q"])
    assert r.exit_code == 0 and r.output == ""
    assert (tmp_path / "p.tif").exists()


# --------------------------------------------------------------------------- one spelling

# Options that exist only on the command line (what the command does around the API call).
_CLI_ONLY = {"threads", "quiet", "progress", "skip_existing", "psf_model", "psf_shape", "synthetic",
             "quick", "json_path"}
# Issue 13: the rl helper's option line; the API keyword is num_iter.
_PENDING: dict[str, set[str]] = {}


def test_every_option_is_spelled_as_its_api_keyword():
    """Each option's flags, minus the dashes, include the keyword of the function it feeds."""
    import dataclasses
    import inspect

    from rln_fast import bench, deconvolve_file, demo, psf, richardson_lucy, synth, train

    def kw(*fns):
        return set().union(*(inspect.signature(f).parameters for f in fns))

    optics = kw(psf.born_wolf, psf.gibson_lanni, psf.gaussian, psf.confocal)
    api = {
        "deconvolve": kw(deconvolve_file, richardson_lucy),
        "rln": kw(deconvolve_file, richardson_lucy),  # the same options as deconvolve
        "psf": optics,
        "synth": kw(synth.write_pairs) | optics,
        "train": {f.name for f in dataclasses.fields(train.TrainConfig)} | kw(train.train) | optics,
        "bench": kw(bench.run_bench),
        "demo": kw(demo.run_demo),
    }
    ctx = click.Context(main)
    wrong = []
    for name, keywords in api.items():
        for p in main.get_command(ctx, name).params:
            if not isinstance(p, click.Option) or p.name in _CLI_ONLY | _PENDING.get(name, set()):
                continue
            spellings = {o.lstrip("-").replace("-", "_") for o in p.opts + p.secondary_opts}
            spellings |= {s.removeprefix("no_") for s in spellings}
            if not spellings & keywords:
                wrong.append(f"{name} {'/'.join(p.opts)}")
    assert wrong == []
