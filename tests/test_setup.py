"""scripts/setup.sh does only what is left: a build when what the extension is built from (or
torch, or Python) changed, the missing dependencies, or nothing; decided by
scripts/setup_check.py. Checked on a small fake checkout, so nothing is built or installed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_setup_check():
    spec = importlib.util.spec_from_file_location("setup_check", ROOT / "scripts" / "setup_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sc = _load_setup_check()


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A checkout in miniature: csrc/, setup.py, pyproject.toml (the real one), the scripts,
    and an rln_fast package whose "extension" imports (it is a stand-in file)."""
    root = tmp_path / "checkout"
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "csrc" / "cpu" / "kernel.cpp").write_text("int f() { return 1; }\n")
    (root / "setup.py").write_text("# builds the extension\n")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    (root / "scripts").mkdir()
    for name in ("setup.sh", "setup_check.py"):
        shutil.copy(ROOT / "scripts" / name, root / "scripts" / name)
    pkg = root / "rln_fast"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_backend.py").write_text("_IMPORT_ERROR = None\n")
    (pkg / "_C.cpython-stand-in.so").write_bytes(b"\x7fELF built once")
    for name in sc.BUILD_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(root))  # `import rln_fast` finds this checkout
    return root


def _plan(root: Path, extras=()):
    return sc.plan(root, list(extras))


def test_no_record_means_a_first_build(checkout):
    code, why = _plan(checkout)
    assert code == sc.BUILD and "first build" in why[0]


def test_recorded_state_needs_nothing_until_something_changes(checkout, monkeypatch):
    sc.record(checkout)  # runs the import check on the stand-in package
    assert _plan(checkout)[0] == sc.NOTHING

    kernel = checkout / "csrc" / "cpu" / "kernel.cpp"
    kernel.write_text("int f() { return 2; }\n")
    code, why = _plan(checkout)
    assert code == sc.BUILD and "csrc/" in why[0]
    kernel.write_text("int f() { return 1; }\n")
    assert _plan(checkout)[0] == sc.NOTHING

    (checkout / "csrc" / "cpu" / "new.h").write_text("// a new header\n")
    assert _plan(checkout)[0] == sc.BUILD
    (checkout / "csrc" / "cpu" / "new.h").unlink()

    monkeypatch.setenv("RLN_FAST_SKIP_CUDA", "1")
    assert _plan(checkout)[0] == sc.BUILD
    monkeypatch.delenv("RLN_FAST_SKIP_CUDA")

    so = next((checkout / "rln_fast").glob("_C*.so"))
    so.write_bytes(b"\x7fELF something else")
    code, why = _plan(checkout)
    assert code == sc.BUILD and "_C" in why[0]
    so.unlink()
    assert _plan(checkout)[0] == sc.BUILD


def test_another_torch_or_python_rebuilds(checkout):
    sc.record(checkout)
    stamp = checkout / sc.STAMP
    state = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**state, "torch": "1.0.0"}))
    code, why = _plan(checkout)
    assert code == sc.BUILD and "torch" in why[0] and "1.0.0" in why[0]
    stamp.write_text(json.dumps({**state, "python": "/elsewhere (Python 3.0)"}))
    assert _plan(checkout)[0] == sc.BUILD


def test_package_found_elsewhere_rebuilds(checkout, tmp_path, monkeypatch):
    sc.record(checkout)
    other = tmp_path / "other"
    (other / "rln_fast").mkdir(parents=True)
    (other / "rln_fast" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(other))
    code, why = _plan(checkout)
    assert code == sc.BUILD and str(other / "rln_fast") in why[0]


def test_a_build_whose_extension_fails_is_not_recorded(checkout):
    (checkout / "rln_fast" / "_backend.py").write_text("_IMPORT_ERROR = 'undefined symbol'\n")
    with pytest.raises(SystemExit, match="undefined symbol"):
        sc.record(checkout)
    assert not (checkout / sc.STAMP).exists()


def test_missing_extra_dependencies_are_installed_without_a_build(checkout):
    text = (checkout / "pyproject.toml").read_text()
    text = text.replace('[project.optional-dependencies]\n',
                        '[project.optional-dependencies]\nextra-only = ["rln-fast-no-such-package>=1"]\n')
    (checkout / "pyproject.toml").write_text(text)
    sc.record(checkout)
    assert _plan(checkout)[0] == sc.NOTHING  # base dependencies: all there
    code, missing = _plan(checkout, ["extra-only"])
    assert (code, missing) == (sc.DEPS, ["rln-fast-no-such-package>=1"])
    assert sc.parse_extras("[dev, zarr]") == ["dev", "zarr"] and sc.parse_extras("") == []


def test_setup_sh_second_run_does_nothing_in_seconds(checkout):
    env = {**os.environ, "PYTHON": sys.executable}
    sh = ["bash", str(checkout / "scripts" / "setup.sh")]
    r = subprocess.run([*sh, "--check"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == sc.BUILD and "first build" in r.stdout  # --check changes nothing
    assert not (checkout / sc.STAMP).exists()
    subprocess.run([sys.executable, str(checkout / "scripts" / "setup_check.py"), "done"],
                   check=True, env=env, timeout=120)  # what setup.sh does after its build
    r = subprocess.run([*sh, "--check"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == sc.NOTHING, r.stdout + r.stderr
    t0 = time.perf_counter()
    r = subprocess.run(sh, capture_output=True, text=True, env=env, timeout=120)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("nothing to do") and "up to date" in r.stdout
    assert seconds < 30, seconds  # no pip, no compiler: a second or two on a quiet machine
