"""The bias-corrected, power-function and half-life schedules against NumPy
transcriptions of their formulas, their properties, and argument checks."""

from __future__ import annotations

import doctest
import math
import re

import keras
import numpy as np
import oracle
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_ema
from keras_ema import BiasCorrectedSchedule
from keras_ema import HalfLifeSchedule
from keras_ema import PowerFunctionSchedule
from keras_ema.schedule import SIGMA_REL_MAX
from keras_ema.schedule import gamma_to_sigma_rel
from keras_ema.schedule import sigma_rel_to_gamma

# ---------------------------------------------------------------------------
# The formulas, transcribed in float64 NumPy from their sources.


def update_times(update_every: int, last_step: int):
    """`t_n` and `delta_n` of the updates made up to `last_step`: one after
    every step `t` with `t % update_every == 0`, `t_0 = 0`."""
    steps = np.arange(1, last_step + 1)
    t_n = steps[steps % update_every == 0]
    return t_n, np.diff(t_n, prepend=0)


def bias_corrected_weights(beta, t_n, delta_n):
    """The article's section 2.2: `(1 - beta) / (1 - beta**n)`."""
    n = np.arange(1, len(t_n) + 1, dtype=np.float64)
    return (1.0 - beta) / (1.0 - beta**n)


def power_function_weights(gamma, t_n, delta_n):
    """EDM2's `power_function_beta`: `1 - (1 - delta / t) ** (gamma + 1)`."""
    return 1.0 - (1.0 - delta_n / t_n) ** (gamma + 1.0)


def half_life_weights(h, t_n, delta_n):
    """Composer's half-life: `1 - 0.5 ** (delta / h)`; the first copies."""
    weights = 1.0 - 0.5 ** (delta_n / h)
    weights[0] = 1.0
    return weights


def weights_per_step(update_weights, t_n, last_step):
    """The weight of the latest update made at or before each step `1..T`
    (1 before the first update)."""
    latest = np.searchsorted(t_n, np.arange(1, last_step + 1), side="right") - 1
    return np.where(latest >= 0, update_weights[np.maximum(latest, 0)], 1.0)


def reference(schedule, last_step):
    """The weight and the decay the schedule should give at steps `1..T`."""
    k = schedule.update_every
    t_n, delta_n = update_times(k, last_step)
    if isinstance(schedule, BiasCorrectedSchedule):
        update_weights = bias_corrected_weights(schedule.beta, t_n, delta_n)
    elif isinstance(schedule, PowerFunctionSchedule):
        update_weights = power_function_weights(schedule.gamma, t_n, delta_n)
    else:
        update_weights = half_life_weights(schedule.half_life, t_n, delta_n)
    weights = weights_per_step(update_weights, t_n, last_step)
    made = np.arange(1, last_step + 1) >= k
    return weights, np.where(made, 1.0 - weights, 0.0)


def compiled(fn, t):
    return ops.convert_to_numpy(fn(ops.convert_to_tensor(t, dtype="int32")))


def all_steps(last_step):
    return np.arange(1, last_step + 1, dtype=np.int32)


SCHEDULES = [
    BiasCorrectedSchedule(beta=0.9),
    BiasCorrectedSchedule(beta=0.999, update_every=1),
    BiasCorrectedSchedule(beta=0.999, update_every=7),
    BiasCorrectedSchedule(beta=0.5, update_every=3),
    PowerFunctionSchedule(sigma_rel=0.05),
    PowerFunctionSchedule(sigma_rel=0.10, update_every=10),
    PowerFunctionSchedule(gamma=3.0, update_every=4),
    PowerFunctionSchedule(sigma_rel=0.25, update_every=2),
    HalfLifeSchedule(100),
    HalfLifeSchedule(37.5, update_every=5),
    HalfLifeSchedule(2, update_every=3),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_host_weights_and_decays_match_the_formula(schedule):
    last_step = 5000
    weights, decays = reference(schedule, last_step)
    steps = range(1, last_step + 1)
    np.testing.assert_allclose([schedule.weight(t) for t in steps], weights, rtol=1e-10)
    np.testing.assert_allclose(
        [schedule.decay(t) for t in steps], decays, rtol=1e-10, atol=1e-15
    )


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_compiled_weights_match_the_formula(schedule):
    last_step = 5000
    weights, _ = reference(schedule, last_step)
    # The compiled methods are elementwise: one call evaluates every step.
    actual = compiled(schedule.compiled_weight, all_steps(last_step))
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, weights, rtol=2e-6)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_scalar_compiled_methods_agree_with_the_host(schedule):
    k = schedule.update_every
    for t in [1, k - 1, k, k + 1, 2 * k, 3 * k - 1, 50 * k, 2**31 - 1]:
        if t < 1:
            continue
        weight = compiled(schedule.compiled_weight, np.int32(t))
        assert weight.shape == ()
        assert weight == pytest.approx(schedule.weight(t), rel=2e-6)
        assert bool(compiled(schedule.compiled_is_due, np.int32(t))) == (
            schedule.is_due(t)
        )
        assert bool(compiled(schedule.compiled_copies_all, np.int32(t))) == (
            schedule.copies_all(t)
        )


@pytest.mark.parametrize("schedule", SCHEDULES[::3], ids=repr)
def test_compiled_methods_trace(schedule):
    """No Python branching on the step: the methods run inside the backend's
    compiled functions."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        compile_fn = jax.jit
    elif backend == "tensorflow":
        import tensorflow as tf

        compile_fn = tf.function
    else:
        pytest.skip("torch runs the train step eagerly by default")

    def methods(t):
        return (
            schedule.compiled_is_due(t),
            schedule.compiled_copies_all(t),
            schedule.compiled_weight(t),
        )

    traced = compile_fn(methods)
    for t in range(1, 4 * schedule.update_every + 2):
        due, copies, weight = (
            ops.convert_to_numpy(x) for x in traced(ops.convert_to_tensor(t, "int32"))
        )
        assert bool(due) == schedule.is_due(t)
        assert bool(copies) == schedule.copies_all(t)
        assert weight == pytest.approx(schedule.weight(t), rel=2e-6)


@pytest.mark.parametrize("update_every", [1, 2, 5, 10])
def test_power_function_weight_is_accurate_in_float32_after_millions_of_steps(
    update_every,
):
    schedule = PowerFunctionSchedule(sigma_rel=0.05, update_every=update_every)
    steps = np.array([10**5, 10**6, 10**7], dtype=np.int32)
    n = steps // update_every
    exact = 1.0 - (1.0 - 1.0 / n) ** (schedule.gamma + 1.0)
    actual = compiled(schedule.compiled_weight, steps)
    np.testing.assert_allclose(actual, exact, rtol=2e-6)
    # The naive float32 form is what this guards against: at 1e7 steps it is
    # far off.
    naive = np.float32(1) - (np.float32(1) - np.float32(1) / n.astype(np.float32)) ** (
        np.float32(schedule.gamma + 1.0)
    )
    if update_every == 1:
        assert abs(naive[-1] / exact[-1] - 1) > 0.1


def test_bias_corrected_weight_is_accurate_near_one_after_millions_of_updates():
    beta = 1.0 - 1e-6
    schedule = BiasCorrectedSchedule(beta=beta)
    steps = np.array([2, 10, 10**3, 10**5, 10**6, 10**7, 2**31 - 1], dtype=np.int32)
    exact = np.array([(1.0 - beta) / (1.0 - beta ** int(n)) for n in steps])
    np.testing.assert_allclose(compiled(schedule.compiled_weight, steps), exact, 2e-6)
    np.testing.assert_allclose([schedule.weight(int(t)) for t in steps], exact, 1e-9)
    # Close to 1 the first updates are a running average.
    assert schedule.weight(10) == pytest.approx(1 / 10, rel=1e-5)


# ---------------------------------------------------------------------------
# Properties over random hyperparameters and steps.

update_every = st.integers(1, 100)
steps = st.integers(1, 2**31 - 1)
betas = st.floats(0.0, 1.0, exclude_max=True)
sigma_rels = st.floats(0.0, SIGMA_REL_MAX, exclude_min=True, exclude_max=True)
# The decay `1 - weight` stays below 1 in float64 while the weight is above
# 2**-53: for half-lives up to about 6e15 steps.
half_lives = st.floats(1e-6, 1e15)

schedules = st.one_of(
    st.builds(BiasCorrectedSchedule, beta=betas, update_every=update_every),
    st.builds(
        PowerFunctionSchedule,
        # Below about 5.6e-309 gamma overflows float64 (refused, tested below).
        sigma_rel=sigma_rels.filter(lambda s: s > 1e-300),
        update_every=update_every,
    ),
    st.builds(
        PowerFunctionSchedule,
        gamma=st.floats(1e-12, 1e12),
        update_every=update_every,
    ),
    st.builds(HalfLifeSchedule, half_life=half_lives, update_every=update_every),
)


@settings(max_examples=300, deadline=None)
@given(schedules, steps)
def test_weights_lie_in_zero_one_and_decays_in_zero_one(schedule, t):
    assert 0.0 < schedule.weight(t) <= 1.0
    assert 0.0 <= schedule.decay(t) < 1.0
    assert schedule.decay(t) == (
        0.0 if t < schedule.update_every else 1.0 - schedule.weight(t)
    )
    weight = compiled(schedule.compiled_weight, np.int32(t))
    assert 0.0 < weight <= 1.0


@settings(max_examples=100, deadline=None)
@given(schedules)
def test_the_first_update_copies_and_updates_come_every_update_every_steps(
    schedule,
):
    k = schedule.update_every
    assert schedule.is_due(k) and schedule.copies_all(k)
    assert schedule.weight(k) == 1.0
    assert schedule.decay(k) == 0.0
    assert compiled(schedule.compiled_weight, np.int32(k)) == 1.0
    assert bool(compiled(schedule.compiled_copies_all, np.int32(k)))
    t = all_steps(4 * k)
    due = [schedule.is_due(int(s)) for s in t]
    copies = [schedule.copies_all(int(s)) for s in t]
    assert due == list(t % k == 0)
    assert copies == list(t == k)
    np.testing.assert_array_equal(compiled(schedule.compiled_is_due, t), t % k == 0)
    np.testing.assert_array_equal(compiled(schedule.compiled_copies_all, t), t == k)
    # Between updates the weight and decay are those of the latest update.
    for s in t[k:]:
        latest = int(s) - int(s) % k
        assert schedule.weight(int(s)) == schedule.weight(latest)
        assert schedule.decay(int(s)) == schedule.decay(latest)
    # Before the first update nothing was averaged.
    for s in t[: k - 1]:
        assert schedule.weight(int(s)) == 1.0 and schedule.decay(int(s)) == 0.0


@settings(max_examples=100, deadline=None)
@given(schedules)
def test_config_round_trips(schedule):
    config = schedule.get_config()
    rebuilt = type(schedule).from_config(config)
    assert rebuilt == schedule
    assert rebuilt.get_config() == config


def test_beta_zero_copies_at_every_update():
    schedule = BiasCorrectedSchedule(beta=0.0, update_every=3)
    t = all_steps(30)
    assert [schedule.weight(int(s)) for s in t] == [1.0] * 30
    np.testing.assert_array_equal(compiled(schedule.compiled_weight, t), 1.0)


# ---------------------------------------------------------------------------
# sigma_rel and gamma.


def test_sigma_rel_to_gamma_golden_values():
    assert sigma_rel_to_gamma(0.05) == 16.972198602303447
    assert sigma_rel_to_gamma(0.07) == 11.244939447857924
    assert sigma_rel_to_gamma(0.10) == 6.937203937601809


@settings(max_examples=500, deadline=None)
@given(sigma_rels.filter(lambda s: s >= 1e-308))
def test_sigma_rel_to_gamma_round_trips(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert 0.0 < gamma < math.inf
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-3, 1e12))
def test_gamma_to_sigma_rel_round_trips(gamma):
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(
        gamma, rel=1e-9
    )


@pytest.mark.parametrize("sigma_rel", [1e-6, 0.01, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_to_gamma_matches_a_bisection(sigma_rel):
    assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(
        oracle.sigma_rel_to_gamma_by_bisection(sigma_rel), rel=1e-12
    )


def test_power_function_schedule_keeps_both_and_the_given_one_in_its_config():
    by_width = PowerFunctionSchedule(sigma_rel=0.05, update_every=3)
    assert by_width.gamma == sigma_rel_to_gamma(0.05)
    assert by_width.get_config() == {"sigma_rel": 0.05, "update_every": 3}
    by_gamma = PowerFunctionSchedule(gamma=7.0)
    assert by_gamma.sigma_rel == gamma_to_sigma_rel(7.0)
    assert by_gamma.get_config() == {"gamma": 7.0, "update_every": 1}


# ---------------------------------------------------------------------------
# The half-life's units.


def test_half_life_in_epochs_and_samples_resolves_to_steps():
    epochs = HalfLifeSchedule(2.5, unit="epochs", update_every=4)
    assert epochs.in_steps(steps_per_epoch=100) == HalfLifeSchedule(250.0, "steps", 4)
    samples = HalfLifeSchedule(6400, unit="samples")
    assert samples.in_steps(batch_size=32) == HalfLifeSchedule(200.0)
    steps = HalfLifeSchedule(10)
    assert steps.in_steps() == steps
    # Busbridge et al.'s rule: a k-fold batch raises the decay to its k-th power.
    small, large = samples.in_steps(batch_size=32), samples.in_steps(batch_size=128)
    assert large.decay(10) == pytest.approx(small.decay(10) ** 4, rel=1e-12)


@pytest.mark.parametrize(
    ("unit", "missing", "words"),
    [
        ("epochs", "steps_per_epoch", "number of steps per epoch, which is unknown"),
        ("samples", "batch_size", "needs the batch size, which is unknown"),
    ],
)
def test_half_life_without_the_needed_number_is_refused(unit, missing, words):
    schedule = HalfLifeSchedule(3, unit=unit)
    with pytest.raises(ValueError, match=f"`{missing}` must be given: .*{words}"):
        schedule.in_steps()
    with pytest.raises(ValueError, match=f"Received: {missing}=None"):
        schedule.in_steps(steps_per_epoch=None, batch_size=None)
    with pytest.raises(ValueError, match=f"`{missing}`.*Received: {missing}=0"):
        schedule.in_steps(**{missing: 0})
    with pytest.raises(ValueError, match=f"`{missing}`.*Received: {missing}=2.5"):
        schedule.in_steps(**{missing: 2.5})


@pytest.mark.parametrize("unit", ["epochs", "samples"])
def test_unresolved_half_life_gives_no_weight(unit):
    schedule = HalfLifeSchedule(3, unit=unit, update_every=2)
    for method in (schedule.weight, schedule.decay, schedule.compiled_weight):
        with pytest.raises(ValueError, match=f'`unit` must be "steps".*{unit}'):
            method(4)
    # When it updates does not depend on the half-life.
    assert schedule.is_due(4) and not schedule.is_due(3)
    assert schedule.copies_all(2)


# ---------------------------------------------------------------------------
# Bad arguments.

BAD = [
    (BiasCorrectedSchedule, {"beta": 1.0}, "beta"),
    (BiasCorrectedSchedule, {"beta": 1.5}, "beta"),
    (BiasCorrectedSchedule, {"beta": -0.1}, "beta"),
    (BiasCorrectedSchedule, {"beta": math.nan}, "beta"),
    (BiasCorrectedSchedule, {"beta": math.inf}, "beta"),
    (BiasCorrectedSchedule, {"beta": True}, "beta"),
    (BiasCorrectedSchedule, {"beta": "0.9"}, "beta"),
    (BiasCorrectedSchedule, {"beta": None}, "beta"),
    (BiasCorrectedSchedule, {"update_every": 0}, "update_every"),
    (BiasCorrectedSchedule, {"update_every": 2.0}, "update_every"),
    (BiasCorrectedSchedule, {"update_every": True}, "update_every"),
    (BiasCorrectedSchedule, {"update_every": "1"}, "update_every"),
    (PowerFunctionSchedule, {}, "sigma_rel"),
    (PowerFunctionSchedule, {"sigma_rel": 0.05, "gamma": 7.0}, "sigma_rel"),
    (PowerFunctionSchedule, {"sigma_rel": 0.0}, "sigma_rel"),
    (PowerFunctionSchedule, {"sigma_rel": -0.05}, "sigma_rel"),
    (PowerFunctionSchedule, {"sigma_rel": SIGMA_REL_MAX}, "sigma_rel"),
    (PowerFunctionSchedule, {"sigma_rel": 0.3}, "sigma_rel"),
    (PowerFunctionSchedule, {"sigma_rel": 5e-324}, "sigma_rel"),
    (PowerFunctionSchedule, {"sigma_rel": math.nan}, "sigma_rel"),
    (PowerFunctionSchedule, {"sigma_rel": math.inf}, "sigma_rel"),
    (PowerFunctionSchedule, {"sigma_rel": True}, "sigma_rel"),
    (PowerFunctionSchedule, {"sigma_rel": "0.05"}, "sigma_rel"),
    (PowerFunctionSchedule, {"gamma": 0.0}, "gamma"),
    (PowerFunctionSchedule, {"gamma": -1.0}, "gamma"),
    (PowerFunctionSchedule, {"gamma": math.nan}, "gamma"),
    (PowerFunctionSchedule, {"gamma": math.inf}, "gamma"),
    (PowerFunctionSchedule, {"gamma": True}, "gamma"),
    (PowerFunctionSchedule, {"gamma": "7"}, "gamma"),
    (PowerFunctionSchedule, {"gamma": 7.0, "update_every": 0}, "update_every"),
    (PowerFunctionSchedule, {"gamma": 7.0, "update_every": 1.5}, "update_every"),
    (HalfLifeSchedule, {"half_life": 0}, "half_life"),
    (HalfLifeSchedule, {"half_life": -10.0}, "half_life"),
    (HalfLifeSchedule, {"half_life": math.nan}, "half_life"),
    (HalfLifeSchedule, {"half_life": math.inf}, "half_life"),
    (HalfLifeSchedule, {"half_life": True}, "half_life"),
    (HalfLifeSchedule, {"half_life": "1000ba"}, "half_life"),
    (HalfLifeSchedule, {"half_life": None}, "half_life"),
    (HalfLifeSchedule, {"half_life": 10, "unit": "step"}, "unit"),
    (HalfLifeSchedule, {"half_life": 10, "unit": "Steps"}, "unit"),
    (HalfLifeSchedule, {"half_life": 10, "unit": "batches"}, "unit"),
    (HalfLifeSchedule, {"half_life": 10, "unit": None}, "unit"),
    (HalfLifeSchedule, {"half_life": 10, "unit": 1}, "unit"),
    (HalfLifeSchedule, {"half_life": 10, "update_every": -1}, "update_every"),
    (HalfLifeSchedule, {"half_life": 10, "update_every": False}, "update_every"),
]


@pytest.mark.parametrize(
    "cls", [BiasCorrectedSchedule, PowerFunctionSchedule, HalfLifeSchedule]
)
def test_bad_arguments_are_refused_naming_the_argument(cls):
    cases = [(kwargs, name) for c, kwargs, name in BAD if c is cls]
    assert cases
    for kwargs, name in cases:
        try:
            cls(**kwargs)
        except ValueError as error:
            assert re.search(f"`{name}`.*Received: {name}=", str(error)), kwargs
        else:
            pytest.fail(f"{cls.__name__}(**{kwargs!r}) did not raise")


@pytest.mark.parametrize("kwargs", [{}, {"sigma_rel": 0.05, "gamma": 7.0}])
def test_power_function_schedule_wants_exactly_one_of_sigma_rel_and_gamma(kwargs):
    with pytest.raises(ValueError, match="Exactly one of `sigma_rel` and `gamma`"):
        PowerFunctionSchedule(**kwargs)


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


# ---------------------------------------------------------------------------
# Public API and documentation.


def test_schedules_are_exported():
    for name in [
        "Schedule",
        "BiasCorrectedSchedule",
        "PowerFunctionSchedule",
        "HalfLifeSchedule",
    ]:
        assert name in keras_ema.__all__
        assert issubclass(getattr(keras_ema, name), keras_ema.Schedule)


@pytest.mark.parametrize(
    "cls", [BiasCorrectedSchedule, PowerFunctionSchedule, HalfLifeSchedule]
)
def test_docstring_examples_run(cls):
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(cls, globs={"keras_ema": keras_ema}):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0
