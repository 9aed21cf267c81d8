"""The schedules' arguments: the half-life's units, the cosine's length from
a `fit`, and bad arguments refused naming the argument, the schedules' and
EMA's."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_ema
from keras_ema import BiasCorrectedSchedule
from keras_ema import ConstantSchedule
from keras_ema import CosineSchedule
from keras_ema import HalfLifeSchedule
from keras_ema import PowerFunctionSchedule
from keras_ema import WarmupSchedule
from keras_ema.schedule import SIGMA_REL_MAX

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
# The cosine's length: `total_steps`, or the epochs times steps of a `fit`.


def test_cosine_without_total_steps_spans_the_fits_steps():
    schedule = CosineSchedule(0.99, end=0.999, update_every=3)
    resolved = schedule.in_steps(steps_per_epoch=12, batch_size=8, epochs=5)
    assert resolved == CosineSchedule(0.99, 0.999, 60, 3)
    assert schedule.total_steps is None  # Frozen: a new schedule is returned.
    # A schedule given its length keeps it, whatever the fit.
    given = CosineSchedule(0.99, total_steps=7)
    assert given.in_steps(steps_per_epoch=12, epochs=5) is given
    assert given.in_steps() is given


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({"epochs": 3}, "steps_per_epoch"),
        ({"steps_per_epoch": 10}, "epochs"),
        ({}, "steps_per_epoch"),
    ],
)
def test_cosine_without_the_fits_numbers_is_refused(given, missing):
    schedule = CosineSchedule(0.99)
    with pytest.raises(
        ValueError,
        match=f"`{missing}` must be given: a cosine schedule without "
        f"`total_steps` spans the `fit`.*steps per epoch.*Received: {missing}=None",
    ):
        schedule.in_steps(**given)
    with pytest.raises(ValueError, match=f"`{missing}`.*Received: {missing}=0"):
        schedule.in_steps(**{"steps_per_epoch": 10, "epochs": 3, missing: 0})
    with pytest.raises(ValueError, match=f"`{missing}`.*Received: {missing}=2.5"):
        schedule.in_steps(**{"steps_per_epoch": 10, "epochs": 3, missing: 2.5})


def test_unresolved_cosine_gives_no_weight():
    schedule = CosineSchedule(0.99, update_every=2)
    for method in (schedule.weight, schedule.decay, schedule.compiled_weight):
        with pytest.raises(ValueError, match="`total_steps` must be known.*None"):
            method(4)
    # When it updates does not depend on its length.
    assert schedule.is_due(4) and not schedule.is_due(3)
    assert schedule.copies_all(2)


@pytest.mark.parametrize(
    "schedule",
    [
        WarmupSchedule(),
        BiasCorrectedSchedule(0.9),
        PowerFunctionSchedule(gamma=7.0),
        HalfLifeSchedule(10),
        ConstantSchedule(0.9),
        CosineSchedule(0.9, total_steps=100),
    ],
    ids=repr,
)
def test_every_schedule_takes_the_fits_epochs(schedule):
    assert schedule.in_steps(steps_per_epoch=3, batch_size=4, epochs=5) == schedule
    assert schedule.in_steps(None, None, epochs=None) == schedule


# ---------------------------------------------------------------------------
# Bad arguments.

BAD_SCHEDULE_ARGUMENTS = [
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
    (ConstantSchedule, {"beta": 1.5}, "beta"),
    (ConstantSchedule, {"beta": -0.1}, "beta"),
    (ConstantSchedule, {"beta": math.nextafter(1.0, 2.0)}, "beta"),
    (ConstantSchedule, {"beta": math.nan}, "beta"),
    (ConstantSchedule, {"beta": math.inf}, "beta"),
    (ConstantSchedule, {"beta": True}, "beta"),
    (ConstantSchedule, {"beta": "0.99"}, "beta"),
    (ConstantSchedule, {"beta": None}, "beta"),
    (ConstantSchedule, {"beta": 0.99, "update_every": 0}, "update_every"),
    (ConstantSchedule, {"beta": 0.99, "update_every": 2.0}, "update_every"),
    (ConstantSchedule, {"beta": 0.99, "update_every": True}, "update_every"),
    (CosineSchedule, {"start": -0.1}, "start"),
    (CosineSchedule, {"start": 1.5}, "start"),
    (CosineSchedule, {"start": math.nan}, "start"),
    (CosineSchedule, {"start": True}, "start"),
    (CosineSchedule, {"start": "0.996"}, "start"),
    (CosineSchedule, {"start": None}, "start"),
    (CosineSchedule, {"start": 0.9, "end": 0.5}, "start"),
    (CosineSchedule, {"start": 0.9, "end": 1.5}, "end"),
    (CosineSchedule, {"start": 0.9, "end": math.nan}, "end"),
    (CosineSchedule, {"start": 0.9, "end": None}, "end"),
    (CosineSchedule, {"start": 0.9, "total_steps": 0}, "total_steps"),
    (CosineSchedule, {"start": 0.9, "total_steps": -5}, "total_steps"),
    (CosineSchedule, {"start": 0.9, "total_steps": 100.0}, "total_steps"),
    (CosineSchedule, {"start": 0.9, "total_steps": True}, "total_steps"),
    (CosineSchedule, {"start": 0.9, "total_steps": 2**31}, "total_steps"),
    (CosineSchedule, {"start": 0.9, "total_steps": "1000"}, "total_steps"),
    (CosineSchedule, {"start": 0.9, "update_every": 0}, "update_every"),
    (CosineSchedule, {"start": 0.9, "update_every": 1.5}, "update_every"),
]


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
def test_bad_arguments_are_refused_naming_the_argument(cls):
    cases = [(kwargs, name) for c, kwargs, name in BAD_SCHEDULE_ARGUMENTS if c is cls]
    assert cases
    for kwargs, name in cases:
        try:
            cls(**kwargs)
        except ValueError as error:
            assert re.search(f"`{name}`.*Received: {name}=", str(error)), kwargs
        else:
            pytest.fail(f"{cls.__name__}(**{kwargs!r}) did not raise")


def test_cosine_start_above_end_is_refused():
    with pytest.raises(
        ValueError, match="`start` must not exceed `end`.*start=0.9, end=0.5"
    ):
        CosineSchedule(0.9, end=0.5)
    assert CosineSchedule(0.9, 0.9, total_steps=3).decay(5) == 0.9  # Constant.


@pytest.mark.parametrize("kwargs", [{}, {"sigma_rel": 0.05, "gamma": 7.0}])
def test_power_function_schedule_wants_exactly_one_of_sigma_rel_and_gamma(kwargs):
    with pytest.raises(ValueError, match="Exactly one of `sigma_rel` and `gamma`"):
        PowerFunctionSchedule(**kwargs)


# ---------------------------------------------------------------------------
# EMA's hyperparameters (those of the warm-up schedule and what to average).

BAD_HYPERPARAMETERS = [
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


@pytest.mark.parametrize(("name", "value"), BAD_HYPERPARAMETERS)
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
