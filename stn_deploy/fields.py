"""Checks for values read from files (checkpoints, ONNX metadata, resume state): the right type,
finite, in range, or a one-line error that names the field and quotes the value (cut short).

JSON and pickles hand back whatever the file holds: ``"123"`` where a list of numbers belongs
(``tuple("123")`` is ``('1', '2', '3')``), ``True`` where an int belongs (``bool`` is an ``int``),
``NaN`` or ``1e-300`` (0 in float32) where a positive float belongs. Each check here refuses
those instead of converting them. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

from .errors import shorten


def integer(
    value: Any, name: str, *, low: int | None = None, high: int | None = None, error: type[Exception] = ValueError
) -> int:
    """An int (not a bool, not a float) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise error(f"{name} must be an integer, got {shorten(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{name} must be an integer {_range(low, high)}, got {value}")
    return value


def real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    float32: bool = False,
    error: type[Exception] = ValueError,
) -> float:
    """A finite number (not a bool, not a string) within the range; ``float32``: also finite and,
    for an open lower bound, still above it once rounded to float32 (1e-300 is 0 there)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise error(f"{name} must be a number, got {shorten(value)}")
    f = float(value)
    if not math.isfinite(f):
        raise error(f"{name} must be finite, got {shorten(f)}")
    if float32:
        import numpy as np  # numpy: the runtime's own float32 rounding

        f32 = float(np.float32(f)) if abs(f) < 3.4e38 else math.inf
        if not math.isfinite(f32):
            raise error(f"{name} {shorten(f)} overflows float32")
        check = f32
    else:
        check = f
    below = low is not None and (check <= low if low_open else check < low)
    if below or (high is not None and check > high):
        kind = f"{name} {shorten(f)}" + (f" ({check:g} in float32)" if float32 and check != f else "")
        raise error(f"{kind} is out of range: must be {_range(low, high, low_open)}")
    return f


def sequence(value: Any, name: str, *, length: int | None = None, error: type[Exception] = ValueError) -> list:
    """A list or tuple (never a str, bytes or dict, whose items would be characters or keys)."""
    if isinstance(value, (str, bytes, bytearray, dict)) or not isinstance(value, Sequence):
        raise error(f"{name} must be a list, got {shorten(value)}")
    if length is not None and len(value) != length:
        raise error(f"{name} must have {length} values, got {len(value)}")
    return list(value)


def string(value: Any, name: str, *, choices: Sequence[str] | None = None, error: type[Exception] = ValueError) -> str:
    if not isinstance(value, str):
        raise error(f"{name} must be a string, got {shorten(value)}")
    if choices is not None and value not in choices:
        raise error(f"{name} must be one of {', '.join(choices)}, got {shorten(value)}")
    return value


def mapping(value: Any, name: str, *, error: type[Exception] = ValueError) -> dict:
    if not isinstance(value, dict):
        raise error(f"{name} must be a mapping, got {shorten(value)}")
    return value


def _range(low: float | None, high: float | None, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"{'>' if low_open else '>='} {low} and <= {high}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"<= {high}"
