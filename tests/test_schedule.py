"""The warm-up schedule against its closed form, and argument validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_ema
from keras_ema import WarmupSchedule

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


BAD = [
    ("beta", 1.5),
    ("beta", -0.1),
    ("beta", float("nan")),
    ("beta", "0.9"),
    ("power", 0),
    ("power", -1.0),
    ("inv_gamma", 0.0),
    ("inv_gamma", float("inf")),
    ("update_every", 0),
    ("update_every", 2.0),
    ("update_every", True),
    ("update_after_step", -1),
    ("update_after_step", 1.5),
    ("min_value", 1.5),
    ("min_value", -0.5),
    ("param_or_buffer_names_no_ema", "dense/kernel"),
    ("ignore_names", [1, 2]),
    ("ignore_startswith_names", 3),
]


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_hyperparameters_are_refused_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        keras_ema.EMA(**{name: value})


def test_min_value_above_beta_is_refused():
    with pytest.raises(ValueError, match="`min_value`.*min_value=0.9, beta=0.5"):
        keras_ema.EMA(beta=0.5, min_value=0.9)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["beta", "power", "inv_gamma", "min_value"]),
    st.one_of(st.floats(-1e6, -1e-9), st.floats(1.0 + 1e-9, 1e6), st.just(math.nan)),
)
def test_random_invalid_values_always_raise(name, value):
    if name in ("power", "inv_gamma") and value > 0 and not math.isnan(value):
        value = -value
    with pytest.raises(ValueError, match=f"`{name}`"):
        keras_ema.EMA(**{name: value})
