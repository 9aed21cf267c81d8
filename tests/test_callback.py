"""Behaviour of the callback inside Keras: logs, swaps, evaluate, interrupts."""

from __future__ import annotations

import csv

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

import keras_ema


def fit_with_validation(model, ema, callbacks=(), epochs=2, **kwargs):
    x, y = make_data(64)
    xv, yv = make_data(32, seed=1)
    return model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        validation_data=(xv, yv),
        callbacks=[*callbacks, ema]
        if kwargs.pop("ema_last", False)
        else [ema, *callbacks],
        verbose=0,
        **kwargs,
    )


@pytest.mark.parametrize("ema_last", [False, True])
def test_val_ema_keys_reach_every_callback(tmp_path, ema_last):
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=2, update_every=1)
    seen = {}

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch] = dict(logs)

    csv_path = tmp_path / "log.csv"
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_ema_loss", mode="min", patience=1
    )
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="val_ema_loss", mode="min", patience=1
    )
    history = fit_with_validation(
        model,
        ema,
        callbacks=[Spy(), keras.callbacks.CSVLogger(str(csv_path)), stopper, plateau],
        ema_last=ema_last,
    )
    expected = {"val_ema_loss", "val_ema_mae", "val_loss", "val_mae", "ema_decay"}
    for logs in seen.values():
        assert expected <= logs.keys()
    assert expected <= history.history.keys()
    with open(csv_path) as handle:
        assert expected <= set(next(csv.reader(handle)))
    assert stopper.best == min(history.history["val_ema_loss"])


def test_val_ema_metrics_equal_evaluate_with_ema_weights():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=2, update_every=1)
    history = fit_with_validation(model, ema, epochs=1)
    xv, yv = make_data(32, seed=1)
    online = model.evaluate(xv, yv, verbose=0, return_dict=True)
    with_ema = model.evaluate(xv, yv, verbose=0, return_dict=True, callbacks=[ema])
    np.testing.assert_allclose(
        history.history["val_loss"][-1], online["loss"], rtol=1e-5
    )
    np.testing.assert_allclose(
        history.history["val_ema_loss"][-1], with_ema["loss"], rtol=1e-5
    )
    np.testing.assert_allclose(
        history.history["val_ema_mae"][-1], with_ema["mae"], rtol=1e-5
    )
    assert with_ema["loss"] != online["loss"]


def test_logged_decay_is_the_articles_decay():
    model = make_model()
    ema = keras_ema.EMA(beta=0.999, update_after_step=3, update_every=1)
    history = fit_with_validation(model, ema, epochs=1)
    assert history.history["ema_decay"][-1] == pytest.approx(
        ema.get_current_decay(), rel=1e-6
    )
    assert 0 < ema.get_current_decay() < 0.999


def test_online_weights_survive_fit_and_many_swaps_bit_for_bit():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=2, update_every=1)
    fit_with_validation(model, ema, epochs=2)
    online = numpy_weights(model)
    xv, yv = make_data(32, seed=1)
    for _ in range(20):
        model.evaluate(xv, yv, verbose=0, callbacks=[ema])
        model.predict(xv, verbose=0, callbacks=[ema])
        with ema.swap_weights():
            pass
    assert_bit_equal(online, numpy_weights(model))


def test_fit_leaves_online_weights_in_the_model():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=2, update_every=1)
    weights_at_last_step = {}

    class Capture(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            weights_at_last_step.update(numpy_weights(self.model))

    fit_with_validation(model, ema, callbacks=[Capture()], epochs=2)
    assert_bit_equal(weights_at_last_step, numpy_weights(model))


def test_evaluate_and_predict_use_ema_weights():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=2, update_every=1)
    fit_with_validation(model, ema, epochs=1)
    xv, _ = make_data(32, seed=1)
    twin = make_model()
    twin.set_weights(ema.get_weights())
    np.testing.assert_allclose(
        model.predict(xv, verbose=0, callbacks=[ema]),
        twin.predict(xv, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    assert not np.allclose(model.predict(xv, verbose=0), twin.predict(xv, verbose=0))


def test_swap_restores_online_weights_on_exception():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    fit_with_validation(model, ema, epochs=1)
    online = numpy_weights(model)
    with pytest.raises(RuntimeError), ema.swap_weights():
        assert not np.array_equal(
            model.weights[0].numpy(), online[model.weights[0].path]
        )
        raise RuntimeError("boom")
    assert_bit_equal(online, numpy_weights(model))


class RaiseAt(keras.callbacks.Callback):
    def __init__(self, hook, error=KeyboardInterrupt):
        super().__init__()
        self.hook = hook
        self.error = error

    def __getattribute__(self, name):
        if name == object.__getattribute__(self, "hook"):

            def boom(*args, **kwargs):
                raise object.__getattribute__(self, "error")("interrupted")

            return boom
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("method", ["evaluate", "predict"])
def test_interrupted_evaluate_or_predict_then_next_use_is_online(method):
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    fit_with_validation(model, ema, epochs=1)
    online = numpy_weights(model)
    xv, yv = make_data(32, seed=1)
    hook = "on_test_batch_end" if method == "evaluate" else "on_predict_batch_end"
    args = (xv, yv) if method == "evaluate" else (xv,)
    with pytest.raises(KeyboardInterrupt):
        getattr(model, method)(*args, verbose=0, callbacks=[ema, RaiseAt(hook)])
    # The next use of the callback starts from the online weights.
    with ema.swap_weights():
        pass
    assert_bit_equal(online, numpy_weights(model))
    history = model.fit(
        *make_data(16), batch_size=8, epochs=1, verbose=0, callbacks=[ema]
    )
    assert history is not None


def test_keyboard_interrupt_during_ema_validation_keeps_online_weights():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    online_before_validation = {}
    calls = []
    keras_make_test_function = model.make_test_function

    class Capture(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            online_before_validation.update(numpy_weights(self.model))

    def make_test_function(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second evaluation of the epoch: EMA weights
            raise KeyboardInterrupt("interrupted")
        return keras_make_test_function(*args, **kwargs)

    model.make_test_function = make_test_function
    with pytest.raises(KeyboardInterrupt):
        fit_with_validation(model, ema, callbacks=[Capture()], epochs=1)
    assert_bit_equal(online_before_validation, numpy_weights(model))


def test_exception_inside_training_keeps_online_weights_and_callback_usable():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    x, y = make_data(64)
    with pytest.raises(RuntimeError):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=1,
            verbose=0,
            callbacks=[ema, RaiseAt("on_train_batch_end", RuntimeError)],
        )
    step = ema.step
    online = numpy_weights(model)
    xv, yv = make_data(32, seed=1)
    model.evaluate(xv, yv, verbose=0, callbacks=[ema])
    assert_bit_equal(online, numpy_weights(model))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    assert ema.step == step + 8


def test_get_weights_aligns_with_model_get_weights():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    fit_with_validation(model, ema, epochs=1)
    ema_weights = ema.get_weights()
    model_weights = model.get_weights()
    assert len(ema_weights) == len(model_weights)
    for a, b in zip(ema_weights, model_weights, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_copy_to_model_writes_ema_weights():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    fit_with_validation(model, ema, epochs=1)
    expected = ema.get_weights()
    ema.copy_to_model()
    for a, b in zip(expected, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_tracks_batchnorm_statistics_and_skips_integer_weights():
    model = make_model()
    ema = keras_ema.EMA()
    ema.set_model(model)
    paths = ema.tracked_paths
    assert any(p.endswith("moving_mean") for p in paths)
    assert any(p.endswith("moving_variance") for p in paths)
    assert len(paths) == len(
        [w for w in model.weights if keras.backend.is_float_dtype(w.dtype)]
    )


def test_filter_matching_no_weight_is_a_value_error():
    model = make_model()
    ema = keras_ema.EMA(ignore_names=["net/d1/kernal"])
    with pytest.raises(ValueError, match="kernal"):
        ema.set_model(model)


def test_model_changed_after_set_model_is_a_value_error():
    model = make_model()
    ema = keras_ema.EMA()
    ema.set_model(model)
    model.add(keras.layers.Dense(2, name="extra"))
    with pytest.raises(ValueError, match="changed"):
        ema.update()


def test_get_config_round_trip():
    ema = keras_ema.EMA(beta=0.99, update_every=3, ignore_names=["a/b"])
    clone = keras_ema.EMA.from_config(ema.get_config())
    assert clone.get_config() == ema.get_config()


def test_step_is_an_int_and_decay_a_float():
    model = make_model()
    ema = keras_ema.EMA(update_after_step=0, update_every=1)
    ema.set_model(model)
    ema.update()
    ema.update()
    assert isinstance(ema.step, int) and int(ema.step) == 2
    assert isinstance(ema.get_current_decay(), float)


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="On torch nothing is compiled; the train function is rebuilt.",
)
def test_second_fit_reuses_the_fused_train_function_until_recompile():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    seen = []

    class Capture(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                seen.append(self.model.train_function)

    x, y = make_data(16)
    for recompile in (False, False, True):
        if recompile:
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema, Capture()])
    assert seen[0] is seen[1]
    assert seen[2] is not seen[1]
    assert ema.step == 6


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX compile cache.")
@pytest.mark.parametrize(
    "update_every, expected",
    [
        (1, {"fused_step": 1}),
        # Due only every few steps: Keras' own step at every step and the
        # update alone after a due one, never Keras' step a second time
        # fused with the update.
        (3, {"train_step": 1, "due_update": 1}),
    ],
)
def test_jax_compiles_each_step_function_once_for_many_fits(
    caplog, update_every, expected
):
    import jax

    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=update_every)
    x, y = make_data(32)
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
        for _ in range(3):
            model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[ema])
    compiled = {}
    for record in caplog.records:
        message = record.getMessage()
        for name in ("fused_step", "train_step", "due_update"):
            if message.startswith(f"Compiling jit({name})"):
                compiled[name] = compiled.get(name, 0) + 1
    assert compiled == expected
    assert ema.step == 24


def dropout_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="d1"),
            keras.layers.Dropout(0.2, name="drop"),
            keras.layers.Dense(1, name="d2"),
        ],
        name="drop_net",
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


@pytest.mark.parametrize("method", ["evaluate", "predict"])
def test_interrupted_swap_puts_back_every_model_variable(method):
    # On JAX an interrupted evaluate/predict leaves the model's variables
    # without values (Keras detaches them while its loop runs), the Dropout
    # seed state included: the next use of the callback puts them all back.
    model = dropout_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    x, y = make_data(32)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    online = numpy_weights(model)
    hook = "on_test_batch_end" if method == "evaluate" else "on_predict_batch_end"
    args = (x, y) if method == "evaluate" else (x,)
    with pytest.raises(KeyboardInterrupt):
        getattr(model, method)(*args, verbose=0, callbacks=[ema, RaiseAt(hook)])
    getattr(model, method)(*args, verbose=0, callbacks=[ema])
    assert_bit_equal(online, numpy_weights(model))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])


def test_nested_swaps_keep_the_ema_weights_until_the_outer_block_exits():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    fit_with_validation(model, ema, epochs=1)
    online = numpy_weights(model)
    xv, yv = make_data(32, seed=1)
    with ema.swap_weights():
        swapped = numpy_weights(model)
        assert any(not np.array_equal(swapped[path], online[path]) for path in online)
        with ema.swap_weights():
            assert_bit_equal(swapped, numpy_weights(model))
        assert_bit_equal(swapped, numpy_weights(model))
        model.evaluate(xv, yv, verbose=0, callbacks=[ema])
        model.predict(xv, verbose=0, callbacks=[ema])
        assert_bit_equal(swapped, numpy_weights(model))
    assert_bit_equal(online, numpy_weights(model))


def test_nested_swap_exception_unwinds_to_the_online_weights():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    fit_with_validation(model, ema, epochs=1)
    online = numpy_weights(model)
    with pytest.raises(RuntimeError), ema.swap_weights(), ema.swap_weights():
        raise RuntimeError("boom")
    assert_bit_equal(online, numpy_weights(model))


@pytest.mark.parametrize(
    "action",
    [
        lambda ema, model: ema.update(),
        lambda ema, model: ema.copy_to_model(),
        lambda ema, model: model.fit(
            *make_data(16), batch_size=8, epochs=1, verbose=0, callbacks=[ema]
        ),
    ],
    ids=["update", "copy_to_model", "fit"],
)
def test_what_needs_online_weights_is_refused_inside_a_swap(action):
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    fit_with_validation(model, ema, epochs=1)
    online = numpy_weights(model)
    step = ema.step
    with ema.swap_weights():
        swapped = numpy_weights(model)
        with pytest.raises(ValueError, match="swap_weights"):
            action(ema, model)
        assert_bit_equal(swapped, numpy_weights(model))
    assert_bit_equal(online, numpy_weights(model))
    assert ema.step == step


def test_a_model_that_fit_builds_is_averaged_from_its_first_step():
    # Keras' own SwapEMAWeights tests build the model this way; TensorFlow
    # builds it only inside the first train step.
    model = keras.Sequential([keras.layers.Dense(2, name="d")], name="lazy")
    model.compile(keras.optimizers.SGD(0.1), "mse")
    ema = keras_ema.EMA(beta=0.9, update_after_step=1, update_every=1)
    replay = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            replay.append(float_weights(self.model))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[ema, Record()])
    oracle = ArticleEMA(replay[0], beta=0.9, update_after_step=1, update_every=1)
    for weights in replay:
        oracle.update(weights)
    assert ema.step == oracle.step == 8
    assert_close(oracle.ema, ema_values(ema))
