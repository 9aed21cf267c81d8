"""The schedules that update after every `update_every`-th step:
`BiasCorrectedSchedule`, `PowerFunctionSchedule` and `HalfLifeSchedule`.

They share one rhythm: an update after every `update_every`-th step
(`t % update_every == 0`, the first at `t = update_every`, as EDM2 updates),
the first of them copying every tracked weight. Between updates their
`weight(t)` and `decay(t)` are those of the latest update made at or before
step `t`; before the first update the weight is 1 and the decay 0.
"""

from __future__ import annotations

import dataclasses
import math

from keras import ops

from keras_ema.checks import check_int_at_least
from keras_ema.checks import check_positive
from keras_ema.checks import is_real
from keras_ema.schedule.base import Schedule
from keras_ema.schedule.conversions import gamma_to_sigma_rel
from keras_ema.schedule.conversions import sigma_rel_to_gamma

_HALF_LIFE_UNITS = ("steps", "epochs", "samples")


class _PeriodicSchedule(Schedule):
    """The rhythm shared by the schedules below.

    An update happens after every `update_every`-th step, the n-th one
    (`n = t // update_every`) after step `t_n = n * update_every`, so every
    update is `delta_n = update_every` steps after the previous one (`t_0 = 0`).
    The first update copies every tracked weight. Subclasses give the
    interpolation weight of the n-th update, `n >= 1`, on the host in float64
    (`_update_weight`) and in compiled code in float32
    (`_compiled_update_weight`, `n` a float32 tensor).
    """

    def _updates_by(self, t: int) -> int:
        return int(t) // self.update_every

    def _update_weight(self, n: int) -> float:
        raise NotImplementedError

    def _compiled_update_weight(self, n):
        raise NotImplementedError

    def is_due(self, t: int) -> bool:
        return int(t) % self.update_every == 0

    def copies_all(self, t: int) -> bool:
        return int(t) == self.update_every

    def first_averaging_step(self) -> int:
        return 2 * self.update_every

    def weight(self, t: int) -> float:
        """The weight of the latest update made at or before step `t` (1
        before the first update), in float64."""
        return self._update_weight(max(self._updates_by(t), 1))

    def decay(self, t: int) -> float:
        """The decay of the latest update made at or before step `t`, in
        float64: `0.0` before the first update and for the first update
        itself, which copies."""
        if self._updates_by(t) < 1:
            return 0.0
        return 1.0 - self.weight(t)

    def compiled_is_due(self, t):
        return ops.equal(ops.mod(t, self.update_every), 0)

    def compiled_copies_all(self, t):
        return ops.equal(t, self.update_every)

    def compiled_weight(self, t):
        n = ops.maximum(ops.floor_divide(t, self.update_every), 1)
        return self._compiled_update_weight(ops.cast(n, "float32"))


def _first_copies(n, weight):
    """`weight` where `n > 1`, exactly 1 for the first update."""
    return ops.where(ops.greater(n, 1.0), weight, ops.ones_like(weight))


@dataclasses.dataclass(frozen=True)
class BiasCorrectedSchedule(_PeriodicSchedule):
    """A constant-decay EMA with the bias correction of a zero start.

    An EMA started at zero, `z_n = beta * z_(n-1) + (1 - beta) * x_n`, is
    biased towards zero; dividing it by `1 - beta**n` after its n-th update
    removes the bias (section 2.2 of the article "EMA in deep learning:
    principles, implementation and experiments"; Adam corrects its
    moments the same way). This schedule keeps the corrected value itself:
    after the n-th update the shadow is exactly `z_n / (1 - beta**n)`, which
    as an update of the previous shadow is a step towards the online weights
    with the weight `(1 - beta) / (1 - beta**n)`. The first update copies;
    the weight then falls towards `1 - beta`, and with `beta` close to 1 the
    first updates are close to a running average (weight `1/n`).
    `1 - beta**n` is computed as `-expm1(n * log(beta))`, which stays
    accurate for `beta` close to 1 and millions of updates.

    An update happens after every `update_every`-th optimizer step, the first
    after step `update_every`. `decay(t)` is the decay of the latest update
    made at or before step `t` (`0.0` until the second update).

    Example:

    >>> schedule = keras_ema.BiasCorrectedSchedule(beta=0.9)
    >>> schedule.weight(1)  # The first update copies.
    1.0
    >>> round(schedule.weight(2), 6)  # 0.1 / (1 - 0.9**2)
    0.526316
    >>> round(schedule.weight(1000), 6)  # 1 - beta
    0.1

    Args:
        beta: The decay of the uncorrected EMA, in `[0, 1)`; `beta=0` copies
            the online weights at every update. Defaults to `0.999`.
        update_every: Update after every `update_every`-th optimizer step.
            Defaults to `1`.
    """

    beta: float = 0.999
    update_every: int = 1

    def __post_init__(self) -> None:
        if not is_real(self.beta) or not 0.0 <= self.beta < 1.0:
            raise ValueError(
                "`beta` must be a number in [0, 1) (a decay of 1 never moves "
                f"from the first copy). Received: beta={self.beta!r}"
            )
        check_int_at_least("update_every", self.update_every, 1)

    def _update_weight(self, n: int) -> float:
        if n <= 1 or self.beta == 0.0:
            return 1.0
        return (1.0 - self.beta) / -math.expm1(n * math.log(self.beta))

    def _compiled_update_weight(self, n):
        if self.beta == 0.0:
            return ops.ones_like(n)
        weight = (1.0 - self.beta) / -ops.expm1(n * math.log(self.beta))
        return _first_copies(n, weight)


@dataclasses.dataclass(frozen=True)
class PowerFunctionSchedule(_PeriodicSchedule):
    """The power-function EMA of EDM2, whose profile scales with training.

    The average after `t` steps weights the weights seen at step `tau` by
    `(gamma + 1) / t * (tau / t) ** gamma`: its width grows with the length
    of training, as a fixed fraction `sigma_rel` of it (Karras et al., 2024,
    "Analyzing and Improving the Training Dynamics of Diffusion Models",
    section 3 and appendix C). The n-th update, after step `t_n` and
    `delta_n` steps after the previous one, has the decay
    `beta_n = (1 - delta_n / t_n) ** (gamma + 1)`; the first (`beta_1 = 0`)
    copies. The weight `1 - beta_n` is computed as
    `-expm1((gamma + 1) * log1p(-delta_n / t_n))`, which stays accurate in
    float32 after millions of steps, where `1 - beta_n` itself does not.

    Give either `sigma_rel` (EDM2 uses 0.05 and 0.10) or `gamma`; the other
    is derived (`gamma` as the largest real root of EDM2's cubic
    `g**3 + 7 g**2 + (16 - s**-2) g + 12 - s**-2`, `s = sigma_rel`) and both
    are attributes. `get_config()` returns the one given.

    An update happens after every `update_every`-th optimizer step, the first
    after step `update_every`, so `delta_n / t_n = 1 / n` and the profile
    does not depend on `update_every`. `decay(t)` is the decay of the latest
    update made at or before step `t` (`0.0` until the second update).

    Example:

    >>> schedule = keras_ema.PowerFunctionSchedule(sigma_rel=0.10)
    >>> round(schedule.gamma, 4)
    6.9372
    >>> schedule.weight(1)  # The first update copies.
    1.0
    >>> round(schedule.decay(1000), 6)  # (1 - 1 / 1000) ** (gamma + 1)
    0.99209

    Args:
        sigma_rel: The width of the averaging profile relative to the length
            of training, in `(0, 12**-0.5)`. Defaults to `None`.
        gamma: The exponent of the profile, finite and `> 0`. Defaults to
            `None`.
        update_every: Update after every `update_every`-th optimizer step.
            Defaults to `1`.
    """

    sigma_rel: float | None = None
    gamma: float | None = None
    update_every: int = 1
    # Which of the two was given, for `get_config`.
    _from_sigma_rel: bool = dataclasses.field(
        default=True, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if (self.sigma_rel is None) == (self.gamma is None):
            raise ValueError(
                "Exactly one of `sigma_rel` and `gamma` must be given. "
                f"Received: sigma_rel={self.sigma_rel!r}, gamma={self.gamma!r}"
            )
        check_int_at_least("update_every", self.update_every, 1)
        set_field = object.__setattr__  # The dataclass is frozen.
        if self.sigma_rel is not None:
            gamma = sigma_rel_to_gamma(self.sigma_rel)
            if not 0.0 < gamma < math.inf:
                raise ValueError(
                    "`sigma_rel` gives no finite gamma > 0 in float64. "
                    f"Received: sigma_rel={self.sigma_rel!r}"
                )
            set_field(self, "gamma", gamma)
        else:
            set_field(self, "sigma_rel", gamma_to_sigma_rel(self.gamma))
            set_field(self, "_from_sigma_rel", False)

    def get_config(self) -> dict:
        given = "sigma_rel" if self._from_sigma_rel else "gamma"
        return {given: getattr(self, given), "update_every": self.update_every}

    def _update_weight(self, n: int) -> float:
        if n <= 1:
            return 1.0
        return -math.expm1((self.gamma + 1.0) * math.log1p(-1.0 / n))

    def _compiled_update_weight(self, n):
        # log1p(-1) would be -inf: the first update is set apart below.
        later = ops.maximum(n, 2.0)
        weight = -ops.expm1((self.gamma + 1.0) * ops.log1p(-1.0 / later))
        return _first_copies(n, weight)


@dataclasses.dataclass(frozen=True)
class HalfLifeSchedule(_PeriodicSchedule):
    """A constant decay given by its half-life.

    Each update has the decay `0.5 ** (delta_n / h)`, where `delta_n` is the
    number of steps since the previous update and `h` the half-life in
    optimizer steps: whatever `update_every` (of which `h` is a multiple),
    the weights seen `h` or more steps ago together weigh one half of the
    average. The first update
    copies. This is how Composer's EMA is set (`half_life="1000ba"` or
    `"1ep"`). A half-life in samples follows the scaling rule of Busbridge
    et al., 2023: a k-fold batch raises the decay to its k-th power.

    A half-life in `"epochs"` or `"samples"` must be converted to steps with
    `in_steps()`, from the steps per epoch or the batch size of a `fit`,
    before the schedule gives weights: until then `weight`,
    `compiled_weight` and `decay` raise a `ValueError`.

    An update happens after every `update_every`-th optimizer step, the first
    after step `update_every`. `decay(t)` is the decay of the latest update
    made at or before step `t` (`0.0` until the second update).

    Example:

    >>> schedule = keras_ema.HalfLifeSchedule(1000)
    >>> round(schedule.decay(10), 6)  # 0.5 ** (1 / 1000)
    0.999307
    >>> per_epoch = keras_ema.HalfLifeSchedule(2, unit="epochs")
    >>> per_epoch.in_steps(steps_per_epoch=500).half_life
    1000

    Args:
        half_life: The half-life in `unit`s, finite and `> 0`.
        unit: `"steps"` (optimizer steps), `"epochs"` or `"samples"`.
            Defaults to `"steps"`.
        update_every: Update after every `update_every`-th optimizer step.
            Defaults to `1`.
    """

    half_life: float
    unit: str = "steps"
    update_every: int = 1

    def __post_init__(self) -> None:
        check_positive("half_life", self.half_life)
        if not isinstance(self.unit, str) or self.unit not in _HALF_LIFE_UNITS:
            raise ValueError(
                f"`unit` must be one of {_HALF_LIFE_UNITS}. "
                f"Received: unit={self.unit!r}"
            )
        check_int_at_least("update_every", self.update_every, 1)

    def in_steps(
        self,
        steps_per_epoch: int | None = None,
        batch_size: int | None = None,
        epochs: int | None = None,
    ) -> HalfLifeSchedule:
        """The same schedule with its half-life in optimizer steps.

        Args:
            steps_per_epoch: The number of optimizer steps in an epoch, needed
                for a half-life in epochs. Defaults to `None`.
            batch_size: The number of samples in a batch, needed for a
                half-life in samples. Defaults to `None`.
            epochs: Not used: a half-life does not depend on the length of
                training. Defaults to `None`.

        Returns:
            A `HalfLifeSchedule` with `unit="steps"`: `half_life` times
            `steps_per_epoch` for epochs, divided by `batch_size` for samples.
        """
        if self.unit == "epochs":
            _check_count(
                "steps_per_epoch",
                steps_per_epoch,
                "a half-life in epochs needs the number of steps per epoch, "
                "which is unknown outside `fit` or for a dataset of unknown "
                "length (give `fit` a `steps_per_epoch`, or the half-life in "
                '`unit="steps"`)',
            )
            half_life = self.half_life * steps_per_epoch
        elif self.unit == "samples":
            _check_count(
                "batch_size",
                batch_size,
                "a half-life in samples needs the batch size, which is unknown "
                "outside `fit` or when the data batches itself (a dataset or "
                'a generator: give the half-life in `unit="steps"`)',
            )
            half_life = self.half_life / batch_size
        else:
            half_life = self.half_life
        return HalfLifeSchedule(half_life, "steps", self.update_every)

    def _check_in_steps(self) -> None:
        if self.unit == "steps":
            return
        if self.unit == "epochs":
            needed, in_steps = (
                "steps per epoch",
                f"{self.half_life!r} * steps_per_epoch",
            )
        else:
            needed, in_steps = "batch size", f"{self.half_life!r} / batch_size"
        if self.update_every != 1:
            in_steps += f", update_every={self.update_every}"
        raise ValueError(
            '`unit` must be "steps" for the schedule to give weights outside '
            f"`fit` (`EMA.update()` in a custom loop): a half-life in "
            f"{self.unit} needs the {needed} of a `fit`. Give the half-life "
            f"in optimizer steps, `HalfLifeSchedule({in_steps})`, or train "
            f"with `fit`. Received: unit={self.unit!r}"
        )

    def weight(self, t: int) -> float:
        self._check_in_steps()
        return super().weight(t)

    def decay(self, t: int) -> float:
        self._check_in_steps()
        return super().decay(t)

    def compiled_weight(self, t):
        self._check_in_steps()
        return super().compiled_weight(t)

    def _update_weight(self, n: int) -> float:
        if n <= 1:
            return 1.0
        return -math.expm1(self.update_every / self.half_life * math.log(0.5))

    def _compiled_update_weight(self, n):
        # The same weight at every update but the first: computed once on
        # the host, in float64.
        weight = self._update_weight(2)
        return _first_copies(n, ops.full_like(n, weight))


def _check_count(name: str, value, why: str) -> None:
    if value is None:
        raise ValueError(f"`{name}` must be given: {why}. Received: {name}=None")
    check_int_at_least(name, value, 1)
