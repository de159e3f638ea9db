"""The rln-fast command and the quick-start demo."""

from __future__ import annotations

import json

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

    m = run_demo(tmp_path, rl_iterations=10, progress=False, shape=(36, 72, 72))  # the PSF is 33x65x65
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
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["rln-fast demo: RLN.from_pretrained: no shipped model 'default'"]
