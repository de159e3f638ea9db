"""Multi-channel and time-lapse stacks: axis names, (t, c) selections and per-channel settings.

A stack is an array or file whose axes are some of ``t`` (time), ``c`` (channel), ``z``, ``y``,
``x``, each at most once, in any order, always with z, y and x. Every (t, c) pair is one 3-D
volume that the single-volume code deconvolves on its own. Settings given per channel (PSF,
model, iterations, background) take one value for all channels, a list with one value per
channel of the input, or a dict ``{channel: value}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["AXES", "check_axes", "parse_selection", "per_channel"]

AXES = "tczyx"  # the letters a stack's axes may use


def check_axes(axes: Any, ndim: int, name: str = "axes") -> str:
    """``axes`` in lower case after checking it names each of ``ndim`` dimensions once.

    >>> check_axes("CZYX", 4)
    'czyx'
    """
    if not isinstance(axes, str):
        raise TypeError(f"{name} must be a string such as 'tczyx', got {type(axes).__name__}")
    low = axes.lower()
    bad = sorted(set(low) - set(AXES))
    if bad:
        raise ValueError(f"{name}={axes!r}: unknown axis letter(s) {', '.join(map(repr, bad))}; "
                         "use t (time), c (channel), z, y, x")
    twice = sorted({a for a in low if low.count(a) > 1})
    if twice:
        raise ValueError(f"{name}={axes!r} names {', '.join(map(repr, twice))} more than once")
    missing = [a for a in "zyx" if a not in low]
    if missing:
        raise ValueError(f"{name}={axes!r} has no {', '.join(map(repr, missing))} axis; every "
                         "volume needs z, y and x")
    if len(low) != ndim:
        raise ValueError(f"{name}={axes!r} names {len(low)} axes but the data has {ndim} "
                         "dimensions")
    return low


def _index(text: str, n: int, what: str, full: str) -> int:
    try:
        i = int(text)
    except ValueError:
        raise ValueError(f"{what} selection {full!r}: {text!r} is not an integer; write e.g. "
                         "'0,2' or '0:50'") from None
    if not -n <= i < n:
        raise ValueError(f"{what} selection {full!r}: {i} is out of range; the input has {n} "
                         f"{what}{'s' if n != 1 else ''} (0..{n - 1})")
    return i % n


def _bound(text: str, what: str, full: str) -> int | None:
    if text.strip() == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what} selection {full!r}: {text!r} is not an integer; write e.g. "
                         "'0:50' or '::2'") from None


def parse_selection(selection: Any, n: int, what: str = "channel") -> list[int]:
    """The indices, sorted and unique, that ``selection`` picks out of ``n``.

    ``selection``: None (all), an int, an iterable of ints, a ``slice`` or ``range``, or text
    as on the command line: comma-separated indices and Python slices (``"0,2"``, ``"0:50"``,
    ``"::2"``, ``"0:10,20"``). Negative indices count from the end; a slice stops before its
    end, as in Python. An index out of range or an empty result raises ValueError.
    """
    if selection is None:
        return list(range(n))
    full = str(selection)
    picked: set[int] = set()
    if isinstance(selection, (slice, range)):
        picked.update(range(n)[selection] if isinstance(selection, slice)
                      else (_index(str(i), n, what, full) for i in selection))
    elif isinstance(selection, (int, np.integer)) and not isinstance(selection, bool):
        picked.add(_index(str(int(selection)), n, what, full))
    elif isinstance(selection, str):
        for part in selection.split(","):
            part = part.strip()
            if ":" in part:
                bits = part.split(":")
                if len(bits) > 3:
                    raise ValueError(f"{what} selection {full!r}: {part!r} is not a slice "
                                     "start:stop[:step]")
                start, stop, *step = (_bound(b, what, full) for b in bits)
                if step and step[0] == 0:
                    raise ValueError(f"{what} selection {full!r}: the step must not be 0")
                picked.update(range(n)[slice(start, stop, step[0] if step else None)])
            elif part:
                picked.add(_index(part, n, what, full))
    elif isinstance(selection, Sequence) or hasattr(selection, "__iter__"):
        for i in selection:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"{what} selection {full!r}: {i!r} is not an integer")
            picked.add(_index(str(int(i)), n, what, full))
    else:
        raise TypeError(f"{what} selection must be None, an int, indices, a slice or text such "
                        f"as '0,2' or '0:50', got {type(selection).__name__}")
    if not picked:
        raise ValueError(f"{what} selection {full!r} picks none of the {n} {what}s")
    return sorted(picked)


def _is_one_value(value: Any) -> bool:
    """True for what counts as one setting even though it may be iterable: text, paths,
    arrays and tensors (a PSF), models."""
    return (isinstance(value, (str, bytes, os.PathLike)) or hasattr(value, "shape")
            or not isinstance(value, (Sequence, Mapping)))


def per_channel(value: Any, n: int, name: str) -> list[Any]:
    """One value of the setting ``name`` per channel (a list of ``n``).

    ``value``: one value for every channel (a number, text, path, array, model or None); a
    list or tuple of ``n`` values, one per channel of the input, in order; or a dict
    ``{channel index: value}`` where channels left out get None (the setting's default).
    """
    if _is_one_value(value):
        return [value] * n
    if isinstance(value, Mapping):
        out: list[Any] = [None] * n
        for key, v in value.items():
            if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
                raise TypeError(f"{name}: per-channel dict keys must be channel indices, got "
                                f"{key!r}")
            if not -n <= int(key) < n:
                raise ValueError(f"{name}: channel {int(key)} is out of range; the input has "
                                 f"{n} channel{'s' if n != 1 else ''}")
            out[int(key) % n] = v
        return out
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values given for {n} channel"
                         f"{'s' if n != 1 else ''}; give one value, one per channel, or a dict "
                         "{channel: value}")
    return values
