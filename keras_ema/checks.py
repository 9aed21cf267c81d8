"""Checks of hyperparameters shared by the schedules, the snapshot files and
the callbacks: each raises a `ValueError` in Keras' phrasing, naming the
argument."""

from __future__ import annotations

import numbers


def is_int(value) -> bool:
    """Whether `value` is an integer (a `bool` is not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """Whether `value` is a real number (a `bool` is not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real_in(name: str, value, low: float, high: float) -> None:
    if not is_real(value) or not low <= value <= high:
        raise ValueError(
            f"`{name}` must be a number in [{low:g}, {high:g}]. "
            f"Received: {name}={value!r}"
        )


def check_positive(name: str, value) -> None:
    if not is_real(value) or not value > 0 or value == float("inf"):
        raise ValueError(
            f"`{name}` must be a finite number > 0. Received: {name}={value!r}"
        )


def check_int_at_least(name: str, value, low: int) -> None:
    if not is_int(value) or value < low:
        raise ValueError(
            f"`{name}` must be an integer >= {low}. Received: {name}={value!r}"
        )
