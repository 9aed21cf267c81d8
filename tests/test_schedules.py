"""Every schedule against its formula: the bias-corrected, power-function,
half-life, constant, cosine and warm-up schedules' host and compiled weights
against NumPy transcriptions of their formulas, their properties over random
arguments, sigma_rel and gamma, and their public API."""

from __future__ import annotations

import doctest
import math

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
from keras_ema import ConstantSchedule
from keras_ema import CosineSchedule
from keras_ema import HalfLifeSchedule
from keras_ema import PowerFunctionSchedule
from keras_ema import WarmupSchedule
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
# The momentum schedules: Polyak's constant decay and BYOL's cosine.


def momentum_decays(schedule, t_n):
    """The decay of the update after each step `t_n`, from the sources'
    formulas: a constant `beta`, or BYOL's
    `end - (end - start) * (cos(pi * min(t, K) / K) + 1) / 2`."""
    if isinstance(schedule, ConstantSchedule):
        return np.full(len(t_n), schedule.beta)
    k, big_k = np.minimum(t_n, schedule.total_steps), schedule.total_steps
    start, end = schedule.start, schedule.end
    return end - (end - start) * (np.cos(np.pi * k / big_k) + 1.0) / 2.0


def momentum_reference(schedule, last_step):
    """The weight and the decay the schedule should give at steps `1..T`:
    the first update copies (weight 1, decay 0), each later one has its
    formula's decay, held until the next update."""
    k = schedule.update_every
    t_n, _ = update_times(k, last_step)
    decays = momentum_decays(schedule, t_n.astype(np.float64))
    decays[0] = 0.0
    weights = weights_per_step(1.0 - decays, t_n, last_step)
    made = np.arange(1, last_step + 1) >= k
    return weights, np.where(made, 1.0 - weights, 0.0)


MOMENTUM_SCHEDULES = [
    ConstantSchedule(0.999),
    ConstantSchedule(0.9, update_every=3),
    ConstantSchedule(1.0, update_every=2),
    ConstantSchedule(0.0),
    CosineSchedule(0.996, total_steps=3000),
    CosineSchedule(0.99, end=0.9995, total_steps=1000, update_every=4),
    CosineSchedule(0.5, total_steps=4999, update_every=7),
    CosineSchedule(0.0, end=0.0, total_steps=10),
    CosineSchedule(0.9, end=0.9, total_steps=1, update_every=2),
]


@pytest.mark.parametrize("schedule", MOMENTUM_SCHEDULES, ids=repr)
def test_momentum_host_weights_and_decays_match_the_formula(schedule):
    last_step = 5000
    weights, decays = momentum_reference(schedule, last_step)
    steps = range(1, last_step + 1)
    np.testing.assert_allclose(
        [schedule.decay(t) for t in steps], decays, rtol=1e-12, atol=1e-15
    )
    # The transcription's weight `1 - decay` is exact to 1e-16 only, not
    # relatively: close to the cosine's end the weight is ~1e-9.
    np.testing.assert_allclose(
        [schedule.weight(t) for t in steps], weights, rtol=1e-10, atol=1e-15
    )


@pytest.mark.parametrize("schedule", MOMENTUM_SCHEDULES, ids=repr)
def test_momentum_compiled_weights_match_the_formula(schedule):
    last_step = 5000
    weights, _ = momentum_reference(schedule, last_step)
    actual = compiled(schedule.compiled_weight, all_steps(last_step))
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, weights, rtol=2e-6)


@pytest.mark.parametrize("schedule", MOMENTUM_SCHEDULES[::2], ids=repr)
def test_momentum_scalar_compiled_methods_agree_with_the_host(schedule):
    test_scalar_compiled_methods_agree_with_the_host(schedule)


@pytest.mark.parametrize("schedule", MOMENTUM_SCHEDULES[1::3], ids=repr)
def test_momentum_compiled_methods_trace(schedule):
    test_compiled_methods_trace(schedule)


def test_cosine_weight_is_accurate_in_float32_close_to_its_end():
    big_k = 10**7
    schedule = CosineSchedule(0.996, total_steps=big_k)
    steps = np.array([big_k - 10**4, big_k - 100, big_k - 1], dtype=np.int32)
    # (1 + cos(pi (K - r) / K)) / 2 = sin(pi r / (2 K)) ** 2, r the steps left.
    exact = 0.004 * np.sin(np.pi * (big_k - steps) / (2 * big_k)) ** 2
    np.testing.assert_allclose(compiled(schedule.compiled_weight, steps), exact, 2e-6)
    # The formula as written, in float32, is what this guards against: a
    # step before the end its weight is far off.
    cosine = np.cos(np.float32(np.pi) * steps.astype(np.float32) / np.float32(big_k))
    naive = np.float32(0.004) * (cosine + np.float32(1)) / np.float32(2)
    assert abs(naive[-1] / exact[-1] - 1) > 0.1


def test_cosine_rises_from_start_to_end_and_holds():
    schedule = CosineSchedule(0.9, end=0.999, total_steps=100, update_every=2)
    decays = [schedule.decay(t) for t in range(4, 201)]
    assert decays == sorted(decays)
    assert schedule.decay(4) == pytest.approx(0.9, abs=1e-3)
    assert schedule.decay(100) == schedule.decay(200) == pytest.approx(0.999)
    # BYOL's end: the teacher stops moving.
    frozen = CosineSchedule(0.996, total_steps=50)
    assert frozen.weight(50) == frozen.weight(10**6) == 0.0
    assert compiled(frozen.compiled_weight, np.int32(2**31 - 1)) == 0.0


def test_constant_decay_is_beta_itself():
    for beta in [0.999, 0.99, 1 - 0.005, 0.123456789, 1 - 2.0**-40]:
        schedule = ConstantSchedule(beta, update_every=2)
        assert [schedule.decay(t) for t in range(1, 8)] == [0.0] * 3 + [beta] * 4
        assert schedule.weight(4) == 1.0 - beta


# ---------------------------------------------------------------------------
# Properties over random hyperparameters and steps.

MAX_UPDATE_EVERY = 100
update_every = st.integers(1, MAX_UPDATE_EVERY)
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

unit_interval = st.floats(0.0, 1.0)
total_steps = st.integers(1, 2**31 - 1)
momentum_schedules = st.one_of(
    st.builds(ConstantSchedule, beta=unit_interval, update_every=update_every),
    st.tuples(unit_interval, unit_interval).flatmap(
        lambda ends: st.builds(
            CosineSchedule,
            start=st.just(min(ends)),
            end=st.just(max(ends)),
            total_steps=total_steps,
            update_every=update_every,
        )
    ),
)


@settings(max_examples=300, deadline=None)
@given(momentum_schedules, steps)
def test_momentum_weights_and_decays_lie_in_zero_one(schedule, t):
    # A decay of 1 (weight 0) keeps the shadow: BYOL's end, or `beta=1`.
    assert 0.0 <= schedule.weight(t) <= 1.0
    assert 0.0 <= schedule.decay(t) <= 1.0
    if isinstance(schedule, CosineSchedule):
        assert schedule.decay(t) == (
            0.0 if t < schedule.update_every else 1.0 - schedule.weight(t)
        )
        lowest, highest = schedule.start, schedule.end
    else:
        lowest = highest = schedule.beta
    if t >= 2 * schedule.update_every:
        assert lowest - 1e-15 <= schedule.decay(t) <= highest + 1e-15
    weight = compiled(schedule.compiled_weight, np.int32(t))
    assert 0.0 <= weight <= 1.0
    assert weight == pytest.approx(schedule.weight(t), rel=2e-6, abs=1e-12)


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
@given(st.one_of(schedules, momentum_schedules))
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
    # The compiled methods over the same steps in every example (on JAX each
    # new shape compiles anew): steps 1 to 400, four updates or more of any
    # period.
    every = all_steps(4 * MAX_UPDATE_EVERY)
    np.testing.assert_array_equal(
        compiled(schedule.compiled_is_due, every), every % k == 0
    )
    np.testing.assert_array_equal(
        compiled(schedule.compiled_copies_all, every), every == k
    )
    # Between updates the weight and decay are those of the latest update.
    for s in t[k:]:
        latest = int(s) - int(s) % k
        assert schedule.weight(int(s)) == schedule.weight(latest)
        assert schedule.decay(int(s)) == schedule.decay(latest)
    # Before the first update nothing was averaged.
    for s in t[: k - 1]:
        assert schedule.weight(int(s)) == 1.0 and schedule.decay(int(s)) == 0.0


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(
        schedules,
        momentum_schedules,
        st.builds(CosineSchedule, start=unit_interval, update_every=update_every),
    )
)
def test_config_round_trips(schedule):
    config = schedule.get_config()
    rebuilt = type(schedule).from_config(config)
    assert rebuilt == schedule
    assert rebuilt.get_config() == config
    serialized = keras_ema.schedule.serialize(schedule)
    assert serialized["class_name"] == type(schedule).__name__
    assert keras_ema.schedule.deserialize(serialized) == schedule


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
# The warm-up schedule (EMA's default) against its closed form.

valid = st.fixed_dictionaries(
    {
        "beta": st.floats(0.0, 1.0),
        "update_after_step": st.integers(0, 1000),
        "update_every": st.integers(1, 50),
        "inv_gamma": st.floats(1e-3, 1e3),
        "power": st.floats(1e-3, 10.0),
    }
).flatmap(lambda hp: st.floats(0.0, hp["beta"]).map(lambda m: {**hp, "min_value": m}))


def closed_form(step, beta, update_after_step, inv_gamma, power, min_value, **_):
    e = step - update_after_step - 1
    if e <= 0:
        return 0.0
    return min(max(1 - (1 + e / inv_gamma) ** -power, min_value), beta)


@settings(max_examples=200, deadline=None)
@given(valid, st.integers(0, 10**7))
def test_decay_matches_closed_form(hp, step):
    assert WarmupSchedule(**hp).decay(step) == pytest.approx(closed_form(step, **hp))


@settings(max_examples=50, deadline=None)
@given(valid, st.integers(0, 10**6))
def test_compiled_weight_matches_decay(hp, step):
    schedule = WarmupSchedule(**hp)
    weight = float(ops.convert_to_numpy(schedule.compiled_weight(np.int32(step))))
    assert weight == pytest.approx(1 - schedule.decay(step), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    ("power", "step", "decay"),
    [(2 / 3, 31_623, 0.999), (2 / 3, 1_000_001, 0.9999), (3 / 4, 10_001, 0.999)],
)
def test_documented_milestones(power, step, decay):
    schedule = WarmupSchedule(beta=1.0, update_after_step=0, power=power)
    assert schedule.decay(step) == pytest.approx(decay, rel=2e-4)


def test_power_one_is_a_running_average():
    schedule = WarmupSchedule(beta=1.0, update_after_step=0, power=1.0)
    # The counter is already advanced: the n-th sample gets weight 1/n.
    for n in range(2, 20):
        assert schedule.decay(n) == pytest.approx(1 - 1 / n)


@settings(max_examples=100, deadline=None)
@given(valid)
def test_valid_hyperparameters_never_raise(hp):
    keras_ema.EMA(**hp)


# ---------------------------------------------------------------------------
# Public API and documentation.


def test_schedules_are_exported():
    for name in [
        "Schedule",
        "BiasCorrectedSchedule",
        "PowerFunctionSchedule",
        "HalfLifeSchedule",
        "ConstantSchedule",
        "CosineSchedule",
    ]:
        assert name in keras_ema.__all__
        assert issubclass(getattr(keras_ema, name), keras_ema.Schedule)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(schedule=ConstantSchedule(0.995, update_every=2)),
        dict(schedule=CosineSchedule(0.996)),
        dict(
            profiles={
                "teacher": CosineSchedule(0.99, end=0.999, total_steps=500),
                "target": ConstantSchedule(1 - 0.005),
            }
        ),
    ],
    ids=["constant", "cosine", "profiles"],
)
def test_momentum_schedules_round_trip_through_the_callbacks_config(kwargs):
    ema = keras_ema.EMA(**kwargs)
    config = ema.get_config()
    clone = keras_ema.EMA.from_config(config)
    assert clone.get_config() == config
    assert clone._profiles == ema._profiles


@pytest.mark.parametrize(
    "cls",
    [
        BiasCorrectedSchedule,
        PowerFunctionSchedule,
        HalfLifeSchedule,
        ConstantSchedule,
        CosineSchedule,
    ],
)
def test_docstring_examples_run(cls):
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(cls, globs={"keras_ema": keras_ema}):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0
