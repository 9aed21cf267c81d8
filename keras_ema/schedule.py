"""Averaging schedules: when the EMA updates, and by how much.

A schedule is a pure function of `t`, the number of optimizer steps taken,
counting the one just taken (so `t >= 1` when an update is considered). It
answers, for the update considered after step `t`:

- `is_due(t)`: whether an update happens at all;
- `copies_all(t)`: whether that update copies every tracked weight into the
  shadow (those left alone by `ignore_names` too), as a warm-up does;
- `weight(t)`: the interpolation weight `1 - decay` of that update
  (`1` copies), in float64 on the host; an update that `copies_all` copies
  whatever its weight;
- `decay(t)`: the decay reported in logs and by `get_current_decay()`.

`compiled_is_due`, `compiled_copies_all` and `compiled_weight` are the same
three with `keras.ops` on an int32 scalar tensor, for compiled train steps
(float32). `WarmupSchedule` is the reference article's class.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
from keras import ops


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_real_in(name: str, value, low: float, high: float) -> None:
    if not _is_real(value) or not low <= value <= high:
        raise ValueError(
            f"`{name}` must be a number in [{low:g}, {high:g}]. "
            f"Received: {name}={value!r}"
        )


def _check_positive(name: str, value) -> None:
    if not _is_real(value) or not value > 0 or value == float("inf"):
        raise ValueError(
            f"`{name}` must be a finite number > 0. Received: {name}={value!r}"
        )


def _check_int_at_least(name: str, value, low: int) -> None:
    if not _is_int(value) or value < low:
        raise ValueError(
            f"`{name}` must be an integer >= {low}. Received: {name}={value!r}"
        )


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
    return _largest_real_cubic_root(7.0, 16.0 - sigma_rel**-2, 12.0 - sigma_rel**-2)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width `sigma_rel` of the power-function EMA of exponent
    `gamma`: `sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))`.

    Args:
        gamma: The exponent of the profile, finite and > 0.
    """
    check_gamma("gamma", gamma)
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


SIGMA_REL_MAX = 12**-0.5


def check_sigma_rel(name: str, value) -> None:
    if not _is_real(value) or not 0 < value < SIGMA_REL_MAX:
        raise ValueError(
            f"`{name}` must be a number in (0, 12**-0.5 = {SIGMA_REL_MAX:.6f}) "
            f"(a larger one gives no positive gamma). Received: {name}={value!r}"
        )


def check_gamma(name: str, value) -> None:
    _check_positive(name, value)


def _largest_real_cubic_root(b: float, c: float, d: float) -> float:
    """The largest real root of `x**3 + b x**2 + c x + d`, in float64."""
    roots = np.roots([1.0, b, c, d])
    return float(max(r.real for r in roots if abs(r.imag) <= 1e-9 * abs(r)))


class Schedule:
    """Base class of the averaging schedules; see the module docstring."""

    update_every: int

    def is_due(self, t: int) -> bool:
        raise NotImplementedError

    def copies_all(self, t: int) -> bool:
        raise NotImplementedError

    def weight(self, t: int) -> float:
        raise NotImplementedError

    def decay(self, t: int) -> float:
        raise NotImplementedError

    def compiled_is_due(self, t):
        raise NotImplementedError

    def compiled_copies_all(self, t):
        raise NotImplementedError

    def compiled_weight(self, t):
        raise NotImplementedError

    def get_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)


@dataclasses.dataclass(frozen=True)
class WarmupSchedule(Schedule):
    """Hyperparameters of the warm-up EMA, validated on construction.

    Args:
        beta: Upper bound of the decay, in `[0, 1]`.
        update_after_step: Number of steps during which the EMA only copies
            the online weights.
        update_every: The EMA updates on every `update_every`-th step.
        inv_gamma: Inverse multiplicative factor of the warm-up, `> 0`.
        power: Exponent of the warm-up, `> 0`.
        min_value: Lower bound of the decay, in `[0, beta]`.
    """

    beta: float = 0.9999
    update_after_step: int = 100
    update_every: int = 10
    inv_gamma: float = 1.0
    power: float = 2 / 3
    min_value: float = 0.0

    def __post_init__(self) -> None:
        _check_real_in("beta", self.beta, 0.0, 1.0)
        _check_int_at_least("update_after_step", self.update_after_step, 0)
        _check_int_at_least("update_every", self.update_every, 1)
        _check_positive("inv_gamma", self.inv_gamma)
        _check_positive("power", self.power)
        _check_real_in("min_value", self.min_value, 0.0, 1.0)
        if self.min_value > self.beta:
            raise ValueError(
                "`min_value` must not exceed `beta`. Received: "
                f"min_value={self.min_value!r}, beta={self.beta!r}"
            )

    @property
    def first_average_step(self) -> int:
        """The first due step (as a count of steps before it) after the
        warm-up: the article's update there copies every weight first
        (its `initted` flag)."""
        return (self.update_after_step // self.update_every + 1) * self.update_every

    def is_due(self, t: int) -> bool:
        # The article updates when the steps before this one are a multiple
        # of `update_every`.
        return (t - 1) % self.update_every == 0

    def copies_all(self, t: int) -> bool:
        return self.is_due(t) and t - 1 <= self.first_average_step

    def weight(self, t: int) -> float:
        elapsed = max(int(t) - self.update_after_step - 1, 0)
        if elapsed <= 0:
            return 1.0
        weight = (1.0 + elapsed / self.inv_gamma) ** -self.power
        return min(max(weight, 1.0 - self.beta), 1.0 - self.min_value)

    def decay(self, step: int) -> float:
        """The decay used by an update once the counter has reached `step`.

        This is the article's `get_current_decay()`: `step` is the counter
        value *after* it was advanced by the update that uses the decay.
        """
        elapsed = max(int(step) - self.update_after_step - 1, 0)
        if elapsed <= 0:
            return 0.0
        value = 1.0 - (1.0 + elapsed / self.inv_gamma) ** -self.power
        return min(max(value, self.min_value), self.beta)

    def compiled_is_due(self, t):
        return ops.equal(ops.mod(t - 1, self.update_every), 0)

    def compiled_copies_all(self, t):
        return ops.logical_and(
            self.compiled_is_due(t), ops.less_equal(t - 1, self.first_average_step)
        )

    def compiled_weight(self, t):
        """`weight(t)` as a float32 tensor, for compiled code.

        Computing the interpolation weight directly (rather than `1 - decay`)
        keeps float32 precision when the decay is close to 1.
        """
        elapsed = ops.maximum(
            ops.cast(t, "float32") - (self.update_after_step + 1.0), 0.0
        )
        weight = ops.power(1.0 + elapsed / self.inv_gamma, -self.power)
        weight = ops.clip(weight, 1.0 - self.beta, 1.0 - self.min_value)
        return ops.where(elapsed > 0.0, weight, ops.ones_like(weight))
