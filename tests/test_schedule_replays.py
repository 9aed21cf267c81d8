"""The schedules step by step: the shadows of scalar sequences against the
schedules' defining properties (the zero-started EMA, EDM2's profile, the
half-life), and tests/oracle.py's `ScheduledEMA` against the schedules."""

from __future__ import annotations

import math

import numpy as np
import oracle
import pytest

from keras_ema import BiasCorrectedSchedule
from keras_ema import HalfLifeSchedule
from keras_ema import PowerFunctionSchedule

# ---------------------------------------------------------------------------
# Step-by-step shadows of a scalar sequence.


def replay(schedule, values):
    """The shadow after each step, in float64, updated as the schedule says:
    a copy when it copies, else `shadow + weight * (value - shadow)`."""
    shadow, shadows = math.nan, []
    for t, value in enumerate(values, start=1):
        if schedule.copies_all(t):
            shadow = value
        elif schedule.is_due(t):
            shadow = shadow + schedule.weight(t) * (value - shadow)
        shadows.append(shadow)
    return np.array(shadows)


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("beta", [0.5, 0.9, 0.999])
def test_bias_corrected_shadow_is_the_zero_started_ema_divided(beta, k):
    values = np.random.default_rng(0).normal(3.0, 1.0, size=2000)
    shadows = replay(BiasCorrectedSchedule(beta=beta, update_every=k), values)
    z = 0.0
    for n, t in enumerate(range(k, len(values) + 1, k), start=1):
        z = beta * z + (1.0 - beta) * values[t - 1]
        assert shadows[t - 1] == pytest.approx(z / (1.0 - beta**n), rel=1e-12)
        # Between updates the shadow holds.
        assert (shadows[t - 1 : t - 1 + k] == shadows[t - 1]).all()


def edm2_power_function_beta(std, t_next, t_delta):
    """EDM2's `training/phema.py`, in float64 (`exp` from `std` as there)."""
    exp = np.roots([1, 7, 16 - std**-2, 12 - std**-2]).real.max()
    return (1 - t_delta / t_next) ** (exp + 1)


@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_power_function_weights_are_edm2s_and_weigh_the_profile(sigma_rel, k):
    schedule = PowerFunctionSchedule(sigma_rel=sigma_rel, update_every=k)
    last_step = 400 * k
    t_previous = 0
    for t in range(k, last_step + 1, k):
        beta = edm2_power_function_beta(sigma_rel, t, t - t_previous)
        assert schedule.weight(t) == pytest.approx(1.0 - beta, rel=1e-12)
        t_previous = t
    # The average weighs the value of the i-th of N updates by the profile's
    # mass over (t_(i-1), t_i]: ((i / N) ** (g + 1) - ((i - 1) / N) ** (g + 1)).
    values = np.random.default_rng(1).normal(size=last_step)
    shadows = replay(schedule, values)
    g = schedule.gamma
    for big_n in (1, 2, 17, 400):
        i = np.arange(1, big_n + 1)
        mass = (i / big_n) ** (g + 1) - ((i - 1) / big_n) ** (g + 1)
        expected = mass @ values[i * k - 1]
        assert shadows[big_n * k - 1] == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize(("half_life", "k"), [(50, 1), (50, 5), (48, 3), (7, 7)])
def test_half_life_halves_the_weight_of_values_half_life_steps_old(half_life, k):
    schedule = HalfLifeSchedule(half_life, update_every=k)
    last_step = 20 * half_life
    # Values until h steps before the end are 1, later ones 0: the average is
    # the weight of everything h or more steps old.
    values = (np.arange(1, last_step + 1) <= last_step - half_life).astype(float)
    assert replay(schedule, values)[-1] == pytest.approx(0.5, rel=1e-12)
    # A single value's own weight halves in every h steps.
    t_impulse = 5 * k
    impulse = np.zeros(last_step)
    impulse[t_impulse - 1] = 1.0
    shadows = replay(schedule, impulse)
    assert shadows[t_impulse - 1 + half_life] == pytest.approx(
        shadows[t_impulse - 1] / 2, rel=1e-12
    )


# ---------------------------------------------------------------------------
# tests/oracle.py's `ScheduledEMA` with its own rules agrees with the above.

ORACLE_CASES = [
    (
        BiasCorrectedSchedule(beta=0.99, update_every=3),
        oracle.bias_corrected_rule(0.99),
    ),
    (
        PowerFunctionSchedule(sigma_rel=0.05, update_every=2),
        oracle.power_function_rule(
            oracle.sigma_rel_to_gamma_by_bisection(0.05),
        ),
    ),
    (HalfLifeSchedule(30, update_every=4), oracle.half_life_rule(30)),
]


@pytest.mark.parametrize(
    ("schedule", "rule"), ORACLE_CASES, ids=["bias", "power", "half_life"]
)
def test_the_oracle_replays_the_schedule(schedule, rule):
    rng = np.random.default_rng(2)
    # float32 weights, float32 shadows (float64 weights keep float64 ones).
    online = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
    online = {k: v.astype(np.float32) for k, v in online.items()}
    ema = oracle.ScheduledEMA(online, rule, update_every=schedule.update_every)
    values = rng.normal(size=(600, 10)).astype(np.float32)
    for t, row in enumerate(values, start=1):
        ema.update({"a": row[:6].reshape(3, 2), "b": row[6:]})
        assert ema.get_current_decay() == pytest.approx(schedule.decay(t), rel=1e-9)
    for column in range(10):
        expected = replay(schedule, values[:, column])[-1]
        actual = (
            ema.ema["a"].ravel()[column] if column < 6 else ema.ema["b"][column - 6]
        )
        assert actual.dtype == np.float32
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_the_oracle_copies_ignored_names_only_at_the_first_update():
    online = {"kept": np.zeros(2), "ignored": np.zeros(2), "copied": np.zeros(2)}
    ema = oracle.ScheduledEMA(
        online,
        oracle.half_life_rule(1.0),
        update_every=2,
        param_or_buffer_names_no_ema=["copied"],
        ignore_names=["ignored"],
    )
    for t in range(1, 7):
        ema.update({k: np.full(2, float(t)) for k in online})
    np.testing.assert_array_equal(ema.ema["ignored"], 2.0)
    np.testing.assert_array_equal(ema.ema["copied"], 6.0)
    # Weight 3/4 at updates 2 and 3: 2 -> 3.5 -> 5.375.
    np.testing.assert_allclose(ema.ema["kept"], 5.375)
