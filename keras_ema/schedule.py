"""The inverse-gamma warm-up schedule of the EMA decay, and its validation.

The schedule is @crowsonkb's EMA warm-up as used by ema-pytorch and the
reference article: after `update_after_step` steps of plain copying, the decay
ramps up as `1 - (1 + e / inv_gamma) ** -power`, clamped to
`[min_value, beta]`.
"""

from __future__ import annotations

import dataclasses
import numbers

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


@dataclasses.dataclass(frozen=True)
class WarmupSchedule:
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

    def update_weight(self, step):
        """`1 - decay(step)` as a float32 tensor, for compiled code.

        Computing the interpolation weight directly (rather than `1 - decay`)
        keeps float32 precision when the decay is close to 1.
        """
        elapsed = ops.maximum(
            ops.cast(step, "float32") - (self.update_after_step + 1.0), 0.0
        )
        weight = ops.power(1.0 + elapsed / self.inv_gamma, -self.power)
        weight = ops.clip(weight, 1.0 - self.beta, 1.0 - self.min_value)
        return ops.where(elapsed > 0.0, weight, ops.ones_like(weight))

    def get_config(self) -> dict:
        return dataclasses.asdict(self)
