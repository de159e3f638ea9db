"""Shared test fixtures: the device list, the shared/ folder beside the checkout, seeded RNGs,
a saved random RLN, and a fresh Python process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Qt (the napari tests) needs a display; without one it aborts the whole run. Headless
# machines (CI) render offscreen.
if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
import torch

# Every device the op tests run on; CUDA is listed and skipped where there is no GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
]

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared (official checkpoint and test data) is not beside this checkout")
    return SHARED


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """An RLN with seeded random weights, saved once per test module."""
    from rln_fast.models.rln import RLN

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "random.pt"
    RLN().save(path)
    return path


def fresh_python(code: str) -> str:
    """What ``code`` prints when a new Python process runs it (which must exit with 0)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout
