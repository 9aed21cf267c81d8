"""The schedules step by step: the shadows of scalar sequences against the
schedules' defining properties (the zero-started EMA, EDM2's profile, the
half-life, Polyak averaging, BYOL's cosine), tests/oracle.py's
`ScheduledEMA` against the schedules, and the constant and cosine schedules
replayed in `fit` against it."""

from __future__ import annotations

import math

import keras
import numpy as np
import oracle
import pytest
from conftest import assert_bit_equal
from conftest import assert_close
from conftest import ema_values
from conftest import float_weights
from conftest import make_data
from conftest import make_model

import keras_ema
from keras_ema import BiasCorrectedSchedule
from keras_ema import ConstantSchedule
from keras_ema import CosineSchedule
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


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("beta", [0.0, 0.9, 0.995, 1.0])
def test_constant_shadow_is_polyaks_average_of_the_first_copy(beta, k):
    values = np.random.default_rng(3).normal(size=300 * k)
    shadows = replay(ConstantSchedule(beta, update_every=k), values)
    tau = 1.0 - beta
    # The n-th update sees the value of step n * k; the first one is copied.
    for n in (1, 2, 5, 300):
        seen = values[np.arange(1, n + 1) * k - 1]
        mass = tau * beta ** (n - np.arange(1, n + 1))
        mass[0] = beta ** (n - 1)
        assert shadows[n * k - 1] == pytest.approx(mass @ seen, rel=1e-11, abs=1e-12)


@pytest.mark.parametrize(("start", "end"), [(0.996, 1.0), (0.5, 0.9), (0.0, 1.0)])
@pytest.mark.parametrize("k", [1, 3])
def test_cosine_shadow_weighs_each_value_by_byols_momentum(start, end, k):
    big_k = 60 * k
    values = np.random.default_rng(4).normal(size=90 * k)
    shadows = replay(CosineSchedule(start, end, big_k, k), values)
    # BYOL's tau_k at the update after each step t_n = n * k, the first a copy.
    t_n = np.arange(1, 91) * k
    tau = end - (end - start) * (np.cos(np.pi * np.minimum(t_n, big_k) / big_k) + 1) / 2
    lerp = 1.0 - tau
    lerp[0] = 1.0
    for n in (1, 2, 30, 60, 90):
        # The value of update j keeps its own weight, times every later decay.
        mass = [lerp[j] * np.prod(tau[j + 1 : n]) for j in range(n)]
        assert shadows[n * k - 1] == pytest.approx(
            np.dot(mass, values[t_n[:n] - 1]), rel=1e-9, abs=1e-12
        )
    if end == 1.0:
        # From step K on the decay is 1: the teacher stops moving.
        assert (shadows[big_k - 1 :] == shadows[big_k - 1 - k]).all()


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
    (ConstantSchedule(0.99, update_every=2), oracle.constant_rule(0.99)),
    (
        CosineSchedule(0.9, end=0.999, total_steps=500, update_every=3),
        oracle.cosine_rule(0.9, 0.999, 500),
    ),
]


@pytest.mark.parametrize(
    ("schedule", "rule"),
    ORACLE_CASES,
    ids=["bias", "power", "half_life", "constant", "cosine"],
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
# The constant and cosine schedules in `fit` (compiled, Keras' default
# `jit_compile`), step by step against `ScheduledEMA`.


class Replay(keras.callbacks.Callback):
    """Replays every optimizer step into one oracle per profile and compares
    the shadows after each."""

    def __init__(self, ema, oracles: dict):
        super().__init__()
        self.ema = ema
        self.oracles = oracles
        self.checked = 0

    def on_train_batch_end(self, batch, logs=None):
        weights = float_weights(self.model)
        floats = [keras.backend.is_float_dtype(w.dtype) for w in self.model.weights]
        for profile, mirror in self.oracles.items():
            mirror.update(weights)
            assert self.ema.step == mirror.step
            every = zip(self.ema.get_weights(profile), floats, strict=True)
            values = [value for value, is_float in every if is_float]
            assert_close(mirror.ema, dict(zip(weights, values, strict=True)))
        self.checked += 1


MOMENTUM_IN_FIT = {
    "constant": (ConstantSchedule(0.9), oracle.constant_rule(0.9)),
    # K = 20 of the fit's 24 steps: the frozen end is replayed too.
    "cosine": (
        CosineSchedule(0.5, total_steps=20),
        oracle.cosine_rule(0.5, 1.0, 20),
    ),
}


@pytest.mark.parametrize("offload", [False, True], ids=["on_device", "offload"])
@pytest.mark.parametrize("update_every", [1, 3])
@pytest.mark.parametrize("name", sorted(MOMENTUM_IN_FIT))
def test_momentum_schedules_in_fit_match_the_oracle(name, update_every, offload):
    schedule, rule = MOMENTUM_IN_FIT[name]
    schedule = type(schedule).from_config(
        {**schedule.get_config(), "update_every": update_every}
    )
    model = make_model()
    ema = keras_ema.EMA(schedule=schedule, offload_to_host=offload)
    mirror = oracle.ScheduledEMA(float_weights(model), rule, update_every)
    replay = Replay(ema, {None: mirror})
    x, y = make_data(96)
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, callbacks=[ema, replay]
    )
    assert replay.checked == 24
    assert history.history["ema_decay"][-1] == pytest.approx(mirror.decay, rel=1e-6)
    assert ema.get_current_decay() == pytest.approx(mirror.decay, rel=1e-12)


def test_cosine_without_total_steps_spans_the_fit_beside_a_constant_profile():
    # 12 batches of 8 per epoch, 2 epochs: K = 24, the fit's last step.
    model = make_model()
    ema = keras_ema.EMA(
        profiles={
            "teacher": CosineSchedule(0.6, end=0.95),
            "target": ConstantSchedule(1 - 0.2, update_every=2),
        }
    )
    online = float_weights(model)
    mirrors = {
        "teacher": oracle.ScheduledEMA(online, oracle.cosine_rule(0.6, 0.95, 24)),
        "target": oracle.ScheduledEMA(online, oracle.constant_rule(0.8), 2),
    }
    replay = Replay(ema, mirrors)
    x, y = make_data(96)
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, callbacks=[ema, replay]
    )
    assert replay.checked == 24
    assert ema.get_current_decay("teacher") == pytest.approx(0.95, rel=1e-12)
    assert ema.get_current_decay("target") == 0.8
    assert history.history["ema_teacher_decay"][-1] == pytest.approx(0.95)
    # The config keeps the schedule as given, its length left to each fit.
    config = ema.get_config()["profiles"]["teacher"]["config"]
    assert config["total_steps"] is None


def test_cosine_without_total_steps_in_a_fit_of_unknown_length_is_refused():
    model = make_model()
    ema = keras_ema.EMA(schedule=CosineSchedule(0.9))
    ema.set_model(model)
    before = ema_values(ema)
    x, y = make_data(48)

    def batches():
        while True:
            for start in range(0, len(x), 8):
                yield x[start : start + 8], y[start : start + 8]

    def finite():
        yield from ((x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8))

    with pytest.raises(ValueError, match="`steps_per_epoch` must be given.*steps per"):
        model.fit(finite(), epochs=2, shuffle=False, verbose=0, callbacks=[ema])
    assert ema.step == 0
    assert_bit_equal(before, ema_values(ema))
    # Told the steps per epoch, the same EMA spans 2 x 3 steps.
    mirror = oracle.ScheduledEMA(float_weights(model), oracle.cosine_rule(0.9, 1, 6))
    replay = Replay(ema, {None: mirror})
    model.fit(
        batches(),
        steps_per_epoch=3,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[ema, replay],
    )
    assert replay.checked == 6
    assert ema.get_current_decay() == 1.0


@pytest.mark.parametrize("update_every", [1, 3])
def test_cosine_without_total_steps_outside_fit_says_what_is_missing(
    update_every, tmp_path
):
    model = make_model()
    ema = keras_ema.EMA(schedule=CosineSchedule(0.9, update_every=update_every))
    ema.set_model(model)
    before = ema_values(ema)
    with pytest.raises(ValueError, match="`total_steps` must be known"):
        ema.get_current_decay()
    with pytest.raises(ValueError, match="`total_steps` must be known"):
        ema.update()
    assert ema.step == 0
    assert_bit_equal(before, ema_values(ema))
    # Its state file keeps the schedule as given.
    ema.save_state(str(tmp_path / "ema.npz"))
    clone = keras_ema.EMA.from_config(ema.get_config())
    clone.set_model(model)
    clone.load_state(str(tmp_path / "ema.npz"))
    assert_bit_equal(before, ema_values(clone))


@pytest.mark.parametrize("update_every", [1, 3])
@pytest.mark.parametrize("name", sorted(MOMENTUM_IN_FIT))
def test_momentum_schedules_outside_fit_match_the_oracle(name, update_every):
    schedule, rule = MOMENTUM_IN_FIT[name]
    schedule = type(schedule).from_config(
        {**schedule.get_config(), "update_every": update_every}
    )
    model = make_model()
    ema = keras_ema.EMA(schedule=schedule)
    ema.set_model(model)
    mirror = oracle.ScheduledEMA(float_weights(model), rule, update_every)
    rng = np.random.default_rng(5)
    for _ in range(24):
        for weight in model.weights:
            if keras.backend.is_float_dtype(weight.dtype):
                noise = rng.normal(scale=0.1, size=weight.shape).astype("float32")
                weight.assign(keras.ops.convert_to_numpy(weight.value) + noise)
        ema.update()
        mirror.update(float_weights(model))
        assert ema.step == mirror.step
        assert ema.get_current_decay() == pytest.approx(mirror.decay, rel=1e-12)
        assert_close(mirror.ema, ema_values(ema))
