"""Mistakes Keras users are likely to make, caught early with a clear message,
and the option to validate the EMA weights alone."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import make_data
from conftest import make_model

import keras_ema

HP = dict(beta=0.9, update_after_step=0, update_every=1)


def fit(model, callbacks, validation=True, epochs=1, **kwargs):
    x, y = make_data(32)
    if validation:
        kwargs["validation_data"] = make_data(16, seed=1)
    return model.fit(
        x, y, batch_size=8, epochs=epochs, verbose=0, callbacks=callbacks, **kwargs
    )


def messages(records) -> list[str]:
    return [str(record.message) for record in records]


def test_builtin_use_ema_together_with_the_callback_warns():
    model = make_model(optimizer=keras.optimizers.SGD(0.05, use_ema=True))
    with pytest.warns(UserWarning, match="use_ema=True"):
        fit(model, [keras_ema.EMA(**HP)], validation=False)


def test_plain_model_checkpoint_monitoring_val_ema_warns_once(tmp_path):
    model = make_model()
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "m.keras"), monitor="val_ema_loss", mode="min"
    )
    ema = keras_ema.EMA(**HP)
    with pytest.warns(UserWarning, match="EMAModelCheckpoint") as records:
        fit(model, [ema, checkpoint], epochs=2)
    ours = [r for r in records if "EMAModelCheckpoint" in str(r.message)]
    assert len(ours) == 1
    # It points at the user's `fit(...)` line, not into Keras' trainer.
    assert ours[0].filename == __file__, ours[0].filename


def test_plain_model_checkpoint_saving_weights_only_does_not_warn(tmp_path):
    # `save_weights` writes the EMA state beside the weights (`.ema.npz`).
    model = make_model()
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "m.weights.h5"),
        monitor="val_ema_loss",
        mode="min",
        save_weights_only=True,
    )
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(model, [keras_ema.EMA(**HP), checkpoint])
    assert not [m for m in messages(records) if "EMAModelCheckpoint" in m]
    assert (tmp_path / "m.weights.h5.ema.npz").exists()


def test_ema_model_checkpoint_monitoring_val_ema_does_not_warn(tmp_path):
    model = make_model()
    ema = keras_ema.EMA(**HP)
    checkpoint = keras_ema.EMAModelCheckpoint(
        ema, str(tmp_path / "m.keras"), monitor="val_ema_loss", mode="min"
    )
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(model, [ema, checkpoint])
    assert not [m for m in messages(records) if "EMAModelCheckpoint" in m]


@pytest.mark.parametrize("ema_first", [True, False])
def test_val_ema_monitored_without_validation_data_warns(ema_first):
    model = make_model()
    ema = keras_ema.EMA(**HP)
    stopper = keras.callbacks.EarlyStopping(monitor="val_ema_loss", mode="min")
    callbacks = [ema, stopper] if ema_first else [stopper, ema]
    with pytest.warns(UserWarning, match="validation_data") as records:
        fit(model, callbacks, validation=False, epochs=2)
    ours = [m for m in messages(records) if "runs no validation" in m]
    assert len(ours) == 1, ours


def test_val_ema_monitored_with_validation_split_does_not_warn():
    model = make_model()
    stopper = keras.callbacks.EarlyStopping(monitor="val_ema_loss", mode="min")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(model, [keras_ema.EMA(**HP), stopper], False, validation_split=0.25)
    assert not [m for m in messages(records) if "validation_data" in m]


def test_an_ema_that_never_averaged_warns_at_the_end_of_fit():
    model = make_model()
    ema = keras_ema.EMA()  # the article's defaults: copies for 100 steps
    with pytest.warns(UserWarning, match="update_after_step") as records:
        fit(model, [ema], validation=False)  # 4 steps
    assert ema.step == 4
    ours = [r for r in records if "has not averaged" in str(r.message)]
    assert [r.filename for r in ours] == [__file__]


@pytest.mark.parametrize(
    ("update_every", "advice"),
    [(1, "train for at least 3 optimizer steps"), (3, "smaller `update_every`")],
)
def test_never_averaged_without_warm_up_does_not_say_lower_it(update_every, advice):
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=update_every)
    x, y = make_data(8)
    with pytest.warns(UserWarning, match="has not averaged") as records:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    (message,) = [m for m in messages(records) if "has not averaged" in m]
    assert "lower `update_after_step`" not in message, message
    assert advice in message, message


def test_an_ema_that_averaged_does_not_warn():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=1, update_every=1)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(model, [ema], validation=False)
    assert not [m for m in messages(records) if "update_after_step" in m]


@pytest.mark.parametrize(("steps", "averaged"), [(3, False), (4, True)])
def test_never_averaged_is_exactly_the_first_averaging_update(steps, averaged):
    # update_after_step=1, update_every=1: step counts 0 and 1 copy (warm-up),
    # 2 copies (the first after the warm-up), 3 is the first average.
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=1, update_every=1)
    x, y = make_data(8 * steps)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    warned = any("update_after_step" in m for m in messages(records))
    assert warned is not averaged


def test_validate_ema_logs_only_the_ema_metrics():
    model = make_model()
    ema = keras_ema.EMA(**HP, validate="ema")
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(dict(logs))

    history = fit(model, [ema, Spy()], epochs=2)
    assert {"val_ema_loss", "val_ema_mae"} <= history.history.keys()
    assert not {"val_loss", "val_mae"} & history.history.keys()
    assert all("val_ema_loss" in logs and "val_loss" not in logs for logs in seen)
    xv, yv = make_data(16, seed=1)
    with_ema = model.evaluate(xv, yv, verbose=0, return_dict=True, callbacks=[ema])
    np.testing.assert_allclose(
        history.history["val_ema_loss"][-1], with_ema["loss"], rtol=1e-5
    )


def test_validate_ema_evaluates_once_per_epoch():
    model = make_model()
    ema = keras_ema.EMA(**HP, validate="ema")
    calls = []

    class CountTests(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            calls.append(1)

    keras_make_test_function = model.make_test_function
    built = []

    def make_test_function(*args, **kwargs):
        built.append(1)
        return keras_make_test_function(*args, **kwargs)

    model.make_test_function = make_test_function
    fit(model, [ema, CountTests()], epochs=3)
    assert len(calls) == 3
    assert len(built) == 3


@pytest.mark.parametrize("value", ["online", "", None, 1, "EMA"])
def test_validate_must_be_both_or_ema(value):
    with pytest.raises(ValueError, match="`validate`.*Received: validate="):
        keras_ema.EMA(validate=value)


def test_validate_is_in_the_config():
    ema = keras_ema.EMA(validate="ema")
    assert ema.get_config()["validate"] == "ema"
    assert keras_ema.EMA.from_config(ema.get_config()).validate == "ema"


def test_two_ema_callbacks_in_one_fit_are_refused_before_any_step():
    model = make_model()
    online = {w.path: keras.ops.convert_to_numpy(w.value).copy() for w in model.weights}
    first, second = keras_ema.EMA(**HP), keras_ema.EMA(**HP, ignore_names=())
    with pytest.raises(ValueError, match="profiles"):
        fit(model, [first, second], validation=False)
    for w in model.weights:
        np.testing.assert_array_equal(
            online[w.path], keras.ops.convert_to_numpy(w.value)
        )
    # Each alone still trains.
    fit(model, [first], validation=False)
    assert first.step == 4


@pytest.mark.parametrize(
    ("schedule", "advice"),
    [
        (
            keras_ema.HalfLifeSchedule(2, unit="epochs"),
            "HalfLifeSchedule(2 * steps_per_epoch)",
        ),
        (
            keras_ema.HalfLifeSchedule(256, unit="samples"),
            "HalfLifeSchedule(256 / batch_size)",
        ),
        (keras_ema.CosineSchedule(0.99), "total_steps="),
    ],
)
def test_update_outside_fit_with_a_length_only_fit_knows_says_what_to_give(
    schedule, advice
):
    model = make_model()
    ema = keras_ema.EMA(schedule=schedule)
    ema.set_model(model)
    with pytest.raises(ValueError, match=r"EMA\.update\(\)") as info:
        ema.update()
    message = str(info.value)
    assert advice in message and "in_steps" not in message, message
    assert ema.step == 0
