"""Tests for rln_fast.psf: model PSFs against textbook widths, the z convention, and prepare()."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from rln_fast import psf

# The DAPI demo stack (deconwolf): pixel 130 nm, 300 nm planes, emission 461 nm, NA 1.45, oil 1.512.
DAPI = dict(voxel_size=(0.3, 0.13, 0.13), na=1.45, wavelength=0.461, ni=1.512)
DAPI_STACK = Path(__file__).resolve().parents[2] / "shared" / "data" / "deconwolf" / "dapi_001.tif"


def fwhm_1d(profile: np.ndarray, spacing: float = 1.0) -> float:
    """FWHM of a single-peaked 1-D profile, half-maximum crossings linearly interpolated."""
    p = np.asarray(profile, dtype=float)
    c = int(np.argmax(p))
    half = 0.5 * p[c]
    width = 0.0
    for step in (-1, 1):
        i = c
        while 0 <= i + step < p.size and p[i + step] > half:
            i += step
        j = i + step
        assert 0 <= j < p.size, "profile never falls to half maximum"
        width += abs(i - c) + (p[i] - half) / (p[i] - p[j])
    return width * spacing


def centre(a: np.ndarray) -> tuple[int, int, int]:
    return tuple(n // 2 for n in a.shape)


def axial_fwhm_formula(wavelength: float, na: float, ni: float) -> float:
    return 0.88 * wavelength / (ni - math.sqrt(ni**2 - na**2))


def gaussian_blob(shape, mu, sigma) -> np.ndarray:
    """Analytic Gaussian centred at ``mu`` (voxel units, may be fractional)."""
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    return np.exp(-0.5 * sum(((g - m) / s) ** 2 for g, m, s in zip(grids, mu, sigma, strict=True)))


GENERATORS = {
    "gaussian": lambda shape, vs: psf.gaussian(shape, vs, sigma=(0.4, 0.15, 0.15)),
    "born_wolf": lambda shape, vs: psf.born_wolf(shape, vs, na=1.4, wavelength=0.52),
    "gibson_lanni": lambda shape, vs: psf.gibson_lanni(
        shape, vs, na=1.4, wavelength=0.52, ns=1.515, particle_z=3.0
    ),
    "confocal": lambda shape, vs: psf.confocal(
        shape, vs, na=1.4, em_wavelength=0.52, ex_wavelength=0.488
    ),
    "confocal_pinhole": lambda shape, vs: psf.confocal(
        shape, vs, na=1.4, em_wavelength=0.52, ex_wavelength=0.488, pinhole=0.45
    ),
}


# ---------------------------------------------------------------------------
# every model: sum, dtype, centre, symmetry
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GENERATORS))
@pytest.mark.parametrize("shape", [(21, 33, 33), (20, 32, 32), (1, 15, 15)])
def test_models_sum_to_one_with_peak_at_centre(name, shape):
    a = GENERATORS[name](shape, (0.15, 0.07, 0.07))
    assert a.shape == shape and a.dtype == np.float32
    assert np.isfinite(a).all() and a.min() >= 0
    assert a.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(np.argmax(a), a.shape) == centre(a)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_models_are_symmetric_in_x_and_y(name):
    a = GENERATORS[name]((15, 31, 31), (0.2, 0.08, 0.08))
    np.testing.assert_allclose(a, a.transpose(0, 2, 1), rtol=0, atol=1e-6 * a.max())
    # Mirror symmetry about the centre voxel in y and x (odd sizes).
    np.testing.assert_allclose(a, a[:, ::-1, :], rtol=0, atol=1e-6 * a.max())
    np.testing.assert_allclose(a, a[:, :, ::-1], rtol=0, atol=1e-6 * a.max())


def test_born_wolf_is_symmetric_in_z():
    a = psf.born_wolf((41, 33, 33), (0.1, 0.05, 0.05), na=1.3, wavelength=0.6)
    np.testing.assert_allclose(a, a[::-1], rtol=0, atol=1e-6 * a.max())


def test_anisotropic_voxels_follow_the_physical_size():
    # The same PSF sampled with dx twice dy is twice as narrow in x voxels.
    a = psf.born_wolf((11, 65, 33), (0.2, 0.05, 0.1), na=1.3, wavelength=0.6)
    fy = fwhm_1d(a[5, :, 16], 0.05)
    fx = fwhm_1d(a[5, 32, :], 0.1)
    assert fx == pytest.approx(fy, rel=0.05)


# ---------------------------------------------------------------------------
# Gaussian
# ---------------------------------------------------------------------------


def test_gaussian_width_and_fwhm_argument():
    sigma = (0.6, 0.25, 0.3)
    a = psf.gaussian((41, 61, 61), (0.1, 0.05, 0.05), sigma=sigma)
    c = centre(a)
    widths = [
        fwhm_1d(a[:, c[1], c[2]], 0.1),
        fwhm_1d(a[c[0], :, c[2]], 0.05),
        fwhm_1d(a[c[0], c[1], :], 0.05),
    ]
    expected = [2.3548 * s for s in sigma]
    np.testing.assert_allclose(widths, expected, rtol=0.02)
    b = psf.gaussian((41, 61, 61), (0.1, 0.05, 0.05), fwhm=tuple(expected))
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-9)
    # A single number applies to every axis.
    np.testing.assert_allclose(
        psf.gaussian((9, 9, 9), 0.1, sigma=0.2),
        psf.gaussian((9, 9, 9), (0.1,) * 3, sigma=(0.2,) * 3),
    )


def test_gaussian_needs_exactly_one_width():
    with pytest.raises(ValueError, match="exactly one of sigma= or fwhm="):
        psf.gaussian((9, 9, 9))
    with pytest.raises(ValueError, match="exactly one of sigma= or fwhm="):
        psf.gaussian((9, 9, 9), sigma=1.0, fwhm=2.0)
    with pytest.raises(ValueError, match="sigma must be 3 positive finite numbers"):
        psf.gaussian((9, 9, 9), sigma=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="fwhm must be 3 positive finite numbers"):
        psf.gaussian((9, 9, 9), fwhm=(1.0, 1.0))


# ---------------------------------------------------------------------------
# Born–Wolf against the textbook widths
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "na, wavelength, ni",
    [(1.4, 0.52, 1.515), (1.45, 0.461, 1.512), (1.2, 0.6, 1.33), (0.8, 0.5, 1.0)],
)
def test_born_wolf_fwhm_matches_formulas(na, wavelength, ni):
    lateral = 0.51 * wavelength / na
    axial = axial_fwhm_formula(wavelength, na, ni)
    dx, dz = lateral / 12, axial / 12  # fine sampling, so the measured FWHM is the model's
    a = psf.born_wolf((97, 65, 65), (dz, dx, dx), na=na, wavelength=wavelength, ni=ni)
    c = centre(a)
    assert fwhm_1d(a[c[0], c[1], :], dx) == pytest.approx(lateral, rel=0.05)
    assert fwhm_1d(a[c[0], :, c[2]], dx) == pytest.approx(lateral, rel=0.05)
    assert fwhm_1d(a[:, c[1], c[2]], dz) == pytest.approx(axial, rel=0.15)


def test_born_wolf_first_dark_ring_at_airy_radius():
    # Airy disk: first zero at r = 0.61·λ/NA.
    na, wl, dx = 1.3, 0.6, 0.01
    a = psf.born_wolf((1, 3, 401), (0.1, dx, dx), na=na, wavelength=wl)
    profile = a[0, 1, 200:].astype(float)
    first_min = (
        np.flatnonzero((profile[1:-1] < profile[:-2]) & (profile[1:-1] < profile[2:]))[0] + 1
    )
    assert first_min * dx == pytest.approx(0.61 * wl / na, abs=1.5 * dx)
    assert profile[first_min] < 1e-3 * profile[0]


def test_oversample_converges():
    kw = dict(na=1.45, wavelength=0.461, ni=1.512)
    ref = psf.born_wolf((9, 41, 41), (0.3, 0.13, 0.13), oversample=12, **kw)
    a = psf.born_wolf((9, 41, 41), (0.3, 0.13, 0.13), oversample=3, **kw)
    assert np.abs(a - ref).max() < 1e-3 * ref.max()


# ---------------------------------------------------------------------------
# Born–Wolf as deconwolf's dw_bw computes it: paraxial, integrated over the voxel
# ---------------------------------------------------------------------------

OPTICS = dict(na=1.45, wavelength=0.461, ni=1.512)  # deconwolf's DAPI demo optics
DAPI_VOXEL = DAPI["voxel_size"]


def test_paraxial_axial_fwhm_matches_its_formula():
    # Paraxial: I(0, z) = sinc²(k·z·NA²/(4·ni)), FWHM = 2·1.3916·4·ni/(k·NA²) = 1.7718·ni·λ/NA².
    na, wl, ni = 1.45, 0.461, 1.512
    axial = 1.7718 * ni * wl / na**2
    a = psf.born_wolf((121, 5, 5), (axial / 20, 0.05, 0.05), na=na, wavelength=wl, ni=ni,
                      paraxial=True)
    c = centre(a)
    assert fwhm_1d(a[:, c[1], c[2]], axial / 20) == pytest.approx(axial, rel=0.01)
    exact = psf.born_wolf((121, 5, 5), (axial / 20, 0.05, 0.05), na=na, wavelength=wl, ni=ni)
    assert fwhm_1d(exact[:, c[1], c[2]], axial / 20) < 0.7 * axial  # the exact phase is shorter


def test_integrate_is_the_mean_over_each_voxels_area():
    # The integrated PSF equals a 7x finer point-sampled one averaged over 7x7 blocks.
    fine = psf.born_wolf((3, 21 * 7, 21 * 7), (0.3, 0.13 / 7, 0.13 / 7), oversample=3, **OPTICS)
    block = fine.astype(float).reshape(3, 21, 7, 21, 7).mean(axis=(2, 4))
    block /= block.sum()
    a = psf.born_wolf((3, 21, 21), DAPI_VOXEL, integrate=True, **OPTICS).astype(float)
    assert np.linalg.norm(a - block) / np.linalg.norm(block) < 5e-3
    point = psf.born_wolf((3, 21, 21), DAPI_VOXEL, **OPTICS).astype(float)
    assert np.linalg.norm(point - block) / np.linalg.norm(block) > 0.05  # it matters here


def test_dapi_widths_match_deconwolfs_psf():
    # deconwolf 0.4.7's `dw_bw --resxy 130 --resz 300 --lambda 461 --NA 1.45 --ni 1.512
    # --nslice 79` (181x181 planes) has FWHMs of 1.951 planes (585 nm) along z and 1.299
    # pixels along y and x (measured from its output here).
    a = psf.born_wolf((79, 41, 41), DAPI_VOXEL, paraxial=True, integrate=True, **OPTICS)
    fz, fy, fx = psf._fwhm_voxels(a, centre(a))
    assert fz == pytest.approx(1.951, rel=0.01)
    assert fy == pytest.approx(1.299, rel=0.01) and fx == pytest.approx(1.299, rel=0.01)


def _dw_bw() -> str | None:
    import os
    import shutil

    dw = os.environ.get("RLN_FAST_DECONWOLF") or shutil.which("dw")
    if dw and os.path.isdir(dw):
        dw = os.path.join(dw, "dw")
    cand = os.path.join(os.path.dirname(dw), "dw_bw") if dw else None
    return cand if cand and os.access(cand, os.X_OK) else shutil.which("dw_bw")


def test_reproduces_deconwolfs_dw_bw(tmp_path):
    import subprocess

    tifffile = pytest.importorskip("tifffile")
    exe = _dw_bw()
    if exe is None:
        pytest.skip("deconwolf's dw_bw not found (set RLN_FAST_DECONWOLF to its dw, or PATH)")
    out = tmp_path / "psf.tif"
    subprocess.run([exe, "--resxy", "130", "--resz", "300", "--lambda", "461", "--NA", "1.45",
                    "--ni", "1.512", "--size", "41", "--nslice", "21", "--threads", "2", str(out)],
                   check=True, capture_output=True, timeout=300)
    theirs = tifffile.imread(out).astype(float)
    theirs /= theirs.sum()
    ours = psf.born_wolf(theirs.shape, DAPI_VOXEL, paraxial=True, integrate=True, **OPTICS)
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert rel < 0.01, rel  # measured: 7e-4 for the 79x181x181 demo PSF
    default = psf.born_wolf(theirs.shape, DAPI_VOXEL, **OPTICS)
    assert np.linalg.norm(default - theirs) / np.linalg.norm(theirs) > 0.2


# ---------------------------------------------------------------------------
# Gibson–Lanni
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("particle_z", [0.0, 5.0])
def test_gibson_lanni_reduces_to_born_wolf_without_mismatch(particle_z):
    shape, vs = (41, 33, 33), (0.1, 0.06, 0.06)
    bw = psf.born_wolf(shape, vs, na=1.4, wavelength=0.52, ni=1.515).astype(float)
    gl = psf.gibson_lanni(
        shape, vs, na=1.4, wavelength=0.52, ni=1.515, ns=1.515, ng=1.515, particle_z=particle_z
    ).astype(float)
    a, b = bw - bw.mean(), gl - gl.mean()
    corr = (a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum())
    assert corr > 0.99
    np.testing.assert_allclose(gl, bw, rtol=0, atol=1e-4 * bw.max())


def test_gibson_lanni_at_the_coverslip_ignores_the_sample_index():
    # A source on the coverslip (particle_z = 0) sees no sample layer (NA < ns keeps the pupil whole).
    shape, vs = (21, 25, 25), (0.15, 0.08, 0.08)
    bw = psf.born_wolf(shape, vs, na=1.2, wavelength=0.52)
    gl = psf.gibson_lanni(shape, vs, na=1.2, wavelength=0.52, ns=1.33, particle_z=0.0)
    np.testing.assert_allclose(gl, bw, rtol=0, atol=1e-5 * bw.max())


def axial_stats(a: np.ndarray, dz: float) -> tuple[float, float]:
    """(z of the on-axis peak, intensity-weighted z centroid), µm from the centre plane."""
    z = (np.arange(a.shape[0]) - a.shape[0] // 2) * dz
    c = centre(a)
    per_plane = a.sum(axis=(1, 2), dtype=np.float64)
    return float(z[np.argmax(a[:, c[1], c[2]])]), float((per_plane * z).sum() / per_plane.sum())


def test_gibson_lanni_z_convention_positive_z_is_deeper():
    # Oil objective (ni 1.515) into water (ns 1.33): the actual focus lags the nominal one, so a
    # source at depth d is sharpest when the nominal focal plane is deeper than d, i.e. at
    # z > 0 in rln_fast's convention (positive z = away from the coverslip, into the sample).
    dz = 0.1
    kw = dict(na=1.4, wavelength=0.52, ni=1.515, ns=1.33)
    shallow = psf.gibson_lanni((81, 25, 25), (dz, 0.08, 0.08), particle_z=3.0, **kw)
    deep = psf.gibson_lanni((81, 25, 25), (dz, 0.08, 0.08), particle_z=8.0, **kw)
    peak_s, centroid_s = axial_stats(shallow, dz)
    peak_d, centroid_d = axial_stats(deep, dz)
    assert 0.2 < peak_s < peak_d  # the focal shift grows with depth
    assert 0.1 < centroid_s < centroid_d
    # Axially asymmetric: the profile is no longer its own mirror image about the peak.
    line = deep[:, 12, 12].astype(float)
    p = int(np.argmax(line))
    n = min(p, line.size - 1 - p)
    assert np.abs(line[p - n : p] - line[p + n : p : -1]).max() > 0.1 * line.max()


def test_gibson_lanni_z_convention_flips_for_higher_sample_index():
    # Water objective (ni 1.33) into a denser sample (ns 1.45): the focal shift changes sign.
    dz = 0.1
    a = psf.gibson_lanni(
        (61, 25, 25),
        (dz, 0.08, 0.08),
        na=1.2,
        wavelength=0.52,
        ni=1.33,
        ns=1.45,
        ng=1.515,
        particle_z=8.0,
    )
    peak, centroid = axial_stats(a, dz)
    assert peak < -0.2 and centroid < -0.1


def test_gibson_lanni_coverslip_thickness_error_aberrates():
    shape, vs = (41, 25, 25), (0.1, 0.08, 0.08)
    kw = dict(na=1.4, wavelength=0.52, ns=1.515)
    nominal = psf.gibson_lanni(shape, vs, tg=170.0, **kw)
    thick = psf.gibson_lanni(shape, vs, tg=190.0, tg0=170.0, ng=1.52, ng0=1.515, **kw)
    assert thick.max() < 0.9 * nominal.max()  # spherical aberration spreads the peak


# ---------------------------------------------------------------------------
# confocal
# ---------------------------------------------------------------------------


def test_confocal_is_narrower_than_widefield():
    shape, dx, dz = (81, 65, 65), 0.02, 0.05
    kw = dict(na=1.4, ni=1.515)
    wide = psf.born_wolf(shape, (dz, dx, dx), wavelength=0.52, **kw)
    conf = psf.confocal(shape, (dz, dx, dx), em_wavelength=0.52, ex_wavelength=0.488, **kw)
    c = centre(wide)
    assert fwhm_1d(conf[c[0], c[1], :], dx) < 0.8 * fwhm_1d(wide[c[0], c[1], :], dx)
    assert fwhm_1d(conf[:, c[1], c[2]], dz) < 0.8 * fwhm_1d(wide[:, c[1], c[2]], dz)


def test_confocal_pinhole_widens_towards_excitation_psf():
    shape, vs = (31, 65, 65), (0.1, 0.02, 0.02)
    kw = dict(na=1.4, em_wavelength=0.52, ex_wavelength=0.488)
    airy_unit = 1.22 * 0.52 / 1.4
    widths = []
    for pinhole in (None, 0.5 * airy_unit, airy_unit, 3 * airy_unit):
        a = psf.confocal(shape, vs, pinhole=pinhole, **kw)
        c = centre(a)
        widths.append(fwhm_1d(a[c[0], c[1], :], vs[1]))
    assert widths == sorted(widths)
    excitation = psf.born_wolf(shape, vs, na=1.4, wavelength=0.488)
    assert widths[-1] <= 1.01 * fwhm_1d(excitation[15, 32, :], vs[1])
    np.testing.assert_array_equal(
        psf.confocal(shape, vs, pinhole=0.0, **kw), psf.confocal(shape, vs, pinhole=None, **kw)
    )


def test_confocal_gibson_lanni_model():
    shape, vs = (31, 25, 25), (0.1, 0.08, 0.08)
    kw = dict(na=1.4, em_wavelength=0.52, ex_wavelength=0.488)
    bw = psf.confocal(shape, vs, **kw)
    gl = psf.confocal(shape, vs, model="gibson_lanni", ns=1.515, **kw)
    np.testing.assert_allclose(gl, bw, rtol=0, atol=1e-4 * bw.max())
    deep = psf.confocal(shape, vs, model="gibson_lanni", ns=1.33, particle_z=5.0, **kw)
    assert axial_stats(deep, 0.1)[1] > 0.1
    with pytest.raises(ValueError, match="model must be 'born_wolf' or 'gibson_lanni'"):
        psf.confocal(shape, vs, model="vectorial", **kw)
    with pytest.raises(ValueError, match="model='born_wolf' takes no extra arguments"):
        psf.confocal(shape, vs, ns=1.33, **kw)
    with pytest.raises(ValueError, match="pinhole"):
        psf.confocal(shape, vs, pinhole=-1.0, **kw)


# ---------------------------------------------------------------------------
# argument checks of the models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(na=-0.5), r"na must be a finite number > 0, got -0.5"),
        (dict(na=0.0), r"na must be a finite number > 0"),
        (dict(na=1.6), r"na=1.6 must be smaller than the immersion refractive index ni=1.515"),
        (dict(na=1.515), r"must be smaller than the immersion refractive index"),
        (dict(wavelength=520.0), r"wavelengths are in micrometres \(write 0.52 for 520 nm\)"),
        (dict(wavelength=0.0), r"wavelength must be a finite number > 0"),
        (dict(voxel_size=(0.1, 0.0, 0.1)), r"voxel_size must be 3 positive finite numbers"),
        (dict(voxel_size=(0.1, -0.05, 0.1)), r"voxel_size must be 3 positive finite numbers"),
        (dict(voxel_size=(0.1, 0.1)), r"voxel_size must be 3 positive finite numbers"),
        (dict(shape=(9, 9)), r"shape must be 3 positive integers \(z, y, x\), got \(9, 9\)"),
        (dict(shape=(9, 0, 9)), r"shape must be 3 positive integers"),
        (dict(shape=(9, 9.0, 9)), r"shape must be 3 positive integers"),
        (dict(shape=(9, -3, 9)), r"shape must be 3 positive integers"),
        (dict(shape=9), r"shape must be 3 positive integers"),
        (dict(oversample=0), r"oversample must be an integer >= 1"),
        (dict(ni=-1.0), r"ni must be a finite number > 0"),
    ],
)
@pytest.mark.parametrize("model", ["born_wolf", "gibson_lanni"])
def test_model_argument_errors(model, kwargs, message):
    args = dict(shape=(9, 9, 9), voxel_size=(0.2, 0.1, 0.1), na=1.4, wavelength=0.52)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        getattr(psf, model)(args.pop("shape"), args.pop("voxel_size"), **args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(particle_z=-1.0),
            r"particle_z \(depth below the coverslip, µm\) must be a finite number >= 0",
        ),
        (dict(ns=0.0), r"ns must be a finite number > 0"),
        (dict(tg=-1.0), r"tg must be a finite number >= 0"),
        (dict(ti0=0.0), r"ti0 must be a finite number > 0"),
        (dict(ng0=float("nan")), r"ng0 must be a finite number > 0"),
    ],
)
def test_gibson_lanni_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        psf.gibson_lanni((9, 9, 9), (0.2, 0.1, 0.1), na=1.4, wavelength=0.52, **kwargs)


def test_confocal_wavelength_errors():
    with pytest.raises(ValueError, match=r"ex_wavelength=488 µm is implausible"):
        psf.confocal((9, 9, 9), 0.1, na=1.4, em_wavelength=0.52, ex_wavelength=488)
    with pytest.raises(ValueError, match=r"em_wavelength must be a finite number > 0"):
        psf.confocal((9, 9, 9), 0.1, na=1.4, em_wavelength=-0.52, ex_wavelength=0.488)


def test_born_wolf_flag_errors():
    with pytest.raises(TypeError, match=r"paraxial must be True or False, got 'yes'"):
        psf.born_wolf((9, 9, 9), 0.1, na=1.4, wavelength=0.52, paraxial="yes")
    with pytest.raises(TypeError, match=r"integrate must be True or False, got 1"):
        psf.born_wolf((9, 9, 9), 0.1, na=1.4, wavelength=0.52, integrate=1)


def test_generators_are_fast():
    import time

    start = time.perf_counter()
    psf.born_wolf((64, 128, 128), (0.2, 0.1, 0.1), na=1.4, wavelength=0.52)
    psf.gibson_lanni((64, 128, 128), (0.2, 0.1, 0.1), na=1.4, wavelength=0.52, particle_z=10.0)
    # Two models in well under 2 s, with room for a slow CI machine.
    assert time.perf_counter() - start < 4.0


# ---------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------


def prepare_quietly(*args, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return psf.prepare(*args, **kwargs)


def window_com_offset(a: np.ndarray, half: int = 6) -> np.ndarray:
    c = np.asarray(centre(a))
    box = a[tuple(slice(max(0, k - half), k + half + 1) for k in c)].astype(float)
    lo = np.maximum(0, c - half)
    return np.asarray(ndimage.center_of_mass(box)) + lo - c


def test_prepare_centres_an_off_centre_psf_to_sub_voxel_accuracy():
    shape = (40, 48, 52)  # even sizes
    mu = (22.3, 20.65, 29.4)
    a = gaussian_blob(shape, mu, (2.5, 1.6, 1.8))
    out = psf.prepare(a, background=None, crop=False)
    assert all(n % 2 == 1 for n in out.shape)
    assert np.unravel_index(np.argmax(out), out.shape) == centre(out)
    assert np.abs(window_com_offset(out)).max() < 0.1
    assert out.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5) and out.min() >= 0


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(*[st.integers(24, 40)] * 3),
    offset=st.tuples(*[st.floats(-3.0, 3.0)] * 3),
    sigma=st.tuples(*[st.floats(0.8, 3.0)] * 3),
)
def test_prepare_centres_any_shifted_gaussian(shape, offset, sigma):
    mu = [n / 2 + o for n, o in zip(shape, offset, strict=True)]
    out = prepare_quietly(gaussian_blob(shape, mu, sigma), background=None, crop=True)
    assert all(n % 2 == 1 for n in out.shape)
    assert np.abs(window_com_offset(out, half=int(3 * max(sigma)))).max() < 0.1


def test_prepare_centres_a_shifted_born_wolf_psf():
    a = psf.born_wolf((41, 61, 61), (0.1, 0.05, 0.05), na=1.2, wavelength=0.6).astype(float)
    shifted = ndimage.shift(a, (2.4, -3.3, 1.7), order=3, mode="grid-constant")
    out = psf.prepare(np.maximum(shifted, 0), background=None, crop=False)
    assert np.unravel_index(np.argmax(out), out.shape) == centre(out)
    assert np.abs(window_com_offset(out, half=3)).max() < 0.1


def test_prepare_centres_an_asymmetric_gibson_lanni_psf_near_its_peak():
    a = psf.gibson_lanni(
        (81, 25, 25), (0.1, 0.08, 0.08), na=1.4, wavelength=0.52, ns=1.33, particle_z=5.0
    )
    out = prepare_quietly(a, background=None)
    peak = np.asarray(np.unravel_index(np.argmax(out), out.shape))
    assert np.abs(peak - centre(out)).max() <= 1


def central_crop(a: np.ndarray, shape) -> np.ndarray:
    c = centre(a)
    return a[tuple(slice(k - n // 2, k + n // 2 + 1) for k, n in zip(c, shape, strict=True))]


def test_prepare_removes_a_constant_background():
    clean = gaussian_blob((31, 41, 41), (15, 20, 20), (2.0, 1.5, 1.5))
    expected = psf.prepare(clean, background=None)
    # background="auto": the median of the border voxels is the pedestal.
    np.testing.assert_allclose(psf.prepare(1000.0 * clean + 100.0), expected, rtol=0, atol=1e-6)
    by_value = psf.prepare(1000.0 * clean + 100.0, background=100.0)
    np.testing.assert_allclose(by_value, expected, rtol=0, atol=1e-6)
    # No subtraction keeps the pedestal, so nothing is cropped.
    pedestal = psf.prepare(1000.0 * clean + 100.0, background=None)
    assert pedestal.shape == (31, 41, 41) and pedestal.min() > 0


def test_prepare_removes_a_noisy_background():
    rng = np.random.default_rng(0)
    clean = gaussian_blob((31, 41, 41), (15.4, 19.7, 20.2), (2.0, 1.5, 1.5))
    measured = 1000.0 * clean + 100.0 + rng.normal(0.0, 0.5, clean.shape)
    # Noise of 0.5 counts is 5e-4 of the peak: a threshold above it crops it away.
    out = psf.prepare(measured, threshold=5e-3)
    expected = psf.prepare(clean, background=None, threshold=5e-3)
    shape = np.minimum(out.shape, expected.shape)
    assert np.abs(np.asarray(out.shape) - expected.shape).max() <= 2
    l1 = np.abs(central_crop(out, shape) - central_crop(expected, shape)).sum()
    assert l1 < 0.02  # L1 distance between two unit-sum PSFs


def test_prepare_clips_negatives_and_accepts_integer_data():
    a = np.round(1000 * gaussian_blob((21, 21, 21), (10, 10, 10), (2, 2, 2))).astype(np.uint16) + 10
    out = psf.prepare(a, background=20.0)
    assert out.dtype == np.float32 and out.min() >= 0
    assert out.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)


def test_prepare_resampling_halves_the_size_when_the_voxel_doubles():
    a = psf.gaussian((33, 33, 33), 0.1, sigma=(0.4, 0.3, 0.3))
    out = psf.prepare(a, (0.1, 0.1, 0.1), (0.2, 0.2, 0.2), background=None, crop=False)
    assert out.shape == (17, 17, 17)
    c = centre(out)
    assert np.unravel_index(np.argmax(out), out.shape) == c
    assert out.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
    # The physical width is kept: FWHM in voxels halves.
    assert fwhm_1d(out[:, c[1], c[2]]) == pytest.approx(0.5 * fwhm_1d(a[:, 16, 16]), rel=0.05)
    assert fwhm_1d(out[c[0], c[1], :]) == pytest.approx(0.5 * fwhm_1d(a[16, 16, :]), rel=0.05)
    # Only z resampled: the lateral size stays; finer image voxels grow the PSF.
    z_only = psf.prepare(a, (0.1, 0.1, 0.1), (0.2, 0.1, 0.1), background=None, crop=False)
    assert z_only.shape == (17, 33, 33)
    finer = psf.prepare(a, (0.1, 0.1, 0.1), (0.05, 0.1, 0.1), background=None, crop=False)
    assert finer.shape == (65, 33, 33)
    # Resampling a model PSF agrees with generating it on the target grid.
    direct = psf.gaussian((17, 17, 17), 0.2, sigma=(0.4, 0.3, 0.3))
    np.testing.assert_allclose(out, direct, rtol=0, atol=0.02 * direct.max())


def test_prepare_handles_even_sizes():
    a = psf.gaussian((32, 64, 64), (0.1, 0.05, 0.05), sigma=(0.3, 0.12, 0.12))
    out = psf.prepare(a, background=None, crop=False)
    assert out.shape == (33, 65, 65)
    assert np.unravel_index(np.argmax(out), out.shape) == (16, 32, 32)
    assert np.abs(window_com_offset(out)).max() < 0.1


def test_prepare_crops_to_a_symmetric_odd_support():
    a = psf.gaussian((41, 61, 61), 0.1, sigma=(0.4, 0.2, 0.3))
    loose = psf.prepare(a, background=None, threshold=1e-4)
    tight = psf.prepare(a, background=None, threshold=1e-2)
    for out in (loose, tight):
        assert all(n % 2 == 1 for n in out.shape)
        assert np.unravel_index(np.argmax(out), out.shape) == centre(out)
    assert all(t < s for t, s in zip(tight.shape, loose.shape, strict=True))
    # What was cut was below the threshold.
    full = psf.prepare(a, background=None, crop=False)
    c, h = np.asarray(centre(full)), np.asarray(tight.shape) // 2
    outside = full.copy()
    outside[tuple(slice(k - m, k + m + 1) for k, m in zip(c, h, strict=True))] = 0
    assert outside.max() <= 1e-2 * full.max()
    assert np.unravel_index(np.argmax(full), full.shape) == centre(full)


def test_prepare_warns_when_larger_than_the_image():
    a = psf.gaussian((31, 31, 31), 0.1, sigma=0.5)
    with pytest.warns(UserWarning, match=r"larger than the image shape \(64, 16, 64\) along y"):
        psf.prepare(a, background=None, image_shape=(64, 16, 64))


def test_prepare_warns_when_under_sampled():
    a = gaussian_blob((15, 15, 15), (7, 7, 7), (3.0, 0.5, 3.0))
    with pytest.warns(UserWarning, match=r"under-sampled: FWHM < 2 voxels along y"):
        psf.prepare(a, background=None)


def test_prepare_is_quiet_for_a_well_sampled_psf_that_fits():
    a = gaussian_blob((21, 21, 21), (10, 10, 10), (2.0, 2.0, 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        psf.prepare(a, background=None, image_shape=(64, 64, 64))


@pytest.mark.parametrize(
    "array, kwargs, message",
    [
        (
            np.ones((9, 9)),
            {},
            r"psf must be a 3-D \(z, y, x\) array, got a 2-D array of shape \(9, 9\)",
        ),
        (np.ones((2, 9, 9, 9)), {}, r"got a 4-D array"),
        (np.ones((0, 9, 9)), {}, r"psf must not be empty"),
        (
            np.ones((5, 5, 5), dtype=complex),
            {},
            r"psf must hold real numbers, got dtype complex128",
        ),
        (np.full((5, 5, 5), np.nan), {}, r"psf contains 125 NaN or Inf value\(s\)"),
        (np.pad(np.full((1, 1, 1), np.inf), 2), {}, r"psf contains 1 NaN or Inf value\(s\)"),
        (
            np.zeros((5, 5, 5)),
            {"background": None},
            r"psf has no signal left .* it must sum to > 0",
        ),
        (-np.ones((5, 5, 5)), {"background": None}, r"psf has no signal left"),
        (np.ones((5, 5, 5)), {}, r"psf has no signal left after background subtraction"),
        (
            np.ones((5, 5, 5)),
            {"background": "median"},
            r"background must be 'auto', a number or None",
        ),
        (
            np.ones((5, 5, 5)),
            {"background": float("nan")},
            r"background must be 'auto', a number or None",
        ),
        (np.ones((5, 5, 5)), {"threshold": 1.0}, r"threshold must be a number in \[0, 1\)"),
        (np.ones((5, 5, 5)), {"threshold": -0.1}, r"threshold must be a number in \[0, 1\)"),
        (
            np.ones((5, 5, 5)),
            {"image_voxel_size": (0.3, 0.1, 0.1)},
            r"image_voxel_size needs psf_voxel_size",
        ),
        (
            np.ones((5, 5, 5)),
            {"psf_voxel_size": (0.3, 0, 0.1)},
            r"psf_voxel_size must be 3 positive finite",
        ),
        (np.ones((5, 5, 5)), {"image_shape": (64, 64)}, r"image_shape must be 3 positive integers"),
    ],
)
def test_prepare_errors(array, kwargs, message):
    with pytest.raises(ValueError, match=message):
        psf.prepare(array, **kwargs)


def test_prepare_does_not_modify_its_input():
    a = gaussian_blob((21, 21, 21), (11.3, 9.2, 10.0), (2.0, 2.0, 2.0)) + 0.01
    before = a.copy()
    psf.prepare(a)
    np.testing.assert_array_equal(a, before)


# ---------------------------------------------------------------------------
# the DAPI stack's acquisition
# ---------------------------------------------------------------------------


def test_dapi_psf_is_sane():
    a = psf.born_wolf((41, 65, 65), **DAPI)
    assert np.isfinite(a).all() and a.min() >= 0
    assert a.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
    c = centre(a)
    assert np.unravel_index(np.argmax(a), a.shape) == c
    lateral = 0.51 * 0.461 / 1.45  # 0.162 µm: only ~1.25 pixels, so measured coarsely
    assert fwhm_1d(a[c[0], c[1], :], 0.13) == pytest.approx(lateral, rel=0.15)
    assert fwhm_1d(a[c[0], :, c[2]], 0.13) == pytest.approx(lateral, rel=0.15)
    # The same model on a fine grid meets the formulas closely.
    fine = psf.born_wolf((81, 65, 65), (0.025, 0.013, 0.013), na=1.45, wavelength=0.461, ni=1.512)
    f = centre(fine)
    assert fwhm_1d(fine[f[0], f[1], :], 0.013) == pytest.approx(lateral, rel=0.03)
    assert fwhm_1d(fine[:, f[1], f[2]], 0.025) == pytest.approx(
        axial_fwhm_formula(0.461, 1.45, 1.512), rel=0.15
    )


def test_dapi_psf_prepared_for_the_stack():
    shape = (40, 201, 101)  # the deconwolf demo stack
    if DAPI_STACK.exists():
        tifffile = pytest.importorskip("tifffile")
        shape = tifffile.imread(DAPI_STACK).shape
    a = psf.born_wolf((31, 63, 63), **DAPI)
    # 130 nm pixels under-sample a 162 nm FWHM: prepare says so.
    with pytest.warns(UserWarning, match="under-sampled"):
        out = psf.prepare(
            a, DAPI["voxel_size"], DAPI["voxel_size"], background=None, image_shape=shape
        )
    assert all(p <= s for p, s in zip(out.shape, shape, strict=True))
    assert np.unravel_index(np.argmax(out), out.shape) == centre(out)
    assert out.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
