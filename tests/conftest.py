"""Shared test fixtures: the device list, the shared/ folder beside the checkout, seeded RNGs,
a saved random RLN, one torch thread, and a fresh Python process."""

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


@pytest.fixture
def one_thread():
    """torch (and MKL, OpenMP) on one thread for the test: for results compared bit for bit
    with a child process or Dask worker that runs on one. MKL's CPU FFTs round differently on
    one and on two threads on some CPUs (AVX-512 Xeons: ~1e-7 relative), so a result is only
    reproducible for a given thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_python(code: str) -> str:
    """What ``code`` prints when a new Python process runs it (which must exit with 0)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout
