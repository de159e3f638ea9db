"""Loads rln_fast._C once and records what it was built with; nothing here touches CUDA."""

from __future__ import annotations

import platform
import warnings

import torch

try:
    from . import _C  # noqa: F401

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # the extension was not built, or was built against another torch
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Build facts read once at import, so ops traced by torch.compile see constants.
BUILT_WITH_CUDA: bool = bool(_C is not None and _C.built_with_cuda())
CUDA_ARCH: str = _C.cuda_arch() if BUILT_WITH_CUDA else ""

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (CUDA kernels need a CUDA build of "
    "torch and nvcc; RLN_FAST_FORCE_CUDA=1 makes a missing toolkit an error)"
)


def require_c(op: str):
    """The compiled extension, or an ImportError that says how to build it."""
    if _C is None:
        raise ImportError(f"rln_fast.{op}: the compiled extension rln_fast._C is missing "
                          f"({_IMPORT_ERROR}); {_BUILD_HINT}")
    return _C


_warned: set[str] = set()


def use_reference(op: str, device: torch.device) -> bool:
    """True when `device` has no compiled kernel: warns once per op and device type."""
    if device.type == "cpu":
        require_c(op)
        return False
    if device.type == "cuda" and BUILT_WITH_CUDA:
        return False
    key = f"{op}:{device.type}"
    if key not in _warned:
        _warned.add(key)
        why = ("rln_fast._C was built without CUDA kernels" if device.type == "cuda"
               else f"rln_fast has no kernels for {device.type}")
        warnings.warn(f"rln_fast.{op}: {why}; running the pure-torch reference instead "
                      f"({_BUILD_HINT})", RuntimeWarning, stacklevel=3)
    return True


def direct(*tensors: torch.Tensor | list | None) -> bool:
    """True when an op may call its C++ kernel straight away instead of through its torch
    custom op: plain tensors (not the fake or functional tensors of torch.compile, export and
    opcheck), no gradient to record and no autocast to apply. The custom-op dispatcher's first
    call imports torch._dynamo (1-2 s and about 80 MiB per process), which inference and
    Richardson–Lucy's eager loop never need."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    device = None
    for t in tensors:
        for u in (t if isinstance(t, (list, tuple)) else (t,)):
            if u is None:
                continue
            if type(u) is not torch.Tensor or (grad and u.requires_grad):
                return False
            device = device or u.device.type
    return device is None or not torch.is_autocast_enabled(device)


def register_float32_autocast(*ops: str) -> None:
    """Under torch.autocast (CPU or CUDA) these custom ops take their float16/bfloat16 inputs as
    float32 (float64 stays float64): the kernels exist for float32 and float64 only."""
    for op in ops:
        for device_type in ("cpu", "cuda"):
            torch.library.register_autocast(op, device_type, torch.float32)


def backend_info() -> dict:
    """What rln_fast can run here: compiled backends, CUDA architectures, versions, and why not."""
    info = {
        "cpu": _C is not None,
        "cuda": BUILT_WITH_CUDA,
        "cuda_arch": [a for a in CUDA_ARCH.replace(";", " ").split() if a],
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if _C is None:
        info["error"] = _IMPORT_ERROR
    if not BUILT_WITH_CUDA:
        info["cuda_missing_reason"] = (
            "rln_fast._C is not built" if _C is None
            else "rln_fast._C was built without CUDA kernels (CPU torch or no nvcc at build time)"
        )
    elif torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
