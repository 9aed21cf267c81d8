"""Schedules other than the warm-up, and several profiles in one EMA, against
NumPy transcriptions of their formulas, step by step, inside and outside
`fit`."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import assert_bit_equal
from conftest import assert_close
from conftest import ema_values
from conftest import float_weights
from conftest import make_data
from conftest import make_model
from conftest import numpy_weights
from oracle import ArticleEMA
from oracle import ScheduledEMA
from oracle import bias_corrected_rule
from oracle import half_life_rule
from oracle import power_function_rule
from oracle import sigma_rel_to_gamma_by_bisection

import keras_ema

WARMUP = dict(beta=0.9, update_after_step=2, update_every=1)


def schedule_and_rule(name: str, update_every: int):
    """A schedule and the oracle's independent rule for it."""
    if name == "bias_corrected":
        return (
            keras_ema.BiasCorrectedSchedule(0.8, update_every=update_every),
            bias_corrected_rule(0.8),
        )
    if name == "power_function":
        gamma = sigma_rel_to_gamma_by_bisection(0.1)
        return (
            keras_ema.PowerFunctionSchedule(sigma_rel=0.1, update_every=update_every),
            power_function_rule(gamma),
        )
    return (
        keras_ema.HalfLifeSchedule(3 * update_every, update_every=update_every),
        half_life_rule(3 * update_every),
    )


SCHEDULES = ["bias_corrected", "power_function", "half_life"]


@pytest.fixture(params=[False, True], ids=["on_device", "offload_to_host"])
def offload(request) -> bool:
    return request.param


def filters(model) -> dict:
    paths = [w.path for w in model.weights]
    return dict(
        param_or_buffer_names_no_ema=[next(p for p in paths if "moving_mean" in p)],
        ignore_names=[next(p for p in paths if p.endswith("d1/kernel"))],
    )


def perturb(model, rng) -> None:
    for weight in model.weights:
        if keras.backend.is_float_dtype(weight.dtype):
            noise = rng.normal(scale=0.1, size=weight.shape).astype("float32")
            weight.assign(keras.ops.convert_to_numpy(weight.value) + noise)


def profile_values(ema, model, profile=None) -> dict:
    """A profile's EMA values by path, through the public `get_weights`."""
    return {
        w.path: value
        for w, value in zip(model.weights, ema.get_weights(profile), strict=True)
        if keras.backend.is_float_dtype(w.dtype)
    }


@pytest.mark.parametrize("update_every", [1, 3])
@pytest.mark.parametrize("name", SCHEDULES)
def test_update_outside_fit_matches_the_formula(name, update_every, offload):
    model = make_model()
    extra = filters(model)
    schedule, rule = schedule_and_rule(name, update_every)
    ema = keras_ema.EMA(schedule=schedule, offload_to_host=offload, **extra)
    ema.set_model(model)
    oracle = ScheduledEMA(float_weights(model), rule, update_every, **extra)
    rng = np.random.default_rng(1)
    for _ in range(14):
        perturb(model, rng)
        ema.update()
        oracle.update(float_weights(model))
        assert ema.step == oracle.step
        assert ema.get_current_decay() == pytest.approx(oracle.get_current_decay())
        assert_close(oracle.ema, ema_values(ema))


class Replay(keras.callbacks.Callback):
    """Replays every optimizer step into oracles and compares each time."""

    def __init__(self, ema, oracles: dict):
        super().__init__()
        self.ema = ema
        self.oracles = oracles
        self.checked = 0

    def on_train_batch_end(self, batch, logs=None):
        weights = float_weights(self.model)
        for profile, oracle in self.oracles.items():
            oracle.update(weights)
            assert self.ema.step == oracle.step
            assert_close(oracle.ema, profile_values(self.ema, self.model, profile))
        self.checked += 1


@pytest.mark.parametrize("update_every", [1, 3])
@pytest.mark.parametrize("name", SCHEDULES)
def test_fit_matches_the_formula_step_by_step(name, update_every, offload):
    model = make_model()
    schedule, rule = schedule_and_rule(name, update_every)
    ema = keras_ema.EMA(schedule=schedule, offload_to_host=offload)
    replay = Replay(ema, {None: ScheduledEMA(float_weights(model), rule, update_every)})
    x, y = make_data(96)
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, callbacks=[ema, replay]
    )
    assert replay.checked == 24
    oracle = replay.oracles[None]
    assert history.history["ema_decay"][-1] == pytest.approx(oracle.decay, rel=1e-5)


@pytest.mark.parametrize(
    ("half_life", "unit"), [(0.5, "epochs"), (48, "samples")], ids=["epochs", "samples"]
)
def test_half_life_in_epochs_or_samples_is_converted_with_the_fits_numbers(
    half_life, unit
):
    # 12 batches of 8 per epoch: half an epoch and 48 samples are 6 steps.
    model = make_model()
    ema = keras_ema.EMA(schedule=keras_ema.HalfLifeSchedule(half_life, unit=unit))
    replay = Replay(ema, {None: ScheduledEMA(float_weights(model), half_life_rule(6))})
    x, y = make_data(96)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[ema, replay])
    assert replay.checked == 24
    assert ema.get_current_decay() == pytest.approx(0.5 ** (1 / 6))


def test_half_life_in_epochs_outside_fit_says_what_is_missing():
    model = make_model()
    ema = keras_ema.EMA(schedule=keras_ema.HalfLifeSchedule(2, unit="epochs"))
    ema.set_model(model)
    before = ema_values(ema)
    with pytest.raises(ValueError, match="steps per epoch"):
        ema.update()
    assert_bit_equal(before, ema_values(ema))


def two_profiles(update_every=1):
    gamma = sigma_rel_to_gamma_by_bisection(0.1)
    schedules = {
        "fast": keras_ema.WarmupSchedule(**WARMUP),
        "slow": keras_ema.PowerFunctionSchedule(
            sigma_rel=0.1, update_every=update_every
        ),
    }
    oracles = {
        "fast": lambda online: ArticleEMA(online, **WARMUP),
        "slow": lambda online: ScheduledEMA(
            online, power_function_rule(gamma), update_every
        ),
    }
    return schedules, oracles


@pytest.mark.parametrize("update_every", [1, 2])
def test_each_profile_equals_its_own_oracle_in_fit(offload, update_every):
    model = make_model()
    schedules, oracles = two_profiles(update_every)
    ema = keras_ema.EMA(profiles=schedules, offload_to_host=offload)
    online = float_weights(model)
    replay = Replay(ema, {name: make(online) for name, make in oracles.items()})
    x, y = make_data(96)
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, callbacks=[ema, replay]
    )
    assert replay.checked == 24
    assert {"ema_fast_decay", "ema_slow_decay", "ema_skipped"} <= history.history.keys()
    assert "ema_decay" not in history.history


def test_each_profile_equals_its_own_oracle_outside_fit():
    model = make_model()
    schedules, oracles = two_profiles(update_every=2)
    ema = keras_ema.EMA(profiles=schedules)
    ema.set_model(model)
    online = float_weights(model)
    mirrors = {name: make(online) for name, make in oracles.items()}
    rng = np.random.default_rng(2)
    for _ in range(9):
        perturb(model, rng)
        ema.update()
        for name, oracle in mirrors.items():
            oracle.update(float_weights(model))
            assert_close(oracle.ema, profile_values(ema, model, name))
            assert ema.get_current_decay(name) == pytest.approx(
                oracle.get_current_decay()
            )


def test_each_profiles_validation_equals_evaluate_with_it_swapped_in():
    model = make_model()
    schedules, _ = two_profiles()
    ema = keras_ema.EMA(profiles=schedules)
    seen = {}

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.update(logs)

    x, y = make_data(64)
    xv, yv = make_data(32, seed=1)
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        validation_data=(xv, yv),
        verbose=0,
        callbacks=[Spy(), ema],
    )
    keys = {"val_loss", "val_ema_fast_loss", "val_ema_slow_loss", "val_ema_fast_mae"}
    assert keys <= history.history.keys() and keys <= seen.keys()
    # Evaluated in fit's validation batches (8): the same sums in the same
    # order as fit's validation, so the losses agree to the last bit.
    for name in ("fast", "slow"):
        with ema.swap_weights(profile=name):
            swapped = model.evaluate(xv, yv, batch_size=8, verbose=0, return_dict=True)
        assert swapped["loss"] == history.history[f"val_ema_{name}_loss"][-1]
    first = model.evaluate(
        xv, yv, batch_size=8, verbose=0, return_dict=True, callbacks=[ema]
    )
    assert first["loss"] == history.history["val_ema_fast_loss"][-1]


def test_online_weights_survive_profiles_bit_for_bit():
    model = make_model()
    schedules, _ = two_profiles()
    ema = keras_ema.EMA(profiles=schedules)
    x, y = make_data(64)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    online = numpy_weights(model)
    for name in ("fast", "slow", None):
        with ema.swap_weights(name):
            pass
        model.predict(x, verbose=0, callbacks=[ema])
    with pytest.raises(RuntimeError), ema.swap_weights("slow"):
        raise RuntimeError("boom")
    assert_bit_equal(online, numpy_weights(model))


def test_another_profile_inside_a_swap_is_refused():
    model = make_model()
    schedules, _ = two_profiles()
    ema = keras_ema.EMA(profiles=schedules)
    ema.set_model(model)
    with ema.swap_weights("fast"):
        with ema.swap_weights("fast"):
            pass
        with (
            pytest.raises(ValueError, match="profile 'slow'"),
            ema.swap_weights("slow"),
        ):
            pass


@pytest.mark.parametrize("method", ["get_weights", "swap_weights", "decay"])
def test_unknown_profile_is_a_value_error_naming_it(method):
    model = make_model()
    schedules, _ = two_profiles()
    ema = keras_ema.EMA(profiles=schedules)
    ema.set_model(model)
    online = numpy_weights(model)
    with pytest.raises(ValueError, match="Received: profile='medium'"):
        if method == "get_weights":
            ema.get_weights(profile="medium")
        elif method == "decay":
            ema.get_current_decay("medium")
        else:
            with ema.swap_weights(profile="medium"):
                pass
    assert_bit_equal(online, numpy_weights(model))
    with pytest.raises(ValueError, match="`profile`"):
        keras_ema.EMAModelCheckpoint(ema, "m.keras", profile="medium")


def test_state_round_trip_with_profiles_then_both_go_on_identically(tmp_path):
    x, y = make_data(48)
    model = make_model()
    schedules, _ = two_profiles()
    ema = keras_ema.EMA(profiles=schedules)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    path = str(tmp_path / "ema.npz")
    ema.save_state(path)
    twin = make_model()
    twin.set_weights(model.get_weights())
    twin_ema = keras_ema.EMA(profiles=schedules)
    twin_ema.set_model(twin)
    twin_ema.load_state(path)
    for name in ("fast", "slow"):
        for a, b in zip(ema.get_weights(name), twin_ema.get_weights(name), strict=True):
            np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(3)
    for _ in range(5):
        perturb(model, rng)
        twin.set_weights(model.get_weights())
        ema.update()
        twin_ema.update()
    assert ema.step == twin_ema.step == 11
    for name in ("fast", "slow"):
        for a, b in zip(ema.get_weights(name), twin_ema.get_weights(name), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "other",
    [
        {"fast": keras_ema.WarmupSchedule(**WARMUP)},
        {
            "slow": keras_ema.WarmupSchedule(**WARMUP),
            "fast": keras_ema.WarmupSchedule(),
        },
        None,
    ],
    ids=["fewer", "reordered", "none"],
)
def test_state_file_of_other_profiles_is_refused_naming_them(tmp_path, other):
    model = make_model()
    schedules, _ = two_profiles()
    ema = keras_ema.EMA(profiles=schedules)
    model.fit(*make_data(16), batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    path = str(tmp_path / "ema.npz")
    ema.save_state(path)
    fresh = keras_ema.EMA(profiles=other) if other else keras_ema.EMA()
    fresh.set_model(model)
    before = ema_values(fresh)
    with pytest.raises(ValueError, match=r"profiles \['fast', 'slow'\]"):
        fresh.load_state(path)
    assert_bit_equal(before, ema_values(fresh))
    assert fresh.step == 0


def test_ema_model_checkpoint_saves_the_chosen_profile(tmp_path):
    model = make_model()
    schedules, _ = two_profiles()
    ema = keras_ema.EMA(profiles=schedules)
    path = str(tmp_path / "slow.weights.h5")
    checkpoint = keras_ema.EMAModelCheckpoint(
        ema, path, profile="slow", save_weights_only=True
    )
    model.fit(
        *make_data(32), batch_size=8, epochs=1, verbose=0, callbacks=[ema, checkpoint]
    )
    saved = make_model()
    saved.load_weights(path)
    for a, b in zip(saved.get_weights(), ema.get_weights("slow"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_one_nan_weight_skips_every_profile():
    model = make_model()
    schedules, _ = two_profiles()
    ema = keras_ema.EMA(profiles=schedules)
    ema.set_model(model)
    ema.update()
    before = {name: ema.get_weights(name) for name in ("fast", "slow")}
    kernel = model.weights[0]
    poisoned = keras.ops.convert_to_numpy(kernel.value).copy()
    poisoned[0, 0] = np.nan
    kernel.assign(poisoned)
    ema.update()
    assert ema.skipped_updates == 1
    for name, weights in before.items():
        for a, b in zip(weights, ema.get_weights(name), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(schedule=keras_ema.BiasCorrectedSchedule(0.9)),
        dict(profiles={"a": keras_ema.PowerFunctionSchedule(gamma=7.0)}),
        dict(schedule=keras_ema.HalfLifeSchedule(2, unit="epochs")),
    ],
    ids=["schedule", "profiles", "half_life"],
)
def test_get_config_round_trip(kwargs):
    ema = keras_ema.EMA(**kwargs, ignore_names=["a/b"], validate="ema")
    clone = keras_ema.EMA.from_config(ema.get_config())
    assert clone.get_config() == ema.get_config()
    assert clone.profile_names == ema.profile_names


BAD_ARGUMENTS = [
    (dict(schedule=keras_ema.BiasCorrectedSchedule(0.9), beta=0.5), "`beta`"),
    (
        dict(schedule=keras_ema.BiasCorrectedSchedule(0.9), update_every=3),
        "`update_every`",
    ),
    (
        dict(
            schedule=keras_ema.BiasCorrectedSchedule(0.9),
            profiles={"a": keras_ema.WarmupSchedule()},
        ),
        "not both",
    ),
    (dict(schedule=0.999), "`schedule` must be a schedule"),
    (dict(profiles={}), "`profiles` must be a non-empty dict"),
    (dict(profiles=[keras_ema.WarmupSchedule()]), "`profiles` must be a non-empty"),
    (dict(profiles={"": keras_ema.WarmupSchedule()}), "identifiers"),
    (dict(profiles={"two words": keras_ema.WarmupSchedule()}), "identifiers"),
    (dict(profiles={"a": 0.999}), r"profiles\['a'\]=0.999"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_bad_schedule_or_profiles_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_ema.EMA(**kwargs)
