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

`BiasCorrectedSchedule`, `PowerFunctionSchedule` and `HalfLifeSchedule`
share one rhythm: an update after every `update_every`-th step
(`t % update_every == 0`, the first at `t = update_every`, as EDM2 updates),
the first of them copying every tracked weight. Between updates their
`weight(t)` and `decay(t)` are those of the latest update made at or before
step `t`; before the first update the weight is 1 and the decay 0.
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

    def first_averaging_step(self) -> int:
        """The first step `t` whose update averages rather than copies:
        before it, the EMA is a copy of the weights."""
        raise NotImplementedError

    def in_steps(
        self, steps_per_epoch: int | None = None, batch_size: int | None = None
    ) -> Schedule:
        """The schedule with every length in optimizer steps, given what a
        `fit` knows; most schedules are already."""
        return self

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

    def first_averaging_step(self) -> int:
        return self.first_average_step + self.update_every + 1

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
    removes the bias (the reference article, section 2.2; Adam corrects its
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
        if not _is_real(self.beta) or not 0.0 <= self.beta < 1.0:
            raise ValueError(
                "`beta` must be a number in [0, 1) (a decay of 1 never moves "
                f"from the first copy). Received: beta={self.beta!r}"
            )
        _check_int_at_least("update_every", self.update_every, 1)

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
        _check_int_at_least("update_every", self.update_every, 1)
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
        _check_positive("half_life", self.half_life)
        if not isinstance(self.unit, str) or self.unit not in _HALF_LIFE_UNITS:
            raise ValueError(
                f"`unit` must be one of {_HALF_LIFE_UNITS}. "
                f"Received: unit={self.unit!r}"
            )
        _check_int_at_least("update_every", self.update_every, 1)

    def in_steps(
        self, steps_per_epoch: int | None = None, batch_size: int | None = None
    ) -> HalfLifeSchedule:
        """The same schedule with its half-life in optimizer steps.

        Args:
            steps_per_epoch: The number of optimizer steps in an epoch, needed
                for a half-life in epochs. Defaults to `None`.
            batch_size: The number of samples in a batch, needed for a
                half-life in samples. Defaults to `None`.

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
        if self.unit != "steps":
            needed = "steps per epoch" if self.unit == "epochs" else "batch size"
            raise ValueError(
                '`unit` must be "steps" for the schedule to give weights: a '
                f"half-life in {self.unit} is converted to optimizer steps with "
                f"the {needed} of a `fit`, unknown outside one (the schedule "
                "gives weights inside `fit`, or after `in_steps()`). "
                f"Received: unit={self.unit!r}"
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
    _check_int_at_least(name, value, 1)


def serialize(schedule: Schedule) -> dict:
    """`{"class_name", "config"}` of a schedule, JSON-compatible."""
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize(config) -> Schedule:
    """The schedule that `serialize` described."""
    classes = {
        cls.__name__: cls
        for cls in (
            WarmupSchedule,
            BiasCorrectedSchedule,
            PowerFunctionSchedule,
            HalfLifeSchedule,
        )
    }
    if isinstance(config, Schedule):
        return config
    if not isinstance(config, dict) or config.get("class_name") not in classes:
        raise ValueError(
            "A schedule's config must be a dict with a `class_name` among "
            f"{sorted(classes)} and a `config`. Received: {config!r}"
        )
    return classes[config["class_name"]].from_config(config.get("config", {}))
