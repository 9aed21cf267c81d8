"""The relative width `sigma_rel` of a power-function EMA and its exponent
`gamma` (Karras et al. 2024, EDM2): the conversions both ways, and the checks
of their values."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from keras_ema.checks import check_positive
from keras_ema.checks import is_real


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent `gamma` of the power-function EMA of relative width
    `sigma_rel` (Karras et al. 2024, EDM2).

    `gamma` is the largest real root of
    `g**3 + 7 g**2 + (16 - s**-2) g + 12 - s**-2`, `s = sigma_rel`. Only
    `sigma_rel` in `(0, 12**-0.5)` gives a positive `gamma`; above about
    0.3003 the cubic has no real root at all.

    Args:
        sigma_rel: The relative standard deviation of the averaging profile,
            in `(0, 12**-0.5)`.

    Returns:
        `gamma`, a float > 0.
    """
    check_sigma_rel("sigma_rel", sigma_rel)
    if sigma_rel < _SMALLEST_CUBIC_SIGMA_REL:
        # `sigma_rel**-2` would overflow the cubic's coefficients; here the
        # root is `1 / sigma_rel - 3 + O(sigma_rel)`, to float64 precision.
        gamma = 1.0 / sigma_rel - 3.0
        if gamma == math.inf:
            raise ValueError(
                "`sigma_rel` is too small: its gamma is not a finite float64 "
                f"number. Received: sigma_rel={sigma_rel!r}"
            )
        return gamma
    return _largest_real_cubic_root(7.0, 16.0 - sigma_rel**-2, 12.0 - sigma_rel**-2)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width `sigma_rel` of the power-function EMA of exponent
    `gamma`: `sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))`.

    Args:
        gamma: The exponent of the profile, finite and > 0.
    """
    check_gamma("gamma", gamma)
    # Arranged so that no intermediate overflows for a large gamma.
    return math.sqrt((gamma + 1) / (gamma + 3)) / (gamma + 2)


SIGMA_REL_MAX = 12**-0.5
# Below it EDM2's cubic has coefficients beyond float64 (about 1e-154).
_SMALLEST_CUBIC_SIGMA_REL = 1e-150


def check_sigma_rel(name: str, value) -> None:
    if not is_real(value) or not 0 < value < SIGMA_REL_MAX:
        raise ValueError(
            f"`{name}` must be a number in (0, 12**-0.5 = {SIGMA_REL_MAX:.6f}) "
            f"(a larger one gives no positive gamma). Received: {name}={value!r}"
        )


def check_gamma(name: str, value) -> None:
    check_positive(name, value)


def checked_sigma_rels(sigma_rels) -> list:
    """`sigma_rels` as a list, checked: a sequence of distinct `sigma_rel`s,
    not empty."""
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Iterable):
        raise ValueError(
            "`sigma_rels` must be a sequence of numbers. "
            f"Received: sigma_rels={sigma_rels!r}"
        )
    values = list(sigma_rels)
    if not values or len(set(values)) != len(values):
        raise ValueError(
            "`sigma_rels` must be distinct and not empty. "
            f"Received: sigma_rels={values!r}"
        )
    for index, value in enumerate(values):
        check_sigma_rel(f"sigma_rels[{index}]", value)
    return values


def _largest_real_cubic_root(b: float, c: float, d: float) -> float:
    """The largest real root of `x**3 + b x**2 + c x + d`, in float64."""
    roots = np.roots([1.0, b, c, d])
    return float(max(r.real for r in roots if abs(r.imag) <= 1e-9 * abs(r)))
