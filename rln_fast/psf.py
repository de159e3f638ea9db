"""PSF models (Gaussian, Born–Wolf, Gibson–Lanni, confocal) and `prepare` for measured PSFs."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np

# scipy is imported inside the functions that use it: its signal module alone takes ~1 s to
# import, which every command that reads a PSF file would pay.

__all__ = ["gaussian", "born_wolf", "gibson_lanni", "confocal", "prepare", "for_image",
           "generated_shape", "read", "MODELS"]

# FWHM = 2·sqrt(2·ln 2)·σ for a Gaussian.
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_AXES = ("z", "y", "x")
_PIXEL_NODES = 6  # Gauss–Legendre nodes per lateral axis when a voxel's area is integrated

# An OPD model: (rho [n], z [nz]) -> optical path difference [nz, n] in µm.
_Opd = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_shape(shape: object, name: str = "shape") -> tuple[int, int, int]:
    try:
        items = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        items = None
    if items is None or len(items) != 3 or not all(_is_int(v) and v > 0 for v in items):
        raise ValueError(f"{name} must be 3 positive integers (z, y, x), got {shape!r}")
    return (int(items[0]), int(items[1]), int(items[2]))


def _check_triplet(value: object, name: str) -> tuple[float, float, float]:
    """Three positive finite numbers (z, y, x); a single number applies to all axes."""
    if _is_real(value):
        items: tuple = (value, value, value)
    else:
        try:
            items = tuple(value)  # type: ignore[arg-type]
        except TypeError:
            items = ()
    if len(items) != 3 or not all(_is_real(v) and math.isfinite(v) and v > 0 for v in items):
        raise ValueError(f"{name} must be 3 positive finite numbers (z, y, x) in µm, got {value!r}")
    return (float(items[0]), float(items[1]), float(items[2]))


def _check_positive(value: object, name: str, *, allow_zero: bool = False) -> float:
    ok = _is_real(value) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _check_wavelength(value: object, name: str) -> float:
    wl = _check_positive(value, name)
    # Fluorescence wavelengths are ~0.3–2 µm; a value in the hundreds is nanometres by mistake.
    if wl > 10.0:
        raise ValueError(
            f"{name}={value!r} µm is implausible: wavelengths are in micrometres "
            f"(write {wl / 1000:g} for {wl:g} nm)"
        )
    return wl


def _check_na(na: object, ni: float) -> float:
    if not (_is_real(na) and math.isfinite(na) and na > 0):
        raise ValueError(f"na must be a finite number > 0, got {na!r}")
    if na >= ni:
        raise ValueError(
            f"na={na!r} must be smaller than the immersion refractive index ni={ni!r} (NA = ni·sin θ)"
        )
    return float(na)


def _check_oversample(value: object) -> int:
    if not (_is_int(value) and value >= 1):
        raise ValueError(f"oversample must be an integer >= 1, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------
# grids and the radial pupil integral
# ---------------------------------------------------------------------------


def _axis_coords(n: int, step: float) -> np.ndarray:
    """Voxel-centre offsets in µm from the centre voxel ``n // 2``."""
    return (np.arange(n) - n // 2) * step


def _normalised_float32(psf: np.ndarray) -> np.ndarray:
    psf = np.maximum(psf, 0.0)
    return (psf / psf.sum()).astype(np.float32)


def _radial_psf(
    shape: tuple[int, int, int],
    voxel_size: tuple[float, float, float],
    *,
    wavelength: float,
    na: float,
    opd: _Opd,
    rho_max: float,
    oversample: int,
    integrate: bool = False,
) -> np.ndarray:
    """Scalar PSF |∫ J0(k·NA·r·ρ) exp(i·k·OPD(ρ, z)) ρ dρ|², float64, not normalised.

    k = 2π/λ with λ the vacuum wavelength; ρ ∈ [0, rho_max] is the normalised pupil radius.
    The integral is evaluated on one radial profile per z plane (radii every
    min(dy, dx)/oversample up to the grid corner) and interpolated onto the (y, x) grid
    with a cubic spline — the radial-profile scheme of Li, Xue & Blu (2017). integrate: each
    voxel gets the mean of the profile over its (y, x) area (Gauss–Legendre, _PIXEL_NODES²
    points) instead of its centre value; planes stay point samples.
    """
    from scipy import special
    from scipy.interpolate import CubicSpline

    nz, ny, nx = shape
    dz, dy, dx = voxel_size
    k = 2.0 * math.pi / wavelength
    z = _axis_coords(nz, dz)
    r_grid = np.hypot(_axis_coords(ny, dy)[:, None], _axis_coords(nx, dx)[None, :])
    step = min(dy, dx) / oversample
    # Cubic spline needs >= 4 knots; two spare knots keep the corner away from the end (and
    # half a voxel diagonal more when the voxel's area is integrated).
    reach = r_grid.max() + (0.5 * math.hypot(dy, dx) if integrate else 0.0)
    n_r = max(4, int(math.ceil(reach / step)) + 3)
    radii = np.arange(n_r) * step

    # Gauss–Legendre resolves an oscillating integrand with a little over half a node per
    # radian the phase turns through over the pupil: k·NA·r_max·rho_max for the Bessel
    # argument plus the OPD's total variation. 0.6 per radian + 64 spare nodes agrees with 4×
    # as many nodes to ~1e-8 of the peak.
    rho_fine = np.linspace(0.0, rho_max, 2049)
    turn = np.abs(np.diff(k * opd(rho_fine, z), axis=1)).sum(axis=1).max(initial=0.0)
    omega = k * na * radii[-1] * rho_max + turn
    n_nodes = int(min(20000, math.ceil(0.6 * omega) + 64))
    nodes, weights = special.roots_legendre(n_nodes)
    if rho_max < 1.0:
        # A pupil cut at n/NA ends on a square-root edge, sqrt(n² − NA²ρ²) → 0, where the
        # phase turns infinitely fast; ρ = rho_max·sin t turns it into n·cos t, smooth.
        t = 0.25 * math.pi * (nodes + 1.0)
        rho = rho_max * np.sin(t)
        weights = 0.25 * math.pi * rho_max * np.cos(t) * weights
    else:
        rho = 0.5 * rho_max * (nodes + 1.0)
        weights = 0.5 * rho_max * weights

    # The integral factorises into a (nz × n) pupil-phase matrix times an (n × n_r) Bessel
    # matrix, so every plane and radius costs one complex matrix product.
    pupil = np.exp(1j * k * opd(rho, z)) * (weights * rho)[None, :]
    bessel = special.j0(k * na * radii[:, None] * rho[None, :])
    profile = np.abs(pupil @ bessel.T) ** 2  # [nz, n_r]

    spline = CubicSpline(radii, profile, axis=1)
    if not integrate:
        psf = spline(r_grid)  # [nz, ny, nx]
    else:
        t, w = special.roots_legendre(_PIXEL_NODES)  # on [-1, 1], weights sum 2
        ys, xs = _axis_coords(ny, dy), _axis_coords(nx, dx)
        psf = np.zeros((nz, ny, nx))
        for ty, wy in zip(t, w, strict=True):
            for tx, wx in zip(t, w, strict=True):
                r = np.hypot(ys[:, None] + 0.5 * dy * ty, xs[None, :] + 0.5 * dx * tx)
                psf += (0.25 * wy * wx) * spline(r)
    # The spline can undershoot slightly near the dark rings.
    return np.maximum(psf, 0.0)


def _born_wolf_opd(ni: float, na: float, paraxial: bool = False) -> _Opd:
    # Exact (non-paraxial) defocus: a ray at pupil radius ρ leaves at n·sin θ = NA·ρ, so its
    # axial path per µm of defocus is sqrt(ni² − (NA·ρ)²). Born & Wolf's paraxial ½·NA²ρ²/ni
    # (deconwolf's dw_bw) overestimates the axial FWHM by ~50 % at NA 1.4.
    if paraxial:
        def opd(rho: np.ndarray, z: np.ndarray) -> np.ndarray:
            return z[:, None] * (0.5 * na**2 / ni) * rho[None, :] ** 2
    else:
        def opd(rho: np.ndarray, z: np.ndarray) -> np.ndarray:
            return -z[:, None] * np.sqrt(ni**2 - (na * rho[None, :]) ** 2)

    return opd


def _gibson_lanni_opd(
    *,
    na: float,
    ni: float,
    ns: float,
    ng: float,
    ni0: float,
    ng0: float,
    ti0: float,
    tg: float,
    tg0: float,
    particle_z: float,
) -> tuple[_Opd, float]:
    # Rays beyond the critical angle of a layer are evanescent there and do not reach the far
    # field (for sources deeper than ~λ), so the pupil ends at the smallest index in the path.
    rho_max = min(1.0, ns / na, ng / na, ng0 / na, ni0 / na)

    def opd(rho: np.ndarray, z: np.ndarray) -> np.ndarray:
        s2 = (na * rho[None, :]) ** 2

        def cos_path(n: float) -> np.ndarray:
            return np.sqrt(np.maximum(n * n - s2, 0.0))

        # Nominal focal depth below the coverslip f = particle_z + z; moving the focus deeper by
        # f thins the immersion layer to ti = ti0 − f (Gibson & Lanni 1991). The ti0 terms are
        # grouped so that they cancel exactly when ni == ni0.
        focus = particle_z + z[:, None]
        return (
            particle_z * cos_path(ns)
            + ti0 * (cos_path(ni) - cos_path(ni0))
            - focus * cos_path(ni)
            + tg * cos_path(ng)
            - tg0 * cos_path(ng0)
        )

    return opd, rho_max


# ---------------------------------------------------------------------------
# public models
# ---------------------------------------------------------------------------


def gaussian(
    shape: Sequence[int],
    voxel_size: Sequence[float] | float = (1.0, 1.0, 1.0),
    sigma: Sequence[float] | float | None = None,
    *,
    fwhm: Sequence[float] | float | None = None,
) -> np.ndarray:
    """Separable 3-D Gaussian PSF.

    Args:
        shape: (nz, ny, nx) voxels.
        voxel_size: (dz, dy, dx) in µm (a single number for all axes).
        sigma: standard deviation (s_z, s_y, s_x) in µm, or one number for all axes.
        fwhm: full width at half maximum (z, y, x) in µm instead of ``sigma`` (give one of them).

    Returns:
        float32 array of ``shape`` (z, y, x), sum 1, sampled at voxel centres, peak at
        voxel ``shape // 2``.
    """
    shape_t = _check_shape(shape)
    vs = _check_triplet(voxel_size, "voxel_size")
    if (sigma is None) == (fwhm is None):
        raise ValueError("give exactly one of sigma= or fwhm= (µm, per axis (z, y, x))")
    if sigma is not None:
        sig = _check_triplet(sigma, "sigma")
    else:
        sig = tuple(f / _FWHM_PER_SIGMA for f in _check_triplet(fwhm, "fwhm"))
    profiles = [
        np.exp(-0.5 * (_axis_coords(n, d) / s) ** 2)
        for n, d, s in zip(shape_t, vs, sig, strict=True)
    ]
    psf = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return _normalised_float32(psf)


def born_wolf(
    shape: Sequence[int],
    voxel_size: Sequence[float] | float,
    *,
    na: float,
    wavelength: float,
    ni: float = 1.515,
    oversample: int = 3,
    paraxial: bool = False,
    integrate: bool = False,
) -> np.ndarray:
    """Widefield scalar Born–Wolf PSF of an aberration-free objective.

    I(r, z) = |∫₀¹ J0(k·NA·r·ρ) · exp(−i·k·z·sqrt(ni² − NA²ρ²)) ρ dρ|², with k = 2π/λ and λ
    the vacuum emission wavelength. By default the defocus phase is the exact (non-paraxial)
    one, so the axial FWHM follows ≈ 0.88·λ/(ni − sqrt(ni² − NA²)) at high NA; the lateral
    FWHM at focus is ≈ 0.51·λ/NA. The PSF is symmetric in z. By default values are point
    samples at voxel centres.

    Which to use: the defaults are the better optics at high NA (the paraxial phase stretches
    the PSF along z: axial FWHM 585 nm instead of 370 nm for NA 1.45, ni 1.512, 461 nm).
    ``paraxial=True, integrate=True`` is deconwolf's ``dw_bw`` PSF (0.07 % relative L2
    for its DAPI demo optics): use it to reproduce deconwolf's results, or when a stack was
    tuned with deconwolf. Integration matters when the voxel is coarse against the PSF
    (lateral voxel > ~λ / (4 NA)).

    Args:
        shape: (nz, ny, nx) voxels.
        voxel_size: (dz, dy, dx) in µm.
        na: numerical aperture, 0 < na < ni.
        wavelength: emission wavelength in µm (e.g. 0.461 for DAPI).
        ni: refractive index of the immersion medium.
        oversample: radial samples per lateral voxel for the radial profile, which is then
            interpolated onto the grid.
        paraxial: use the paraxial defocus phase k·z·NA²ρ²/(2·ni) (Born & Wolf's textbook
            form, and deconwolf's) instead of the exact one.
        integrate: each voxel holds the mean intensity over its (y, x) area (as deconwolf's
            ``dw_bw``) instead of the value at its centre; planes are point samples either way.

    Returns:
        float32 array (z, y, x), sum 1, peak at voxel ``shape // 2``.
    """
    shape_t = _check_shape(shape)
    vs = _check_triplet(voxel_size, "voxel_size")
    ni = _check_positive(ni, "ni")
    na = _check_na(na, ni)
    wl = _check_wavelength(wavelength, "wavelength")
    oversample = _check_oversample(oversample)
    for name, flag in (("paraxial", paraxial), ("integrate", integrate)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    psf = _radial_psf(
        shape_t,
        vs,
        wavelength=wl,
        na=na,
        opd=_born_wolf_opd(ni, na, bool(paraxial)),
        rho_max=1.0,
        oversample=oversample,
        integrate=bool(integrate),
    )
    return _normalised_float32(psf)


def gibson_lanni(
    shape: Sequence[int],
    voxel_size: Sequence[float] | float,
    *,
    na: float,
    wavelength: float,
    ni: float = 1.515,
    ns: float = 1.33,
    ng: float = 1.515,
    ni0: float | None = None,
    ng0: float | None = None,
    ti0: float = 150.0,
    tg: float = 170.0,
    tg0: float | None = None,
    particle_z: float = 0.0,
    oversample: int = 3,
) -> np.ndarray:
    """Widefield scalar Gibson–Lanni PSF for a point source below a coverslip.

    The optical path difference between the actual and the design stratified medium
    (sample ns / coverslip ng, tg / immersion ni) for a source at depth ``particle_z``,
    with a pupil ray at n·sin θ = NA·ρ, is
    ``OPD = particle_z·√(ns²−s²) + ti0·(√(ni²−s²) − √(ni0²−s²)) − (particle_z + z)·√(ni²−s²)
    + tg·√(ng²−s²) − tg0·√(ng0²−s²)``, s = NA·ρ (Gibson & Lanni 1991), and
    I(r, z) = |∫ J0(k·NA·r·ρ) exp(i·k·OPD) ρ dρ|², k = 2π/λ. Following Li, Xue & Blu (2017)
    one radial profile per plane is computed and interpolated onto the grid; the pupil
    integral is done by Gauss–Legendre quadrature instead of their Bessel-series fit
    (accurate to quadrature precision, and still fast). The pupil is cut at the smallest
    refractive index on the path (rays beyond a critical angle are evanescent). With
    ns == ni == ng (and the design values equal to the actual ones) it equals ``born_wolf``.

    **z convention**: axis 0 is the nominal focal position relative to the source, positive
    = focal plane deeper into the sample (further from the coverslip) than the source, i.e.
    the same direction as increasing depth in a stack. With ns < ni the image of a deep
    source is in best focus at z > 0 (the actual focus lags the nominal one), and the
    intensity centroid moves to z > 0. The focal shift is kept: ``prepare`` re-centres.

    Args:
        shape: (nz, ny, nx) voxels.
        voxel_size: (dz, dy, dx) in µm.
        na: numerical aperture, 0 < na < ni.
        wavelength: emission wavelength in µm.
        ni, ni0: immersion index, actual and design (ni0 defaults to ni).
        ns: sample index.
        ng, ng0: coverslip index, actual and design (ng0 defaults to ng).
        ti0: design working distance (immersion thickness), µm.
        tg, tg0: coverslip thickness, actual and design (tg0 defaults to tg), µm.
        particle_z: depth of the source below the coverslip, µm (>= 0).
        oversample: radial samples per lateral voxel for the radial profile.

    Returns:
        float32 array (z, y, x), sum 1; the peak is at voxel ``shape // 2`` when there is no
        mismatch, shifted in z otherwise.
    """
    shape_t = _check_shape(shape)
    vs = _check_triplet(voxel_size, "voxel_size")
    opd, rho_max, na = _gibson_lanni_setup(
        na=na,
        ni=ni,
        ns=ns,
        ng=ng,
        ni0=ni0,
        ng0=ng0,
        ti0=ti0,
        tg=tg,
        tg0=tg0,
        particle_z=particle_z,
    )
    wl = _check_wavelength(wavelength, "wavelength")
    oversample = _check_oversample(oversample)
    psf = _radial_psf(
        shape_t, vs, wavelength=wl, na=na, opd=opd, rho_max=rho_max, oversample=oversample
    )
    return _normalised_float32(psf)


def _gibson_lanni_setup(
    *,
    na: float,
    ni: float,
    ns: float = 1.33,
    ng: float = 1.515,
    ni0: float | None = None,
    ng0: float | None = None,
    ti0: float = 150.0,
    tg: float = 170.0,
    tg0: float | None = None,
    particle_z: float = 0.0,
) -> tuple[_Opd, float, float]:
    ni = _check_positive(ni, "ni")
    na = _check_na(na, ni)
    ns = _check_positive(ns, "ns")
    ng = _check_positive(ng, "ng")
    ni0 = ni if ni0 is None else _check_positive(ni0, "ni0")
    ng0 = ng if ng0 is None else _check_positive(ng0, "ng0")
    ti0 = _check_positive(ti0, "ti0")
    tg = _check_positive(tg, "tg", allow_zero=True)
    tg0 = tg if tg0 is None else _check_positive(tg0, "tg0", allow_zero=True)
    particle_z = _check_positive(
        particle_z, "particle_z (depth below the coverslip, µm)", allow_zero=True
    )
    opd, rho_max = _gibson_lanni_opd(
        na=na,
        ni=ni,
        ns=ns,
        ng=ng,
        ni0=ni0,
        ng0=ng0,
        ti0=ti0,
        tg=tg,
        tg0=tg0,
        particle_z=particle_z,
    )
    return opd, rho_max, na


def _disk_kernel(radius: float, dy: float, dx: float) -> np.ndarray:
    """Uniform disk of ``radius`` µm on the (y, x) grid, area-weighted at the rim, sum 1."""
    hy, hx = int(math.ceil(radius / dy)), int(math.ceil(radius / dx))
    sub = 9  # sub-samples per voxel side: the rim weight is the covered fraction
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    yy = (np.arange(-hy, hy + 1)[:, None] + offs[None, :]).ravel() * dy
    xx = (np.arange(-hx, hx + 1)[:, None] + offs[None, :]).ravel() * dx
    inside = (yy[:, None] ** 2 + xx[None, :] ** 2) <= radius**2
    kernel = inside.reshape(2 * hy + 1, sub, 2 * hx + 1, sub).mean(axis=(1, 3))
    return kernel / kernel.sum()


def confocal(
    shape: Sequence[int],
    voxel_size: Sequence[float] | float,
    *,
    na: float,
    em_wavelength: float,
    ex_wavelength: float,
    ni: float = 1.515,
    pinhole: float | None = None,
    model: str = "born_wolf",
    **model_kwargs: float,
) -> np.ndarray:
    """Confocal PSF = excitation PSF × (emission PSF convolved with the pinhole).

    Args:
        shape: (nz, ny, nx) voxels.
        voxel_size: (dz, dy, dx) in µm.
        na: numerical aperture, 0 < na < ni.
        em_wavelength, ex_wavelength: emission and excitation wavelengths in µm.
        ni: immersion refractive index.
        pinhole: pinhole diameter in µm projected into the sample (physical diameter divided
            by the total magnification; 1 Airy unit = 1.22·em_wavelength/na). None or 0: an
            infinitely small pinhole, i.e. the plain product excitation × emission.
        model: "born_wolf" or "gibson_lanni" for both PSFs.
        **model_kwargs: further ``gibson_lanni`` arguments (ns, ng, particle_z, ...), or
            ``oversample``.

    Returns:
        float32 array (z, y, x), sum 1.
    """
    from scipy import signal

    shape_t = _check_shape(shape)
    vs = _check_triplet(voxel_size, "voxel_size")
    ni = _check_positive(ni, "ni")
    na = _check_na(na, ni)
    em = _check_wavelength(em_wavelength, "em_wavelength")
    ex = _check_wavelength(ex_wavelength, "ex_wavelength")
    oversample = _check_oversample(model_kwargs.pop("oversample", 3))
    if model == "born_wolf":
        if model_kwargs:
            raise ValueError(
                f"model='born_wolf' takes no extra arguments, got {sorted(model_kwargs)}; "
                "use model='gibson_lanni' for a stratified medium"
            )
        opd, rho_max = _born_wolf_opd(ni, na), 1.0
    elif model == "gibson_lanni":
        opd, rho_max, _ = _gibson_lanni_setup(na=na, ni=ni, **model_kwargs)
    else:
        raise ValueError(f"model must be 'born_wolf' or 'gibson_lanni', got {model!r}")
    if pinhole is not None:
        pinhole = _check_positive(
            pinhole, "pinhole (diameter in µm, sample space)", allow_zero=True
        )

    def radial(shp: tuple[int, int, int], wl: float) -> np.ndarray:
        return _radial_psf(
            shp, vs, wavelength=wl, na=na, opd=opd, rho_max=rho_max, oversample=oversample
        )

    excitation = radial(shape_t, ex)
    if not pinhole:
        emission = radial(shape_t, em)
    else:
        kernel = _disk_kernel(0.5 * pinhole, vs[1], vs[2])
        py, px = kernel.shape[0] // 2, kernel.shape[1] // 2
        # Compute the emission PSF on a grid padded by the pinhole radius so that the
        # "valid" convolution returns the original grid without truncated edges.
        padded = radial((shape_t[0], shape_t[1] + 2 * py, shape_t[2] + 2 * px), em)
        emission = signal.fftconvolve(padded, kernel[None], mode="valid", axes=(1, 2))
    return _normalised_float32(excitation * emission)


# ---------------------------------------------------------------------------
# prepare: measured (or generated) PSF -> deconvolution-ready PSF
# ---------------------------------------------------------------------------


def _border_median(arr: np.ndarray) -> float:
    faces = [arr[0], arr[-1], arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1]]
    return float(np.median(np.concatenate([f.ravel() for f in faces])))


def _fwhm_voxels(arr: np.ndarray, centre: Sequence[int]) -> tuple[float, float, float]:
    """FWHM in voxels along each axis through ``centre`` (linear interpolation of the half-max
    crossings; the profile length when it never falls below half)."""
    out = []
    for axis in range(3):
        index = list(centre)
        index[axis] = slice(None)
        line = arr[tuple(index)]
        c = centre[axis]
        half = 0.5 * line[c]
        if not half > 0:
            out.append(0.0)
            continue
        width = 0.0
        for direction in (-1, 1):
            i = c
            while 0 <= i + direction < line.size and line[i + direction] > half:
                i += direction
            j = i + direction
            if not 0 <= j < line.size:
                width += abs(i - c) + 0.5
                continue
            # line[i] > half >= line[j]: interpolate the crossing between them.
            frac = (line[i] - half) / (line[i] - line[j])
            width += abs(i - c) + frac
        out.append(width)
    return (out[0], out[1], out[2])


def _centre_of_mass(arr: np.ndarray, centre: Sequence[int], half: Sequence[int]) -> np.ndarray:
    """Centre of mass (voxel units) of ``arr`` in the box ``centre ± half``, clipped to the array."""
    from scipy import ndimage

    lo = [max(0, c - h) for c, h in zip(centre, half, strict=True)]
    hi = [min(n, c + h + 1) for n, c, h in zip(arr.shape, centre, half, strict=True)]
    box = arr[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    total = box.sum()
    if total <= 0:
        return np.asarray(centre, dtype=float)
    com = ndimage.center_of_mass(box)
    return np.asarray(com) + np.asarray(lo)


def _centre(arr: np.ndarray) -> np.ndarray:
    """Odd-sized copy of ``arr`` with its peak on the centre voxel, to sub-voxel accuracy.

    The peak position is the centre of mass in a box of ± FWHM/4 (at least ± 1 voxel) around
    the brightest voxel: less noisy than a parabola fit, and a small box keeps it within a
    fraction of a voxel of the maximum even for axially asymmetric (Gibson–Lanni) PSFs.
    """
    from scipy import ndimage

    # A 3³ box filter keeps a single hot voxel from winning over the real peak; the brightest
    # voxel next to the filtered maximum is the peak (the filter ties on a lone bright voxel).
    smooth = np.unravel_index(np.argmax(ndimage.uniform_filter(arr, 3, mode="constant")), arr.shape)
    lo = [max(0, int(c) - 1) for c in smooth]
    near = arr[lo[0] : smooth[0] + 2, lo[1] : smooth[1] + 2, lo[2] : smooth[2] + 2]
    peak = tuple(int(v) for v in np.add(np.unravel_index(np.argmax(near), near.shape), lo))
    half = [max(1, int(round(0.25 * f))) for f in _fwhm_voxels(arr, peak)]
    coarse = np.rint(_centre_of_mass(arr, peak, half)).astype(int)

    # Integer part: zero-pad so that the coarse centre is the middle of an odd-sized array;
    # nothing is lost, unlike a circular roll.
    pads = []
    for n, c in zip(arr.shape, coarse, strict=True):
        h = max(int(c), n - 1 - int(c))
        pads.append((h - int(c), h - (n - 1 - int(c))))
    padded = np.pad(arr, pads)
    mid = np.array([n // 2 for n in padded.shape])
    half = [min(h, int(m)) for h, m in zip(half, mid, strict=True)]

    # Sub-voxel part, found on a small block around the centre: the cubic-spline shift that
    # puts the box centre of mass on the middle voxel. The box is symmetric about the centre
    # only once the PSF is centred, so iterate; secant steps per axis, because the response of
    # a boxed centre of mass to a shift is well below 1 for broad PSFs.
    margin = np.minimum(np.asarray(half) + 4, mid)
    block = padded[
        tuple(slice(int(m - g), int(m + g + 1)) for m, g in zip(mid, margin, strict=True))
    ]

    def residual(shift: np.ndarray) -> np.ndarray:
        moved = ndimage.shift(block, shift, order=3, mode="grid-constant", cval=0.0)
        return _centre_of_mass(np.maximum(moved, 0.0), margin, half) - margin

    s_prev, r_prev = np.zeros(3), residual(np.zeros(3))
    s_cur = -r_prev
    for _ in range(20):
        r_cur = residual(s_cur)
        if np.abs(r_cur).max() < 1e-3:
            break
        ds = s_cur - s_prev
        safe = np.where(np.abs(ds) > 1e-9, ds, 1.0)
        gain = np.where(np.abs(ds) > 1e-9, (r_cur - r_prev) / safe, 1.0)
        gain = np.clip(gain, 0.05, 2.0)
        s_prev, r_prev = s_cur, r_cur
        # A centred integer peak needs at most ~1 voxel more: bound runaway secant steps.
        s_cur = np.clip(s_cur - r_cur / gain, -1.5, 1.5)

    out = ndimage.shift(padded, s_cur, order=3, mode="grid-constant", cval=0.0)
    out = np.maximum(out, 0.0)
    return out / out.sum()


def _resample(arr: np.ndarray, src: Sequence[float], dst: Sequence[float]) -> np.ndarray:
    """Resample an odd-sized, centred PSF from voxel size ``src`` to ``dst`` (µm, (z, y, x)),
    keeping the centre voxel at the centre and the physical extent."""
    from scipy import ndimage

    ratio = np.asarray(dst, dtype=float) / np.asarray(
        src, dtype=float
    )  # input voxels per output voxel
    c_in = np.asarray([n // 2 for n in arr.shape], dtype=float)
    half_out = np.floor(c_in / ratio + 1e-9).astype(int)
    out_shape = tuple(int(2 * h + 1) for h in half_out)
    # Output voxel o sits at (o − half_out)·dst µm from the centre, i.e. input index
    # c_in + (o − half_out)·dst/src.
    out = ndimage.affine_transform(
        arr,
        ratio,
        offset=c_in - half_out * ratio,
        output_shape=out_shape,
        order=3,
        mode="grid-constant",
        cval=0.0,
    )
    return np.maximum(out, 0.0)


def _crop_to_support(arr: np.ndarray, threshold: float) -> np.ndarray:
    """Smallest odd crop symmetric about the centre voxel holding every voxel > threshold·max."""
    mask = arr > threshold * arr.max()
    centre = [n // 2 for n in arr.shape]
    slices = []
    for axis, c in enumerate(centre):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        h = int(np.abs(idx - c).max()) if idx.size else 0
        slices.append(slice(c - h, c + h + 1))
    return arr[tuple(slices)]


def prepare(
    psf: np.ndarray,
    psf_voxel_size: Sequence[float] | float | None = None,
    image_voxel_size: Sequence[float] | float | None = None,
    *,
    background: str | float | None = "auto",
    crop: bool = True,
    threshold: float = 1e-4,
    image_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Make a measured or generated PSF ready for deconvolution.

    Steps, in order: subtract the background, clip negatives to 0, normalise to sum 1,
    centre the peak on the middle voxel with sub-voxel accuracy (centre of mass around the
    peak, cubic-spline shift), resample from ``psf_voxel_size`` to ``image_voxel_size``
    (cubic spline about the centre voxel, point sampling), crop to the support, and
    normalise to sum 1 again. The result always has odd sizes with the peak at ``shape // 2``.

    Args:
        psf: 3-D array (z, y, x), any real dtype (even sizes accepted).
        psf_voxel_size: (dz, dy, dx) of ``psf`` in µm.
        image_voxel_size: (dz, dy, dx) of the image in µm; with ``psf_voxel_size`` the PSF is
            resampled onto this grid.
        background: "auto" (median of the border voxels), a number in the PSF's units, or
            None (no subtraction; use it for model PSFs).
        crop: crop to the voxels above ``threshold``·max (symmetric about the centre). Without
            cropping the centred PSF may be larger than the input, since centring zero-pads.
        threshold: relative support threshold, 0 <= threshold < 1.
        image_shape: (nz, ny, nx) of the image; warns when the PSF is larger in any axis.

    Returns:
        float32 array (z, y, x), sum 1, non-negative, odd sizes, peak centred.

    Warns:
        UserWarning when the PSF is larger than ``image_shape`` or under-sampled
        (FWHM < 2 voxels along an axis).
    """
    arr = np.asarray(psf)
    if arr.ndim != 3:
        raise ValueError(
            f"psf must be a 3-D (z, y, x) array, got a {arr.ndim}-D array of shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"psf must not be empty, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"psf must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(
            f"psf contains {bad} NaN or Inf value(s); replace them before preparing the PSF"
        )
    src = None if psf_voxel_size is None else _check_triplet(psf_voxel_size, "psf_voxel_size")
    dst = None if image_voxel_size is None else _check_triplet(image_voxel_size, "image_voxel_size")
    if dst is not None and src is None:
        raise ValueError("image_voxel_size needs psf_voxel_size too: give both to resample the PSF")
    if not (_is_real(threshold) and 0.0 <= threshold < 1.0):
        raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")
    image_shape_t = None if image_shape is None else _check_shape(image_shape, "image_shape")

    if background is None:
        level = 0.0
    elif isinstance(background, str):
        if background != "auto":
            raise ValueError(f"background must be 'auto', a number or None, got {background!r}")
        level = _border_median(arr)
    elif _is_real(background) and math.isfinite(background):
        level = float(background)
    else:
        raise ValueError(f"background must be 'auto', a number or None, got {background!r}")
    arr = np.maximum(arr - level, 0.0)
    total = arr.sum()
    if not total > 0:
        raise ValueError(
            f"psf has no signal left after background subtraction (background level {level:g}, "
            f"sum {total:g}): it must sum to > 0; check the input or pass a smaller background"
        )
    arr /= total

    arr = _centre(arr)
    if src is not None and dst is not None and src != dst:
        arr = _resample(arr, src, dst)
        if not arr.sum() > 0:
            raise ValueError(
                f"psf vanished when resampled from {src} to {dst} µm: image voxels too coarse"
            )
        arr /= arr.sum()
    if crop:
        arr = _crop_to_support(arr, threshold)
    arr = arr / arr.sum()

    centre = tuple(n // 2 for n in arr.shape)
    if image_shape_t is not None:
        larger = [a for a, p, i in zip(_AXES, arr.shape, image_shape_t, strict=True) if p > i]
        if larger:
            warnings.warn(
                f"PSF shape {arr.shape} is larger than the image shape {image_shape_t} along "
                f"{', '.join(larger)}; crop the PSF (crop=True, a larger threshold) or pad the image",
                stacklevel=2,
            )
    fwhm = _fwhm_voxels(arr, centre)
    # Length-1 axes are 2-D PSFs stored as 3-D, not under-sampled ones.
    coarse = [
        f"{a} ({f:.2f} voxels)"
        for a, f, n in zip(_AXES, fwhm, arr.shape, strict=True)
        if f < 2.0 and n > 1
    ]
    if coarse:
        warnings.warn(
            f"PSF is under-sampled: FWHM < 2 voxels along {', '.join(coarse)}; "
            "deconvolution of such data gains little resolution and may ring",
            stacklevel=2,
        )
    return arr.astype(np.float32)


# ------------------------------------------------------------------ PSFs for an image's run

MODELS = ("born-wolf", "gibson-lanni")  # the widefield models a run can generate per channel
# The largest PSF generated for an image by default (z, y, x): the image's sides up to these,
# then cropped to the PSF's support; a widefield PSF as large as a big volume costs more than
# its far tails give.
_MAX_GENERATED = (65, 129, 129)


def generated_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """Grid of the PSF generated for an image when no size is given: the image's sides (odd;
    an even side loses one voxel), at most 65 x 129 x 129. :func:`for_image` then crops it to
    its support. A widefield PSF about as deep as the stack models the haze that every plane
    receives from the others, which a shallower one leaves in the result."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (z, y, x), got {tuple(image_shape)}")
    return tuple(max(1, min(int(n) - 1 + int(n) % 2, cap))  # type: ignore[return-value]
                 for n, cap in zip(image_shape, _MAX_GENERATED, strict=True))


def for_image(image_shape: Sequence[int], voxel_size: Sequence[float], *, na: float,
              wavelength: float, ni: float = 1.515, model: str = "born-wolf",
              shape: Sequence[int] | None = None) -> np.ndarray:
    """The widefield PSF (``model``: "born-wolf" or "gibson-lanni", the latter with its default
    coverslip and sample parameters) that a run generates for an image of ``image_shape``
    sampled at ``voxel_size`` (dz, dy, dx) µm: on the grid ``shape``, or on
    :func:`generated_shape` cropped to its support. float32, sum 1."""
    name = str(model).lower().replace("_", "-")
    if name not in MODELS:
        raise ValueError(f"the PSF model must be one of {', '.join(MODELS)}, got {model!r}")
    fn = born_wolf if name == "born-wolf" else gibson_lanni
    grid = generated_shape(image_shape) if shape is None else _check_shape(shape, "psf_shape")
    k = fn(grid, tuple(voxel_size), na=na, wavelength=wavelength, ni=ni)
    if shape is None:
        k = prepare(k, background=None, crop=True)
    return np.asarray(k, np.float32)


def read(path: str | os.PathLike, voxel_size: Sequence[float] | None = None) -> np.ndarray:
    """A PSF file (TIFF, Zarr) as a float32 array, resampled (:func:`prepare`) to
    ``voxel_size`` (dz, dy, dx) µm when the file records a different voxel size of its own."""
    from rln_fast import io

    arr, meta = io.read(path)
    own = meta.get("voxel_size")
    if own and voxel_size and not np.allclose(own, voxel_size, rtol=1e-3):
        arr = prepare(arr, own, voxel_size)
    return np.asarray(arr, np.float32)
