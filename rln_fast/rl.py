"""Classic Richardson–Lucy deconvolution: FFT and direct paths on the fused rl_* / psf_conv_* ops."""

from __future__ import annotations

import hashlib
import itertools
import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .ops import rl_classic as ops

__all__ = ["richardson_lucy", "clear_otf_cache"]

_METHODS = ("fft", "direct")
_EDGES = ("bertero", "periodic", "reflect")
_ACCELERATIONS = ("shb", "biggs", "none", None)
# Bertero weights: work voxels whose PSF footprint catches <= 1 % of its light inside the image are
# not estimated (weight 0); the few-percent voxels at the far corner of the extension would
# otherwise get weights ~ 100 and amplify noise. deconwolf uses the same cut.
_BERTERO_THRESHOLD = 1e-2
_DIRECT_MAX = 7  # largest PSF side of the direct path (after even sides are padded to odd)
_AUTO_PERCENTILE = 1.0  # background="auto": this percentile of the image
_TINY = 1e-30  # smallest previous estimate the prediction divides by
_QUANTILE_MAX = 1 << 24  # torch.quantile's input limit; larger images are subsampled
_CENTRE_TOLERANCE = 1.0  # voxels between the PSF's centre of mass and shape // 2 before we warn
# Small OTF cache: repeated calls with one PSF and shape skip an FFT, without holding much memory.
_OTF_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_OTF_CACHE_BYTES = 256 << 20
_OTF_CACHE_ENTRIES = 8


def clear_otf_cache() -> None:
    """Drop the OTFs that :func:`richardson_lucy` keeps for repeated calls (at most 256 MiB)."""
    _OTF_CACHE.clear()


# --- arrays in and out ------------------------------------------------------------------------

def _is_cupy(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def _as_tensor(a: Any, name: str) -> tuple[torch.Tensor, str]:
    """(tensor on its own device, kind in {"numpy", "torch", "cupy"}); cupy via DLPack."""
    if isinstance(a, torch.Tensor):
        return a.detach(), "torch"
    if _is_cupy(a):
        return torch.from_dlpack(a), "cupy"
    try:
        arr = np.asarray(a)
    except Exception as exc:  # noqa: BLE001 - anything numpy cannot read is the caller's type error
        raise TypeError(f"{name} must be a numpy array, torch tensor or cupy array, got "
                        f"{type(a).__name__}") from exc
    if arr.dtype.kind not in "biufc":  # strings, objects, dates: not an image
        raise TypeError(f"{name} must be a numpy array, torch tensor or cupy array of numbers, "
                        f"got {type(a).__name__}" + (f" of dtype {arr.dtype}" if isinstance(a, np.ndarray) else ""))
    # Big-endian arrays (from some files) become native: torch holds native order only.
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))), "numpy"


# RL sums over the whole image in float32: the zero frequency of its FFTs (sum of values) and
# Biggs' dot products (sums of squared changes) overflow past ~3.4e38. Images whose sum of
# squares stays under this limit run finite (values up to ~1e20 ran finite at 2k voxels).
MAX_SUM_SQUARES = 1e37


def check_magnitude(sum_squares: float, name: str = "image") -> None:
    """Refuse an image whose sum of squared values (``sum_squares``, float64) would overflow
    RL's float32 sums; the message says how to scale it."""
    if not sum_squares < MAX_SUM_SQUARES:
        raise ValueError(f"{name} values are too large for Richardson-Lucy in float32 (sum of "
                         f"squares {sum_squares:.3g} >= {MAX_SUM_SQUARES:.0e}); divide the image "
                         "by a constant (e.g. 1e20) and multiply the result back")


def _sum_squares(t: torch.Tensor, step: int = 1 << 20) -> float:
    flat = t.reshape(-1)
    return float(sum(flat[i:i + step].double().square().sum() for i in range(0, flat.numel(), step)))


def _check_real(t: torch.Tensor, name: str) -> None:
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")


def _to_kind(t: torch.Tensor, kind: str, device: torch.device) -> Any:
    if kind == "numpy":
        return t.cpu().numpy()
    t = t.to(device)
    if kind == "cupy":
        import cupy  # noqa: PLC0415 - only when the input was cupy

        return cupy.from_dlpack(t)
    return t


# --- argument checks --------------------------------------------------------------------------

def _check_args(num_iter, method, acceleration, tv, background, edges, callback, rtol) -> None:
    if isinstance(num_iter, bool) or not isinstance(num_iter, numbers.Integral):
        raise TypeError(f"num_iter must be an integer >= 0, got {num_iter!r}")
    if num_iter < 0:
        raise ValueError(f"num_iter must be >= 0, got {num_iter}")
    if method not in _METHODS:
        raise ValueError(f"method must be 'fft' or 'direct', got {method!r}")
    if acceleration not in _ACCELERATIONS:
        raise ValueError(f"acceleration must be 'shb', 'biggs' or 'none' (or None), got {acceleration!r}")
    if not (isinstance(tv, numbers.Real) and math.isfinite(tv) and tv >= 0):
        raise ValueError(f"tv must be a finite number >= 0 (e.g. 0.002), got {tv!r}")
    if not (background == "auto" or (isinstance(background, numbers.Real)
                                      and not isinstance(background, bool)
                                      and math.isfinite(background))):
        raise ValueError(f"background must be a finite number or 'auto', got {background!r}")
    if edges not in _EDGES:
        raise ValueError(f"edges must be 'bertero', 'periodic' or 'reflect', got {edges!r}")
    if method == "direct" and edges == "periodic":
        raise ValueError("edges='periodic' needs method='fft': the direct path pads with zeros "
                         "(use edges='bertero' or 'reflect' with method='direct')")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(i, estimate), got {callback!r}")
    if rtol is not None and not (isinstance(rtol, numbers.Real) and rtol > 0):
        raise ValueError(f"rtol must be None or a number > 0, got {rtol!r}")


def _prepare_psf(psf: Any, image_shape: tuple[int, ...], method: str, edges: str) -> np.ndarray:
    """The PSF as float64 numpy, checked, sum 1; even sides padded to odd for the direct path.

    Any size: Bertero and reflect jobs grow with the PSF (image + PSF - 1 per axis); a periodic
    job is the image itself, so a PSF larger than the image is cropped to it (with a warning)."""
    t, _ = _as_tensor(psf, "psf")
    _check_real(t, "psf")
    k = t.detach().cpu().to(torch.float64).numpy()
    if k.ndim != 3:
        raise ValueError(f"psf must be 3-D (z, y, x), got a {k.ndim}-D array of shape {k.shape}")
    if k.size == 0:
        raise ValueError(f"psf must not be empty, got shape {k.shape}")
    bad = k.size - int(np.isfinite(k).sum())
    if bad:
        raise ValueError(f"psf contains {bad} NaN or Inf value(s); replace them (rln_fast.psf.prepare "
                         "cleans a measured PSF)")
    total = float(k.sum())
    if not total > 0:
        raise ValueError(f"psf must sum to > 0, got sum {total:g}; an RL PSF is a non-negative "
                         "intensity distribution")
    if k.min() < 0:
        warnings.warn(f"psf has negative values (min {k.min():g}); they are set to 0 "
                      "(rln_fast.psf.prepare subtracts the background properly)", stacklevel=3)
        k = np.maximum(k, 0.0)
    if edges == "periodic":
        k = _crop_to_image(k, image_shape)
    k = k / float(k.sum())
    centre = np.array([n // 2 for n in k.shape], dtype=float)
    com = np.array([float(k.sum(axis=tuple(a for a in range(3) if a != axis)) @ np.arange(n))
                    for axis, n in enumerate(k.shape)])
    if np.abs(com - centre).max() > _CENTRE_TOLERANCE:
        warnings.warn(
            f"psf is off-centre: its centre of mass is at {tuple(round(float(c), 2) for c in com)}, but RL takes "
            f"voxel shape // 2 = {tuple(int(c) for c in centre)} as the centre, so the result "
            "will be shifted; centre it with rln_fast.psf.prepare(psf)", stacklevel=3)
    if method == "direct":
        # Even sides get a zero plane at the end: the centre stays at shape // 2.
        k = np.pad(k, [(0, 1 - n % 2) for n in k.shape])
        if max(k.shape) > _DIRECT_MAX:
            raise ValueError(f"method='direct' is for PSFs up to {_DIRECT_MAX}x{_DIRECT_MAX}x"
                             f"{_DIRECT_MAX} voxels (even sides count one more), got "
                             f"{tuple(t.shape)}; use method='fft'")
    return k


def _crop_to_image(k: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """The periodic job: a PSF side longer than the image's is cropped to the image's, about
    the centre voxel (which stays at shape // 2); a warning says how much light is dropped."""
    if all(p <= i for p, i in zip(k.shape, image_shape, strict=True)):
        return k
    sl = tuple(slice(p // 2 - min(p, i) // 2, p // 2 - min(p, i) // 2 + min(p, i))
               for p, i in zip(k.shape, image_shape, strict=True))
    cropped = k[sl]
    kept = float(cropped.sum() / k.sum())
    if not kept > 0:
        raise ValueError(f"psf {k.shape} cropped to the image {tuple(image_shape)} for "
                         "edges='periodic' holds no light; use edges='bertero'")
    warnings.warn(f"psf {k.shape} is larger than the image {tuple(image_shape)}: with "
                  f"edges='periodic' it is cropped to {cropped.shape} ({kept:.1%} of its light "
                  "kept); edges='bertero' (the default) uses all of it", stacklevel=4)
    return cropped


def _auto_background(img: torch.Tensor) -> float:
    flat = img.reshape(-1)
    if flat.numel() > _QUANTILE_MAX:
        flat = flat[:: -(-flat.numel() // _QUANTILE_MAX)]
    return float(torch.quantile(flat.double(), _AUTO_PERCENTILE / 100))


# --- geometry ---------------------------------------------------------------------------------

def _fast_len(n: int, even: bool = False) -> int:
    """Smallest 2^a 3^b 5^c 7^d >= n (even when asked): sizes every FFT library does quickly."""
    best = None
    p2 = 1
    while p2 < 2 * n:
        p3 = p2
        while p3 < 2 * n:
            p5 = p3
            while p5 < 2 * n:
                p7 = p5
                while p7 < 2 * n:
                    if p7 >= n and (not even or p7 % 2 == 0) and (best is None or p7 < best):
                        best = p7
                    p7 *= 7
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return best if best is not None else n


def _reflect_index(n: int, lo: int, hi: int, device) -> torch.Tensor:
    """Indices of an axis of n voxels mirror-padded by lo before and hi after (no edge repeat)."""
    return torch.as_tensor(np.pad(np.arange(n), (lo, hi), mode="reflect" if n > 1 else "edge"),
                           device=device)


def _reflect_pad(img: torch.Tensor, lo: list[int], hi: list[int]) -> torch.Tensor:
    out = img
    for axis in range(3):
        if lo[axis] or hi[axis]:
            out = out.index_select(axis, _reflect_index(img.shape[axis], lo[axis], hi[axis], img.device))
    return out.contiguous()


def _centro_symmetric(psf: np.ndarray) -> bool:
    """psf(c + d) == psf(c - d) about its centre voxel (to 1e-6 of the peak): its OTF is real.
    Compared plane against mirrored plane: no temporaries the size of the PSF."""
    if any(n % 2 == 0 for n in psf.shape):
        return False
    tol = 1e-6 * float(psf.max())
    last = psf.shape[0] - 1
    return all(float(np.abs(psf[z] - psf[last - z, ::-1, ::-1]).max()) <= tol
               for z in range(psf.shape[0] // 2 + 1))


def _wrapped(psf: np.ndarray, shape: tuple[int, ...], scale: float, device: torch.device) -> torch.Tensor:
    """scale * psf embedded in a zero float32 volume of `shape` with its centre voxel at 0 and
    the rest wrapped around (torch.roll of the embedded PSF, without a pass over the volume)."""
    k = torch.zeros(shape, dtype=torch.float32, device=device)
    src = torch.as_tensor(psf * scale, dtype=torch.float32, device=device)
    # Per axis: taps c.. of the PSF go to 0.., taps ..c to the end of the axis.
    parts = [[(slice(c, p), slice(0, p - c)), (slice(0, c), slice(n - c, n))]
             for p, n, c in ((p, n, p // 2) for p, n in zip(psf.shape, shape, strict=True))]
    for (sz, dz), (sy, dy), (sx, dx) in itertools.product(*parts):
        k[dz, dy, dx] = src[sz, sy, sx]
    return k


def _otf(psf: np.ndarray, shape: tuple[int, ...], device: torch.device,
         scale: float = 1.0, r2c: Callable | None = None) -> torch.Tensor:
    """rfftn of the PSF embedded in a zero volume of `shape` with its centre rolled to voxel 0,
    times `scale` (the CPU path folds the inverse FFT's 1 / N into it); r2c(real, spectrum):
    the job's own transform instead of torch.fft.rfftn (CPU only).

    A centro-symmetric PSF (Gaussian, Born–Wolf, ...) has a real OTF, and Hᵀ multiplies by it
    too, with no conjugate. Off the CPU only its real part is kept (float32, half the memory and
    traffic). On the CPU it stays complex: torch's CPU kernels multiply a complex tensor by a
    real one (or by a conjugate view) about 5x slower than by a complex one (55 vs 10 ms for
    6.7M values on 2 threads), which cost a third of each iteration."""
    key = (hashlib.blake2b(psf.tobytes(), digest_size=16).hexdigest(), psf.shape, tuple(shape), str(device),
           scale)
    hit = _OTF_CACHE.get(key)
    if hit is not None:
        _OTF_CACHE.move_to_end(key)
        return hit
    k = _wrapped(psf, shape, scale, device)
    if r2c is not None:
        otf = r2c(k, torch.empty((*shape[:2], shape[2] // 2 + 1), dtype=torch.complex64))
    else:
        otf = torch.fft.rfftn(k)
    del k
    if torch.device(device).type != "cpu" and _centro_symmetric(psf):
        otf = otf.real.contiguous()
    nbytes = otf.numel() * otf.element_size()
    if nbytes <= _OTF_CACHE_BYTES:
        _OTF_CACHE[key] = otf
        while (len(_OTF_CACHE) > _OTF_CACHE_ENTRIES
               or sum(v.numel() * v.element_size() for v in _OTF_CACHE.values()) > _OTF_CACHE_BYTES):
            _OTF_CACHE.popitem(last=False)
    return otf


# --- CPU FFTs: MKL's own 3-D real transforms ---------------------------------------------------
#
# torch's CPU FFTs are MKL's DFTI, but torch.fft.irfftn runs a multi-dimensional c2r as a c2c
# over the leading axes (out of place, writing a transposed layout) and then a 1-D c2r along the
# strided result: 2-3x the time of its rfftn. DFTI's own 3-D c2r costs about what its r2c does.
# torch's Linux x86-64 builds with MKL export DFTI from libtorch_cpu, so the CPU job calls it
# there with committed plans and its own buffers; anywhere else, or if the plan fails its
# check against torch.fft, the job uses torch.fft.

# The DFTI configuration values used here, as mkl_dfti.h numbers them (a stable C ABI).
_DFTI = {"NUMBER_OF_TRANSFORMS": 7, "CONJUGATE_EVEN_STORAGE": 10, "PLACEMENT": 11,
         "INPUT_STRIDES": 12, "OUTPUT_STRIDES": 13, "INPUT_DISTANCE": 14, "OUTPUT_DISTANCE": 15,
         "COMPLEX": 32, "REAL": 33, "COMPLEX_COMPLEX": 39, "NOT_INPLACE": 44}
_dfti_lib: Any = None  # the ctypes library once loaded and checked, False where unusable


def _load_dfti() -> Any:
    """libtorch_cpu's DFTI entry points (ctypes), or None."""
    import ctypes  # noqa: PLC0415 - only on the CPU path
    import os  # noqa: PLC0415
    import platform  # noqa: PLC0415
    import sys  # noqa: PLC0415

    # DftiSetValue is variadic: called through ctypes with integer and pointer arguments only,
    # which the x86-64 System V convention passes as for a plain function.
    if sys.platform != "linux" or platform.machine() != "x86_64" or not torch.backends.mkl.is_available():
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
        for name in ("DftiCreateDescriptor_s_md", "DftiSetValue", "DftiCommitDescriptor",
                     "DftiComputeForward", "DftiComputeBackward", "DftiFreeDescriptor"):
            getattr(lib, name).restype = ctypes.c_long
    except (OSError, AttributeError):
        return None
    return lib


class _DftiPlan:
    """A committed single-precision DFTI plan in one direction: forward (r2c, c2c) or backward
    (c2r, c2c; unscaled). `batch` transforms of `lengths`, `dist` (in, out) elements apart, with
    per-axis element strides (in, out); the complex side of a real transform in CCE storage
    (x // 2 + 1 along the last axis). Out of place unless `inplace`."""

    def __init__(self, lib: Any, lengths: tuple[int, ...], *, real: bool, forward: bool,
                 strides: tuple[tuple[int, ...], tuple[int, ...]], batch: int = 1,
                 dist: tuple[int, int] = (0, 0), inplace: bool = False):
        import ctypes  # noqa: PLC0415

        self._lib, self._c, self._inplace = lib, ctypes, inplace
        self.handle = ctypes.c_void_p()
        long = ctypes.c_long
        n = len(lengths)
        if lib.DftiCreateDescriptor_s_md(ctypes.byref(self.handle),
                                         long(_DFTI["REAL" if real else "COMPLEX"]), long(n),
                                         (long * n)(*lengths)) != 0:
            self.handle = None
            raise RuntimeError(f"DFTI could not create a plan for {lengths}")
        steps = [(_DFTI["INPUT_STRIDES"], (long * (n + 1))(0, *strides[0])),  # offset, then axes
                 (_DFTI["OUTPUT_STRIDES"], (long * (n + 1))(0, *strides[1]))]
        if not inplace:
            steps.append((_DFTI["PLACEMENT"], long(_DFTI["NOT_INPLACE"])))
        if real:
            steps.append((_DFTI["CONJUGATE_EVEN_STORAGE"], long(_DFTI["COMPLEX_COMPLEX"])))
        if batch > 1:
            steps += [(_DFTI["NUMBER_OF_TRANSFORMS"], long(batch)),
                      (_DFTI["INPUT_DISTANCE"], long(dist[0])),
                      (_DFTI["OUTPUT_DISTANCE"], long(dist[1]))]
        for param, value in steps:
            if lib.DftiSetValue(self.handle, long(param), value) != 0:
                raise RuntimeError(f"DFTI could not configure a plan for {lengths}")
        if lib.DftiCommitDescriptor(self.handle) != 0:
            raise RuntimeError(f"DFTI could not commit a plan for {lengths}")
        self._run = lib.DftiComputeForward if forward else lib.DftiComputeBackward

    def __call__(self, src: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
        ptr = self._c.c_void_p
        args = (ptr(src.data_ptr()),) if self._inplace else (ptr(src.data_ptr()), ptr(dst.data_ptr()))
        status = self._run(self.handle, *args)
        if status != 0:
            raise RuntimeError(f"rln_fast.richardson_lucy: MKL DFTI failed (status {status})")
        return src if self._inplace else dst

    def __del__(self):
        if getattr(self, "handle", None):
            self._lib.DftiFreeDescriptor(self._c.byref(self.handle))


class _CpuFFT:
    """The CPU job's transforms through DFTI: r2c and unscaled c2r of a contiguous work volume
    (z, y, x) and its (z, y, x // 2 + 1) spectrum. Each job commits plans of its own (well
    under a millisecond), so that no plan is shared between threads that deconvolve at once.

    With `depth` < z (the Bertero job: the image fills planes z < depth), the `box` variants skip
    the planes the image leaves out: r2c of a volume that is 0 beyond them (2-D r2c of those
    planes, then an in-place c2c along z), and a c2r whose caller reads those planes only (an
    in-place c2c along z that overwrites the spectrum, then 2-D c2r of those planes; the other
    planes of the output are left as they were): about a tenth of each transform."""

    def __init__(self, lib: Any, shape: tuple[int, ...], depth: int):
        z, y, x = shape
        h = x // 2 + 1
        real, spec = (y * x, x, 1), (y * h, h, 1)
        self.r2c = _DftiPlan(lib, shape, real=True, forward=True, strides=(real, spec))
        self.c2r = _DftiPlan(lib, shape, real=True, forward=False, strides=(spec, real))
        self.depth = depth
        if depth < z:
            self._planes_r2c = _DftiPlan(lib, (y, x), real=True, forward=True, batch=depth,
                                         dist=(y * x, y * h), strides=(real[1:], spec[1:]))
            self._planes_c2r = _DftiPlan(lib, (y, x), real=True, forward=False, batch=depth,
                                         dist=(y * h, y * x), strides=(spec[1:], real[1:]))
            along_z = dict(real=False, batch=y * h, dist=(1, 1), strides=((y * h,), (y * h,)),
                           inplace=True)
            self._z_forward = _DftiPlan(lib, (z,), forward=True, **along_z)
            self._z_backward = _DftiPlan(lib, (z,), forward=False, **along_z)

    def r2c_box(self, x: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
        """r2c of x [..., z, y, x], which is 0 in planes >= depth."""
        if self.depth == spec.shape[0]:
            return self.r2c(x, spec)
        self._planes_r2c(x, spec)
        spec[self.depth:].zero_()
        return self._z_forward(spec)

    def c2r_box(self, spec: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Unscaled c2r into planes < depth of out; spec is overwritten."""
        if self.depth == spec.shape[0]:
            return self.c2r(spec, out)
        self._planes_c2r(self._z_backward(spec), out)
        return out


def _dfti() -> Any:
    """The DFTI library when it is there and its transforms match torch.fft's, else None."""
    global _dfti_lib
    if _dfti_lib is None:
        _dfti_lib = False
        lib = _load_dfti()
        if lib is not None:
            try:
                shape = (3, 5, 6)  # odd and even sides
                x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
                fft = _CpuFFT(lib, shape, shape[0])
                spec = fft.r2c(x, torch.empty(3, 5, 4, dtype=torch.complex64))
                back = fft.c2r(spec.clone(), torch.empty(shape))
                if (torch.allclose(spec, torch.fft.rfftn(x), rtol=1e-5, atol=1e-5)
                        and torch.allclose(back / x.numel(), x, rtol=1e-5, atol=1e-6)):
                    _dfti_lib = lib
            except RuntimeError:
                pass
    return _dfti_lib or None


def _cpu_fft(shape: tuple[int, ...], depth: int) -> _CpuFFT | None:
    """DFTI transforms of a CPU work shape (see _CpuFFT), or None: then torch.fft."""
    lib = _dfti()
    if lib is None:
        return None
    try:
        return _CpuFFT(lib, tuple(shape), depth)
    except RuntimeError:
        return None


class _Job:
    """One deconvolution problem: the work volume, where the image sits in it, and its update."""

    shape: tuple[int, ...]       # work volume (z, y, x)
    origin: tuple[int, ...]      # image voxel (0, 0, 0) in the work volume
    weights: ops.EdgeWeights | None

    def __init__(self, bg: float, eps: float, tv: float, tv_eps: float):
        self.bg, self.eps, self.tv, self.tv_eps = bg, eps, tv, tv_eps
        self._spare: torch.Tensor | None = None

    def crop(self, x: torch.Tensor, m: tuple[int, ...]) -> torch.Tensor:
        o = self.origin
        return x[0, 0, o[0]:o[0] + m[0], o[1]:o[1] + m[1], o[2]:o[2] + m[2]]

    def recycle(self, t: torch.Tensor) -> None:
        """The solver hands back an estimate-sized volume it no longer reads: the next update's
        output, instead of a new allocation."""
        self._spare = t

    def initial(self, level: float) -> torch.Tensor:
        """The first estimate: `level` everywhere without weights; with Bertero weights exactly
        `level` where the voxel is estimated (w > 0) and 0 where it is not, so that Biggs' first
        change does not count the voxels the first update zeroes. Exactly flat on every device:
        level * (H^T 1_M) * w is 1 only to rounding (~1e-5 by FFT), and RL-TV's normalised
        gradient, regularised by tv_eps = 1e-3 level, turns that ripple into differences of
        ~1e-4 after a few iterations. Where w is not stored (GPU) it is taken once here,
        transiently (two work volumes, fewer than one FFT of the mask needs)."""
        if self.weights is None:
            return torch.full((1, 1, *self.shape), level, dtype=torch.float32, device=self.image.device)
        like = torch.empty((1, 1, *self.shape), dtype=torch.float32, device=self.image.device)
        w = self.weights.dense
        if w is None:
            w = ops.store_edge_weights(self.weights, like).dense
        return like.zero_().masked_fill_(w > 0, level)

    def _take_spare(self, like: torch.Tensor) -> torch.Tensor:
        out = self._spare if self._spare is not None else torch.empty_like(like)
        self._spare = None
        return out


class _FFTJob(_Job):
    """Circular convolution by rfftn on the work volume; rl_ratio and rl_update around it."""

    def __init__(self, img: torch.Tensor, psf: np.ndarray, edges: str, **kw):
        super().__init__(**kw)
        m, p = img.shape, psf.shape
        self.weights = None
        if edges == "periodic":
            self.shape, self.origin, self.image = tuple(m), (0, 0, 0), img
        else:
            # Image + PSF - 1 per axis: the blur of everything the image sees fits without wrapping
            # onto the image; rounded up to a fast FFT size. Bertero takes one voxel more, never
            # estimated, between the two ends of its border (which meet on the circular job),
            # so that the TV term sees 0 beyond the border as on the zero-padded direct job.
            gap = 1 if edges == "bertero" else 0
            self.shape = tuple(_fast_len(a + b - 1 + gap, even=(i == 2))
                               for i, (a, b) in enumerate(zip(m, p, strict=True)))
            if edges == "bertero":
                # The image in the corner, the unobserved border estimated with weights 1 / H^T 1_M.
                self.origin, self.image = (0, 0, 0), img
                self.weights = ops.edge_weights(psf, self.shape, m, circular=True,
                                                threshold=_BERTERO_THRESHOLD, device=img.device)
            else:  # reflect: the job is the mirror-padded image, all of it observed
                lo = [b - 1 - b // 2 for b in p]
                hi = [s - a - b for s, a, b in zip(self.shape, m, lo, strict=True)]
                self.origin, self.image = tuple(lo), _reflect_pad(img, lo, hi)
        self.image5 = self.image[None, None]
        self._symmetric = _centro_symmetric(psf)  # H^T = H: no conjugate
        # CPU: DFTI plans, one spectrum and one real scratch volume kept across iterations, and
        # the c2r's 1 / N folded into the OTF. Elsewhere (CUDA, no DFTI): torch.fft. Only the
        # Bertero job leaves planes out of the image (its box starts at the origin).
        depth = m[0] if edges == "bertero" else self.shape[0]
        self._plans = _cpu_fft(self.shape, depth) if img.device.type == "cpu" else None
        if self._plans is None:
            self.otf = _otf(psf, self.shape, img.device)
        else:
            self.otf = _otf(psf, self.shape, img.device, scale=1.0 / math.prod(self.shape),
                            r2c=self._plans.r2c)
            half = (*self.shape[:2], self.shape[2] // 2 + 1)
            self._spec = torch.empty(half, dtype=torch.complex64)
            self._real = torch.empty((1, 1, *self.shape), dtype=torch.float32)
        if self.weights is not None and img.device.type == "cpu":
            # On the CPU w is stored once (one real volume) rather than evaluated per voxel in
            # every update, which with a large PSF is most of the update's time; GPU kernels
            # evaluate it at no cost next to their memory traffic.
            self.weights = ops.store_edge_weights(self.weights, self.image5.new_empty((1, 1, *self.shape)))

    def recycle(self, t: torch.Tensor) -> None:
        if self._plans is not None:  # torch.fft allocates its outputs: nothing to reuse
            super().recycle(t)

    def _blur_spectrum_(self, spec: torch.Tensor, adjoint: bool) -> None:
        """spec *= OTF (H) or its conjugate (H^T), in place; a real OTF is its own conjugate."""
        if not adjoint or self._symmetric:
            spec.mul_(self.otf)
        elif spec.device.type == "cpu":
            # s conj(H) = conj(conj(s) H): two conjugating passes and a complex product take
            # half the time of torch's CPU product with a conjugate view.
            spec.conj_physical_().mul_(self.otf).conj_physical_()
        else:
            spec.mul_(self.otf.conj())

    def _convolve(self, x: torch.Tensor, adjoint: bool, out: torch.Tensor | None,
                  zero_outside: bool = False, read_inside: bool = False) -> torch.Tensor:
        """H x or H^T x of a work volume [1, 1, *shape], written into `out` when given (DFTI).
        zero_outside: x is 0 beyond the image's planes; read_inside: the caller reads the result
        in the image's planes only (DFTI then skips the others)."""
        if self._plans is None:
            spec = torch.fft.rfftn(x[0, 0])
            self._blur_spectrum_(spec, adjoint)
            return torch.fft.irfftn(spec, s=self.shape)[None, None]
        fft, spec = self._plans, self._spec
        x = x.contiguous()
        fft.r2c_box(x, spec) if zero_outside else fft.r2c(x, spec)
        self._blur_spectrum_(spec, adjoint)
        out = out if out is not None else torch.empty_like(x)
        return fft.c2r_box(spec, out) if read_inside else fft.c2r(spec, out)

    def update_(self, y, previous, change):
        # blurred = H y, read in the image's box only; ratio = image / blurred in its place, 0
        # outside the box; correction = H^T ratio.
        scratch = self._real if self._plans is not None else None
        blurred = self._convolve(y, False, scratch, read_inside=True)
        # The ratio is written in the planes DFTI's box transform reads (those of the image on
        # the Bertero job); torch.fft reads them all.
        depth = self._plans.depth if self._plans is not None else self.shape[0]
        ratio = blurred
        ops.rl_ratio_(blurred[:, :, :depth], self.image5, self.bg, self.eps)
        del blurred
        corr = self._convolve(ratio, True, self._take_spare(y) if self._plans is not None else None,
                              zero_outside=True)
        del ratio
        dots = ops.rl_update_(corr, y, self.weights, self.tv, 0.0, self.tv_eps,
                              previous=previous, change=change)
        return corr, dots


class _DirectJob(_Job):
    """Direct convolution with a small PSF, zero padding: psf_conv_ratio and psf_conv_update."""

    def __init__(self, img: torch.Tensor, psf: np.ndarray, edges: str, **kw):
        super().__init__(**kw)
        m, p = img.shape, psf.shape
        c = [b // 2 for b in p]
        self.psf = torch.as_tensor(psf, dtype=torch.float32, device=img.device)
        if edges == "bertero":
            # The estimate extends c beyond the image on every side (image + PSF - 1), as the FFT job.
            self.shape = tuple(a + b - 1 for a, b in zip(m, p, strict=True))
            self.origin, self.image = tuple(c), img
            self.weights = ops.edge_weights(psf, self.shape, m, self.origin, circular=False,
                                            threshold=_BERTERO_THRESHOLD, device=img.device)
        else:  # reflect: the mirror-padded image is observed everywhere; zero padding beyond it
            self.image = _reflect_pad(img, c, c)
            self.shape, self.origin = tuple(self.image.shape), tuple(c)
            self.weights = ops.edge_weights(psf, self.shape, self.shape, circular=False,
                                            threshold=_BERTERO_THRESHOLD, device=img.device)
        self.image5 = self.image[None, None]

    def update_(self, y, previous, change):
        ratio = ops.psf_conv_ratio(self.image5, y, self.psf, self.bg, self.eps)
        out = self._take_spare(y)
        dots = ops.psf_conv_update_(out, y, ratio, self.psf, self.weights, self.tv, 0.0, self.tv_eps,
                                    previous=previous, change=change)
        return out, dots


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415 - optional dependency, imported when used
    except ImportError:
        return None
    return tqdm(total=total, desc="richardson_lucy", unit="it", leave=False)


# --- the solver -------------------------------------------------------------------------------

def richardson_lucy(
    image: Any,
    psf: Any,
    num_iter: int = 20,
    *,
    method: str = "fft",
    acceleration: str | None = "shb",
    tv: float = 0.0,
    background: float | str = "auto",
    edges: str = "bertero",
    device: torch.device | str | None = None,
    callback: Callable[[int, torch.Tensor], Any] | None = None,
    progress: bool = True,
    rtol: float | None = None,
    tile: Any = None,
    memory_budget: Any = None,
) -> Any:
    """Richardson–Lucy deconvolution of a 3-D image (z, y, x).

    Args:
        image: numpy array, torch tensor (any device) or cupy array (z, y, x), any real dtype.
            The result has the same type and device (cupy through DLPack, without a copy).
        psf: 3-D (z, y, x), any size, also larger than the image (deconwolf's 79-plane PSFs of
            40-plane stacks): "bertero" and "reflect" jobs grow to image + PSF - 1 per axis;
            "periodic" crops a longer side to the image's about the centre voxel, with a
            warning giving the light kept. Normalised to sum 1 here. Its centre is
            voxel ``shape // 2`` on every axis (for an even side, the voxel just past the
            middle, numpy's fftshift convention and where ``rln_fast.psf`` puts the peak); an
            off-centre PSF gets a warning, ``rln_fast.psf.prepare`` centres it.
        num_iter: iterations (0 returns the image as float32).
        method: "fft" (rfftn; any PSF size) or "direct" (small PSFs up to 7x7x7: fused direct
            convolutions, zero padding; no FFT, no OTF).
        acceleration: how each RL step is taken from an extrapolated prediction
            y = x_k + a (x_k - x_{k-1}):

            - "shb" (default; scaled heavy ball, Wang & Miller 2014, as deconwolf's default):
              a = (k - 1) / (k + 2) at the k-th extrapolation (0, 1/4, 2/5, ...).
            - "biggs" (Biggs & Andrews 1997): a = <g_k-1, g_k-2> / <g_k-2, g_k-2> clipped to
              [0, 1], g the RL changes.
            - "none" or None: plain RL.

            Either way a voxel the last step shrank (x_k < x_{k-1}) is never predicted below
            x_k (1 - a + a x_k / x_{k-1}): a straight-line extrapolation of a voxel that RL
            shrinks by more than half per step would reach 0, where multiplicative RL can never
            bring it back (the dark halos of clipping at 0). On deconwolf's DAPI stack "shb"
            at 10 iterations is within 5 % relative L2 of plain RL at 20, with no zeros.
        tv: RL-TV regularisation weight (Dey et al. 2006; typical 0.001-0.01), 0 for none.
        background: constant b in the model image = psf * object + b, or "auto" (default:
            the image's 1st percentile, computed exactly over all voxels; robust to a few
            dark or hot pixels, unlike the minimum deconwolf takes). Output is the object, b
            not added back. Give 0 for data whose background is already subtracted.
        edges: "bertero" (default; deconwolf-style: the object is estimated on image + PSF - 1
            per axis with Bertero–Boccacci weights 1/(H^T 1) on the observed image, so objects
            beyond the border are modelled and nothing rings there), "periodic" (plain
            circular convolution on the image; fastest, wraps across borders) or "reflect"
            (the image mirror-padded by half the PSF, cropped at the end).
        device: where to compute (default: the image's device). The result returns to the
            image's device.
        callback: called as callback(i, estimate) after iteration i = 1..num_iter with the
            current estimate over the image (a float32 torch view on the compute device; copy
            it to keep it). Returning True stops the iterations.
        progress: show a tqdm bar when tqdm is installed.
        rtol: stop once ||x_k+1 - x_k|| / ||x_k+1|| < rtol (None: run num_iter iterations).
        tile: None (the whole image at once), an int or (D, H, W): run tile by tile with
            these core sides, each tile reading a halo of two PSF extents per axis and solved
            on its own (same edges mode). Plain RL and "shb" (whose steps depend on the
            iteration only, the same in every tile) then differ from the untiled result by
            ~1e-5 (plain) to ~1e-4 ("shb") of the maximum at most, at the seams. With "biggs" each tile extrapolates
            with its own step sizes, so tiles differ from the untiled run by ~1% (RMS)
            everywhere, each still a proper accelerated RL result.
            background="auto" is taken over the whole image.
        memory_budget: bytes or a string such as "4GB" for one tile's working memory on
            ``device``; the largest tile that fits is used (tile and memory_budget exclude
            each other). A budget the whole job fits in runs untiled.

    Returns:
        float32 deconvolved image (z, y, x), not clipped or rescaled.

    Memory (FFT path, V = work-volume voxels): the estimate and the OTF (~V complex/2), with
    acceleration also the step (Biggs: and the change); transiently
    one spectrum and one real volume per FFT.
    Bertero weights: on the GPU computed per voxel from the PSF's summed-volume table, never
    stored; on the CPU stored once per job (one real volume more, which saves most of each
    update's time with a large PSF). The image is used in place when it is float32 on the
    compute device.
    """
    _check_args(num_iter, method, acceleration, tv, background, edges, callback, rtol)
    if tile is not None or memory_budget is not None:
        return _tiled(image, psf, tile, memory_budget, device, progress, callback,
                      dict(num_iter=num_iter, method=method, acceleration=acceleration, tv=tv,
                           background=background, edges=edges, rtol=rtol))
    src, kind = _as_tensor(image, "image")
    _check_real(src, "image")
    if src.dim() != 3:
        raise ValueError(f"image must be 3-D (z, y, x), got {src.dim()}-D of shape {tuple(src.shape)}")
    if src.numel() == 0:
        raise ValueError(f"image must not be empty, got shape {tuple(src.shape)}")
    out_device = src.device
    dev = torch.device(device) if device is not None else src.device
    k = _prepare_psf(psf, tuple(src.shape), method, edges)

    with torch.no_grad():
        img = src.to(device=dev, dtype=torch.float32).contiguous()
        bad = img.numel() - int(torch.isfinite(img).sum())
        if bad:
            raise ValueError(f"image contains {bad} NaN or Inf value(s); replace them before "
                             "deconvolving")
        check_magnitude(_sum_squares(img), "image")
        if num_iter == 0:
            return _to_kind(img.clone() if img.data_ptr() == src.data_ptr() else img, kind, out_device)
        bg = _auto_background(img) if background == "auto" else float(background)
        # The flat start: the mean signal above the background (RL is invariant to its scale).
        level = float(torch.clamp_min(img - bg, 0).mean())
        if not level > 0:  # nothing above the background: the object is 0
            return _to_kind(torch.zeros_like(img), kind, out_device)
        kw = dict(bg=bg, eps=1e-6 * level, tv=float(tv), tv_eps=1e-3 * level)
        job = (_FFTJob if method == "fft" else _DirectJob)(img, k, edges, **kw)
        x = _solve(job, level, tuple(img.shape), num_iter, acceleration, callback, progress, rtol)
        return _to_kind(x, kind, out_device)


def _predict(x: torch.Tensor, step: torch.Tensor, a: float) -> torch.Tensor:
    """The accelerated prediction max(x + a step, x (1 - a + a min(x / x_prev, 1))), formed in
    step's buffer; x_prev = x - step. The floor keeps a shrinking voxel from being extrapolated
    to 0 (where multiplicative RL would keep it): at a = 1 it is the geometric step x² / x_prev.

    Where step >= 0 the first term wins; where step < 0 the floor exceeds it by
    a (x - x_prev)² / x_prev, so both cases are x + a step x / max(x_prev, x): one fused pass
    (ops.rl_predict_) instead of nine."""
    return ops.rl_predict_(step, x, a, _TINY)


def _solve(job: _Job, level: float, m: tuple[int, ...], num_iter: int, acceleration, callback,
           progress: bool, rtol) -> torch.Tensor:
    x = job.initial(level)
    accelerated = acceleration not in (None, "none")
    biggs = acceleration == "biggs"
    step = change = None
    alpha, prev_self = 0.0, 0.0
    bar = _progress_bar(num_iter, progress)
    try:
        for i in range(1, num_iter + 1):
            if accelerated:
                if step is None:
                    y = x.clone()
                    change = torch.zeros_like(x) if biggs else None
                else:
                    a = alpha if biggs else (i - 2) / (i + 1)  # shb: (k - 1) / (k + 2), k = i - 1
                    y = _predict(x, step, a)
                new, dots = job.update_(y, x, change)
                # x now holds new - x_k: the next step.
                step, x = x, new
                if biggs:
                    cross, self_ = dots.tolist()
                    alpha = min(max(cross / prev_self, 0.0), 1.0) if prev_self > 0 else 0.0
                    prev_self = self_
                job.recycle(y)
                del y
                delta = step
            else:
                new, _ = job.update_(x, None, None)
                delta = new - x if rtol is not None else None
                job.recycle(x)
                x = new
            if bar is not None:
                bar.update(1)
            if callback is not None and callback(i, job.crop(x, m)) is True:
                break
            if rtol is not None:
                norm = float(torch.linalg.vector_norm(x))
                if norm > 0 and float(torch.linalg.vector_norm(delta)) / norm < rtol:
                    break
    finally:
        if bar is not None:
            bar.close()
    return job.crop(x, m).contiguous()


def _tiled(image: Any, psf: Any, tile: Any, memory_budget: Any, device: Any, progress: bool,
           callback: Any, kw: dict[str, Any]) -> Any:
    """richardson_lucy tile by tile (see its ``tile`` argument)."""
    from rln_fast import tiling  # noqa: PLC0415 - tiling imports nothing of rl, kept lazy anyway

    if callback is not None:
        raise ValueError("callback= needs the whole image at once; it cannot be combined with "
                         "tile= or memory_budget=")
    src, kind = _as_tensor(image, "image")
    _check_real(src, "image")
    if src.dim() != 3:
        raise ValueError(f"image must be 3-D (z, y, x), got {src.dim()}-D of shape {tuple(src.shape)}")
    dev = torch.device(device) if device is not None else src.device
    k = _prepare_psf(psf, tuple(src.shape), kw["method"], kw["edges"])
    halo = tiling.rl_halo(k.shape)
    shape = tuple(src.shape)
    extra = tuple(p - 1 for p in k.shape) if kw["edges"] == "bertero" else (0, 0, 0)
    core = tiling.plan_core(shape, tile, memory_budget, dev, tiling.RL_BYTES_PER_VOXEL, halo,
                            extra=extra)
    if kw["background"] == "auto":
        with torch.no_grad():
            kw["background"] = _auto_background(src.to(dev, torch.float32))
    tiles = tiling.tile_grid(shape, core, halo)

    def block(b: torch.Tensor) -> torch.Tensor:
        return richardson_lucy(b.to(dev), k, device=dev, progress=False, **kw)

    out = tiling.run_tiles(src, tiles, block, "richardson_lucy tiles", progress)
    return _to_kind(out, kind, src.device)
