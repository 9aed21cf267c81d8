"""The momentum schedules of target networks and self-distillation teachers:
`ConstantSchedule` (Polyak averaging, Keras' `use_ema`) and `CosineSchedule`
(BYOL's and DINO's momentum rising to 1).

They share the rhythm of `periodic`: an update after every `update_every`-th
step, the first of them copying every tracked weight.
"""

from __future__ import annotations

import dataclasses
import math

from keras import ops

from keras_ema.checks import check_int_at_least
from keras_ema.checks import check_real_in
from keras_ema.checks import is_int
from keras_ema.schedule.periodic import _check_count
from keras_ema.schedule.periodic import _first_copies
from keras_ema.schedule.periodic import _PeriodicSchedule

# The step counter is an int32 variable: no step lies beyond this one.
_LAST_STEP = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class ConstantSchedule(_PeriodicSchedule):
    """The same decay at every update: Polyak averaging.

    Every update after the first moves the shadow towards the online weights
    with the weight `1 - beta`: `shadow <- beta * shadow + (1 - beta) * w`.
    This is the EMA of Keras' optimizers (`use_ema=True`, with
    `ema_momentum=beta`), of the keras-io examples' EMA networks
    (`ema = 0.999`), and the Polyak averaging of target networks in
    reinforcement learning, whose `tau` is `1 - beta` (`tau=0.005` in DDPG,
    TD3 and SAC). As in Keras' `use_ema`, the first update copies the
    online weights, so the average never starts from another initialization.

    An update happens after every `update_every`-th optimizer step, the first
    after step `update_every`. `decay(t)` is `beta` from the second update on
    (`0.0` until then).

    Example:

    >>> schedule = keras_ema.ConstantSchedule(0.999)
    >>> schedule.weight(1)  # The first update copies.
    1.0
    >>> schedule.decay(2)
    0.999
    >>> target = keras_ema.ConstantSchedule(beta=1 - 0.005)  # Polyak, tau=0.005
    >>> round(target.weight(10), 6)
    0.005
    >>> ema = keras_ema.EMA(schedule=target)

    Args:
        beta: The decay of every update after the first, in `[0, 1]`:
            `beta=0` copies the online weights at every update, `beta=1`
            keeps the first copy.
        update_every: Update after every `update_every`-th optimizer step.
            Defaults to `1`.
    """

    beta: float
    update_every: int = 1

    def __post_init__(self) -> None:
        check_real_in("beta", self.beta, 0.0, 1.0)
        check_int_at_least("update_every", self.update_every, 1)

    def decay(self, t: int) -> float:
        # `beta` itself, where `1 - (1 - beta)` could be one ulp off.
        return self.beta if self._updates_by(t) >= 2 else 0.0

    def _update_weight(self, n: int) -> float:
        return 1.0 if n <= 1 else 1.0 - self.beta

    def _compiled_update_weight(self, n):
        return _first_copies(n, ops.full_like(n, 1.0 - self.beta))


@dataclasses.dataclass(frozen=True)
class CosineSchedule(_PeriodicSchedule):
    """A decay rising from `start` to `end` along a half cosine: BYOL's and
    DINO's momentum.

    The update after step `t` has the decay
    `end - (end - start) * (cos(pi * min(t, K) / K) + 1) / 2`, with
    `K = total_steps`: `start` at the beginning, `end` from step `K` on.
    This is the momentum of the target network of BYOL (Grill et al., 2020,
    `start=0.996`, `end=1`) and of DINO's teacher (Caron et al., 2021), whose
    `tau = 1 - decay` falls to 0: the teacher averages ever longer and stops
    moving at the end of training. The weight `1 - decay` is computed as
    `1 - end + (end - start) * sin(pi * (K - min(t, K)) / (2 * K)) ** 2`,
    which stays accurate in float32 close to step `K`, where the weight is
    tiny.

    Without `total_steps` the cosine spans the `fit` it is used in:
    `K = epochs * steps_per_epoch`, from the `fit`'s `epochs` argument and
    its number of steps per epoch. That is the whole run from epoch 0, also
    for a `fit` resumed at `initial_epoch` with the EMA's state (as
    `BackupAndRestore` resumes), since the EMA's step counter continues
    where it stopped. Until converted with `in_steps()` (as `fit` does),
    such a schedule gives no weights: `weight`, `compiled_weight` and `decay`
    raise a `ValueError`, and so does a `fit` whose number of steps per epoch
    is unknown (a generator without `steps_per_epoch`). For training split
    over several `fit` calls, or under gradient accumulation (`K` counts
    batches, the schedule optimizer steps), give `total_steps`.

    An update happens after every `update_every`-th optimizer step, the first
    after step `update_every`. `decay(t)` is the decay of the latest update
    made at or before step `t` (`0.0` until the second update).

    Example:

    >>> schedule = keras_ema.CosineSchedule(0.996, total_steps=1000)
    >>> schedule.weight(1)  # The first update copies.
    1.0
    >>> round(schedule.decay(500), 6)  # Halfway: (0.996 + 1) / 2
    0.998
    >>> schedule.decay(1000)
    1.0
    >>> per_fit = keras_ema.CosineSchedule(0.996)
    >>> per_fit.in_steps(steps_per_epoch=100, epochs=30).total_steps
    3000
    >>> teacher = keras_ema.EMA(schedule=per_fit)  # K set by each `fit`.

    Args:
        start: The decay at the first step, in `[0, end]`.
        end: The decay from step `total_steps` on, in `[start, 1]`.
            Defaults to `1.0`.
        total_steps: The number of optimizer steps `K` the cosine spans, an
            integer in `[1, 2**31 - 1]`. Defaults to `None` (the steps of
            the `fit`: epochs times steps per epoch).
        update_every: Update after every `update_every`-th optimizer step.
            Defaults to `1`.
    """

    start: float
    end: float = 1.0
    total_steps: int | None = None
    update_every: int = 1

    def __post_init__(self) -> None:
        check_real_in("start", self.start, 0.0, 1.0)
        check_real_in("end", self.end, 0.0, 1.0)
        if self.start > self.end:
            raise ValueError(
                "`start` must not exceed `end`. Received: "
                f"start={self.start!r}, end={self.end!r}"
            )
        if self.total_steps is not None and (
            not is_int(self.total_steps) or not 1 <= self.total_steps <= _LAST_STEP
        ):
            raise ValueError(
                "`total_steps` must be None or an integer in [1, 2**31 - 1] "
                "(the EMA counts steps in int32). "
                f"Received: total_steps={self.total_steps!r}"
            )
        check_int_at_least("update_every", self.update_every, 1)

    def in_steps(
        self,
        steps_per_epoch: int | None = None,
        batch_size: int | None = None,
        epochs: int | None = None,
    ) -> CosineSchedule:
        """The same schedule with `total_steps` known.

        Args:
            steps_per_epoch: The number of optimizer steps in an epoch,
                needed without `total_steps`. Defaults to `None`.
            batch_size: Not used. Defaults to `None`.
            epochs: The `epochs` of the `fit`, needed without
                `total_steps`. Defaults to `None`.

        Returns:
            This schedule if it has `total_steps`, else a `CosineSchedule`
            whose `total_steps` is `epochs * steps_per_epoch`.
        """
        if self.total_steps is not None:
            return self
        why = (
            "a cosine schedule without `total_steps` spans the `fit`, its "
            "epochs times its steps per epoch, which are unknown outside "
            "`fit` or for a dataset of unknown length (give `fit` a "
            "`steps_per_epoch`, or the schedule a `total_steps`)"
        )
        _check_count("steps_per_epoch", steps_per_epoch, why)
        _check_count("epochs", epochs, why)
        total_steps = min(epochs * steps_per_epoch, _LAST_STEP)
        return dataclasses.replace(self, total_steps=total_steps)

    def _check_total_steps(self) -> None:
        if self.total_steps is None:
            raise ValueError(
                "`total_steps` must be known for the schedule to give "
                "weights outside `fit` (`EMA.update()` in a custom loop): "
                "without it the cosine spans the steps of a `fit` (epochs "
                "times steps per epoch). Give the optimizer steps the cosine "
                "spans, `CosineSchedule(..., total_steps=...)`, or train with "
                "`fit`. Received: total_steps=None"
            )

    def weight(self, t: int) -> float:
        self._check_total_steps()
        return super().weight(t)

    def decay(self, t: int) -> float:
        self._check_total_steps()
        return super().decay(t)

    def _update_weight(self, n: int) -> float:
        if n <= 1:
            return 1.0
        remaining = max(self.total_steps - n * self.update_every, 0)
        rising = math.sin(math.pi / (2 * self.total_steps) * remaining) ** 2
        return 1.0 - self.end + (self.end - self.start) * rising

    def compiled_weight(self, t):
        self._check_total_steps()
        n = ops.maximum(ops.floor_divide(t, self.update_every), 1)
        # The steps left counted in int32: exact, where `K - t` in float32
        # would not be beyond 2**24 steps.
        remaining = ops.maximum(self.total_steps - n * self.update_every, 0)
        angle = ops.cast(remaining, "float32") * (math.pi / (2 * self.total_steps))
        weight = 1.0 - self.end + (self.end - self.start) * ops.square(ops.sin(angle))
        return _first_copies(ops.cast(n, "float32"), weight)
