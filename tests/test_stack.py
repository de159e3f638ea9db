"""rln_fast.stack: axis names, (t, c) selections and per-channel settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rln_fast.stack import check_axes, parse_selection, per_channel


@pytest.mark.parametrize("axes, ndim, want", [("zyx", 3, "zyx"), ("CZYX", 4, "czyx"),
                                             ("tczyx", 5, "tczyx"), ("zcyx", 4, "zcyx"),
                                             ("ctzyx", 5, "ctzyx"), ("yxz", 3, "yxz")])
def test_check_axes_accepts(axes, ndim, want):
    assert check_axes(axes, ndim) == want


@pytest.mark.parametrize("axes, ndim, match", [
    ("qzyx", 4, "unknown axis letter"),
    ("czzx", 4, "more than once"),
    ("tcyx", 4, "no 'z' axis"),
    ("czyx", 5, "names 4 axes but the data has 5"),
])
def test_check_axes_refuses(axes, ndim, match):
    with pytest.raises(ValueError, match=match):
        check_axes(axes, ndim)
    with pytest.raises(TypeError, match="must be a string"):
        check_axes(None, 3)


@pytest.mark.parametrize("sel, want", [
    (None, [0, 1, 2, 3, 4, 5]), (2, [2]), (-1, [5]), ("0,2", [0, 2]), ("2,0,2", [0, 2]),
    ("0:3", [0, 1, 2]), ("::2", [0, 2, 4]), ("4:", [4, 5]), ("0:2,5", [0, 1, 5]),
    ("-2:", [4, 5]), ([3, 1], [1, 3]), (np.array([1, 2]), [1, 2]), (slice(1, 3), [1, 2]),
    (range(0, 6, 3), [0, 3]), ("0:50", [0, 1, 2, 3, 4, 5]),
])
def test_parse_selection(sel, want):
    assert parse_selection(sel, 6, "channel") == want


@pytest.mark.parametrize("sel, err, match", [
    ("7", ValueError, r"7 is out of range; the input has 6 time points"),
    ("a", ValueError, "'a' is not an integer"),
    ("1:2:0", ValueError, "step must not be 0"),
    ("1:2:3:4", ValueError, "not a slice"),
    ("5:2", ValueError, "picks none"),
    ([0.5], TypeError, "not an integer"),
    (1.5, TypeError, "selection must be"),
])
def test_parse_selection_refuses(sel, err, match):
    with pytest.raises(err, match=match):
        parse_selection(sel, 6, "time point")


def test_per_channel_one_value_for_all():
    psf = np.ones((3, 3, 3))
    assert per_channel(5, 3, "num_iter") == [5, 5, 5]
    assert per_channel("auto", 2, "background") == ["auto", "auto"]
    assert per_channel(Path("a.tif"), 2, "psf") == [Path("a.tif")] * 2
    assert all(p is psf for p in per_channel(psf, 2, "psf"))  # an array is one PSF
    assert per_channel(None, 2, "model") == [None, None]


def test_per_channel_lists_and_dicts():
    assert per_channel([10, 20], 2, "num_iter") == [10, 20]
    assert per_channel((1.0, "auto", 3.0), 3, "background") == [1.0, "auto", 3.0]
    assert per_channel({1: "b.tif"}, 3, "psf") == [None, "b.tif", None]
    assert per_channel({-1: 7}, 2, "num_iter") == [None, 7]
    with pytest.raises(ValueError, match="3 values given for 2 channels"):
        per_channel([1, 2, 3], 2, "num_iter")
    with pytest.raises(ValueError, match="channel 2 is out of range"):
        per_channel({2: 1}, 2, "num_iter")
    with pytest.raises(TypeError, match="keys must be channel indices"):
        per_channel({"0": 1}, 2, "num_iter")
