"""What scripts/setup.sh still has to do for this checkout: build, install dependencies, or nothing.

    python scripts/setup_check.py plan [EXTRAS]    # prints the plan; exit 0 nothing, 1 build, 2 deps
    python scripts/setup_check.py done [EXTRAS]    # after a successful build: record the stamp

The build is up to date when the stamp (build/setup-stamp.json) holds the hash of what the
extension is built from (csrc/, setup.py, pyproject.toml, the RLN_FAST_* switches), the torch
version and Python it was built against, and the hash of the rln_fast/_C*.so it produced (which
imported when the stamp was written); and ``import rln_fast`` in this Python finds this
checkout. The
dependencies (the project's and those of EXTRAS, e.g. "[dev]") are checked against what is
installed, from pyproject.toml. Standard library only, except ``packaging`` for the version
ranges (pip's copy when the package is absent).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = Path("build") / "setup-stamp.json"
BUILD_SWITCHES = ("RLN_FAST_FORCE_CUDA", "RLN_FAST_SKIP_CUDA", "RLN_FAST_PORTABLE",
                  "RLN_FAST_DEBUG", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME")
NOTHING, BUILD, DEPS = 0, 1, 2


def _torch_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def source_hash(root: Path) -> str:
    """sha256 over the files the extension is built from and the build switches."""
    h = hashlib.sha256()
    files = sorted(p for p in glob.glob(str(root / "csrc" / "**" / "*"), recursive=True)
                   if os.path.isfile(p))
    for p in [*files, str(root / "setup.py"), str(root / "pyproject.toml")]:
        h.update(os.path.relpath(p, root).encode() + b"\0")
        h.update(Path(p).read_bytes() + b"\0")
    for name in BUILD_SWITCHES:
        h.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return h.hexdigest()


def _extension(root: Path) -> Path | None:
    found = sorted(root.glob("rln_fast/_C*.so")) + sorted(root.glob("rln_fast/_C*.pyd"))
    return found[0] if found else None


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def current_state(root: Path) -> dict:
    ext = _extension(root)
    # The environment (a venv's prefix; python and python3 are the same one) and version.
    python = f"{sys.prefix} (Python {sys.version.split()[0]})"
    return {"source": source_hash(root), "torch": _torch_version(), "python": python,
            "extension": None if ext is None else _file_hash(ext)}


def _location_check(root: Path) -> str | None:
    """None when ``import rln_fast`` in this Python finds this checkout; else where it goes.

    Run from a neutral folder: what the rln-fast command and scripts elsewhere get (the
    installed package, or PYTHONPATH), not the checkout that the current folder would give.
    Finding the package does not import it (nor torch): this check takes a moment."""
    code = ("import importlib.util as u; s = u.find_spec('rln_fast'); "
            "print(s.origin if s and s.origin else '')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    where = r.stdout.strip()
    if r.returncode != 0 or not where:
        return "rln_fast is not installed in this Python"
    if Path(where).resolve().parent.parent != root.resolve():
        return f"`import rln_fast` finds {Path(where).parent}, not this checkout"
    return None


def _import_check(root: Path) -> str | None:
    """None when ``import rln_fast`` loads this checkout and its extension; else why not
    (imports torch: seconds; run once, after a build)."""
    why = _location_check(root)
    if why:
        return why
    code = "import rln_fast._backend as b; print(b._IMPORT_ERROR or '')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    if r.returncode != 0:
        lines = (r.stderr.strip() or "no output").splitlines()
        return f"`import rln_fast` fails ({lines[-1]})"
    error = r.stdout.strip()
    return f"the extension does not import ({error})" if error else None


def _requirements(root: Path, extras: list[str]) -> list[str] | None:
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            return None
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def _missing(reqs: list[str]) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    missing = []
    for text in reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            missing.append(text)
    return missing


def parse_extras(text: str) -> list[str]:
    """'[dev]' or '[dev,zarr]' or '' -> ['dev'] ..."""
    inner = text.strip().strip("[]")
    return [e.strip() for e in inner.split(",") if e.strip()]


def plan(root: Path, extras: list[str], stamp_path: Path | None = None) -> tuple[int, list[str]]:
    """(NOTHING | BUILD | DEPS, lines saying why; for DEPS the missing requirements)."""
    stamp_path = root / STAMP if stamp_path is None else stamp_path
    state = current_state(root)
    if state["torch"] is None:
        return BUILD, ["torch is not installed"]
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        return BUILD, [f"no build record ({STAMP}): first build"]
    changed = [k for k in ("source", "torch", "python") if stamp.get(k) != state[k]]
    if changed:
        what = {"source": "csrc/, setup.py, pyproject.toml or a RLN_FAST_* switch changed",
                "torch": f"torch is {state['torch']}, the build was against {stamp.get('torch')}",
                "python": f"the build was for {stamp.get('python')}, not {state['python']}"}
        return BUILD, [what[k] for k in changed]
    if state["extension"] is None or stamp.get("extension") != state["extension"]:
        return BUILD, ["rln_fast/_C is missing or is not the one the last build made"]
    # The extension imported when the stamp was written (record), and nothing it depends on
    # changed since: only where Python finds the package is left to check.
    why = _location_check(root)
    if why:
        return BUILD, [why]
    reqs = _requirements(root, extras)
    if reqs is None:
        return BUILD, ["cannot read pyproject.toml's dependencies (Python < 3.11 without tomli)"]
    missing = _missing(reqs)
    if missing:
        return DEPS, missing
    return NOTHING, [f"up to date: extension built for torch {state['torch']}, "
                     f"dependencies{' and ' + ','.join(extras) + ' extras' if extras else ''} "
                     "installed"]


def record(root: Path, path: Path | None = None) -> None:
    """Write the stamp for the state now, after a successful build whose extension imports."""
    state = current_state(root)
    if state["extension"] is None:
        raise SystemExit("setup_check: no rln_fast/_C*.so after the build; nothing recorded")
    why = _import_check(root)
    if why:
        raise SystemExit(f"setup_check: the build did not give a working rln_fast: {why}")
    path = root / STAMP if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("plan", "done") or len(argv) > 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: setup_check.py plan|done [EXTRAS]", file=sys.stderr)
        return 64
    root = ROOT
    extras = parse_extras(argv[1] if len(argv) > 1 else "")
    if argv[0] == "done":
        record(root)
        return NOTHING
    code, lines = plan(root, extras)
    for line in lines:
        print(line)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
