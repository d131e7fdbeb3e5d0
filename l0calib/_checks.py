"""Argument checks shared by the public entry points (each raises ParameterError)."""

from __future__ import annotations

import math

import numpy as np

from l0calib.exceptions import ParameterError


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def nonneg_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ParameterError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def finite(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def nonneg(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number >= 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value >= 0):  # type: ignore[arg-type]
        raise ParameterError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def ratio_bounds(bounds: object) -> tuple[float, float] | None:
    """``bounds`` as ``(lower, upper)`` floats, or None: the one rule for weight-ratio bounds.

    ``0 <= lower <= 1 <= upper`` and ``lower < upper``; ``upper`` may be ``inf`` (no upper
    bound). The ratio is a final weight over its *inflated initial weight* ``w0 * n / K``
    when ``K`` records are kept (``target_records``), else over ``w0`` itself: what
    :func:`l0calib.calibrate` bounds, and what :func:`l0calib.diagnose_targets` checks.
    """
    if bounds is None:
        return None
    try:
        lo, hi = (float(b) for b in bounds)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise ParameterError(f"bounds must be a pair (lower, upper), got {bounds!r}") from None
    if not (math.isfinite(lo) and 0 <= lo <= 1 <= hi and lo < hi) or math.isnan(hi):
        raise ParameterError(
            "bounds (lower, upper) on the weight ratio must satisfy 0 <= lower <= 1 <= upper "
            f"and lower < upper, got ({lo:g}, {hi:g})"
        )
    return lo, hi
