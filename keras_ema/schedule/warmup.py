"""`WarmupSchedule`: the warm-up EMA of ema-pytorch's `EMA` (the reference
class of the article "EMA in deep learning: principles, implementation and
experiments"), whose decay grows from 0 towards `beta` after
`update_after_step` steps of copies."""

from __future__ import annotations

import dataclasses

from keras import ops

from keras_ema.checks import check_int_at_least
from keras_ema.checks import check_positive
from keras_ema.checks import check_real_in
from keras_ema.schedule.base import Schedule


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
        check_real_in("beta", self.beta, 0.0, 1.0)
        check_int_at_least("update_after_step", self.update_after_step, 0)
        check_int_at_least("update_every", self.update_every, 1)
        check_positive("inv_gamma", self.inv_gamma)
        check_positive("power", self.power)
        check_real_in("min_value", self.min_value, 0.0, 1.0)
        if self.min_value > self.beta:
            raise ValueError(
                "`min_value` must not exceed `beta`. Received: "
                f"min_value={self.min_value!r}, beta={self.beta!r}"
            )

    @property
    def last_copy_offset(self) -> int:
        """`t - 1` of the last due step whose update copies every weight:
        the first due step after the warm-up, where ema-pytorch's update
        copies every weight first (its `initted` flag)."""
        return (self.update_after_step // self.update_every + 1) * self.update_every

    def is_due(self, t: int) -> bool:
        # ema-pytorch updates when the steps before this one are a multiple
        # of `update_every`.
        return (t - 1) % self.update_every == 0

    def copies_all(self, t: int) -> bool:
        return self.is_due(t) and t - 1 <= self.last_copy_offset

    def first_averaging_step(self) -> int:
        # The due step after the last copy.
        return self.last_copy_offset + self.update_every + 1

    def weight(self, t: int) -> float:
        elapsed = max(int(t) - self.update_after_step - 1, 0)
        if elapsed <= 0:
            return 1.0
        weight = (1.0 + elapsed / self.inv_gamma) ** -self.power
        return min(max(weight, 1.0 - self.beta), 1.0 - self.min_value)

    def decay(self, step: int) -> float:
        """The decay used by an update once the counter has reached `step`.

        This is ema-pytorch's `EMA.get_current_decay()`: `step` is the counter
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
            self.compiled_is_due(t), ops.less_equal(t - 1, self.last_copy_offset)
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
