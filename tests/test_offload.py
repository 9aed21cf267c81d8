"""`offload_to_host=True`: shadows in host memory, same semantics, same swaps."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import assert_bit_equal
from conftest import assert_close
from conftest import assert_on_host
from conftest import ema_values
from conftest import float_weights
from conftest import make_data
from conftest import make_model
from conftest import numpy_weights
from oracle import ArticleEMA
from test_oracle import HYPERPARAMETERS
from test_oracle import Recorder
from test_oracle import run_inside_fit

import keras_ema

BACKEND = keras.backend.backend()


def offloaded(**kwargs) -> keras_ema.EMA:
    return keras_ema.EMA(offload_to_host=True, **kwargs)


# --------------------------------------------------------------------------
# The oracle, step by step


def test_fit_without_per_step_reads_matches_article():
    # No callback reads the EMA between steps here, so on torch the blend of
    # a due step waits for the next due step or the end of `fit`.
    hp = HYPERPARAMETERS["every_3_no_delay"]
    model = make_model()
    reference = make_model()
    reference.set_weights(model.get_weights())
    ema = offloaded(**hp)
    oracle = ArticleEMA(float_weights(reference), **hp)

    class Replay(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            oracle.update(float_weights(self.model))

    x, y = make_data(96)
    for fitted, callback in ((model, ema), (reference, Replay())):
        fitted.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[callback], verbose=0
        )
    assert ema.step == 24 == oracle.step
    assert_close(oracle.ema, ema_values(ema))


@pytest.mark.skipif(BACKEND == "torch", reason="jit_compile is torch.compile there.")
def test_jit_compiled_step_with_host_update_matches_article():
    # With XLA the host update must stay outside the compiled cluster (TF).
    hp = HYPERPARAMETERS["warmup_then_every_step"]
    model = make_model(jit_compile=True)
    assert model.jit_compile
    ema = offloaded(**hp)
    oracle = ArticleEMA(float_weights(model), **hp)
    recorder = Recorder(ema, oracle)
    x, y = make_data(48)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[ema, recorder], verbose=0)
    assert recorder.checked == 6
    assert model.jit_compile


def test_nan_weights_never_enter_the_host_shadows():
    model = make_model()
    ema = offloaded(beta=0.9, update_after_step=0, update_every=1)
    ema.set_model(model)
    ema.update()
    before = ema_values(ema)
    weight = model.weights[0]
    good = keras.ops.convert_to_numpy(weight.value).copy()
    bad = good.copy()
    bad.flat[0] = np.nan
    weight.assign(bad)
    ema.update()
    assert ema.skipped_updates == 1
    assert_bit_equal(before, ema_values(ema))
    weight.assign(good)
    ema.update()
    assert ema.skipped_updates == 1
    assert ema.step == 3
    for value in ema_values(ema).values():
        assert np.isfinite(value).all()


def test_skipped_steps_start_no_transfer():
    if BACKEND == "tensorflow":
        pytest.skip("TF decides inside the step's graph; no host call to count.")
    model = make_model()
    ema = offloaded(update_after_step=0, update_every=3)
    ema.set_model(model)
    kernel = ema._engine
    calls = []
    if BACKEND == "jax":
        update = kernel._update
        kernel._update = lambda *args: calls.append(1) or update(*args)
    else:
        blend = kernel._blend
        kernel._blend = lambda weights: calls.append(1) or blend(weights)
    x, y = make_data(96)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[ema], verbose=0)
    assert ema.step == 12
    assert len(calls) == 4  # steps 0, 3, 6, 9


# --------------------------------------------------------------------------
# Swaps, evaluate, predict


def test_swaps_restore_online_weights_bit_for_bit():
    hp = HYPERPARAMETERS["every_3_no_delay"]
    model, ema, _ = run_inside_fit(hp, with_filters=False, offload=True, epochs=1)
    online = numpy_weights(model)
    expected = ema_values(ema)
    for _ in range(5):
        with ema.swap_weights():
            swapped = {p: v for p, v in float_weights(model).items() if p in expected}
            assert_bit_equal(expected, swapped)
        assert_bit_equal(online, numpy_weights(model))
    assert_on_host(ema)


def test_validation_evaluate_and_predict_use_host_shadows():
    model = make_model()
    ema = offloaded(beta=0.9, update_after_step=2, update_every=2)
    x, y = make_data(64)
    xv, yv = make_data(32, seed=1)
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        validation_data=(xv, yv),
        callbacks=[ema],
        verbose=0,
    )
    online = numpy_weights(model)
    twin = make_model()
    twin.set_weights(ema.get_weights())
    expected = twin.evaluate(xv, yv, verbose=0, return_dict=True)
    assert history.history["val_ema_loss"][-1] == pytest.approx(
        expected["loss"], rel=1e-5
    )
    assert model.evaluate(
        xv, yv, callbacks=[ema], verbose=0, return_dict=True
    ) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(
        model.predict(xv, callbacks=[ema], verbose=0),
        twin.predict(xv, verbose=0),
        rtol=1e-6,
        atol=1e-6,
    )
    assert_bit_equal(online, numpy_weights(model))
    assert_on_host(ema)


def test_copy_to_model_writes_host_shadows_into_the_weights():
    hp = HYPERPARAMETERS["warmup_then_every_step"]
    model, ema, _ = run_inside_fit(hp, with_filters=False, offload=True, epochs=1)
    expected = ema_values(ema)
    ema.copy_to_model()
    actual = {p: v for p, v in float_weights(model).items() if p in expected}
    assert_bit_equal(expected, actual)


# --------------------------------------------------------------------------
# State files


@pytest.mark.parametrize("save_offloaded", [True, False])
def test_state_files_load_across_placements(tmp_path, save_offloaded):
    hp = HYPERPARAMETERS["warmup_then_every_step"]
    model = make_model()
    saver = keras_ema.EMA(offload_to_host=save_offloaded, **hp)
    x, y = make_data(48)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[saver], verbose=0)
    path = str(tmp_path / "ema.npz")
    saver.save_state(path)
    loader = keras_ema.EMA(offload_to_host=not save_offloaded, **hp)
    loader.set_model(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader.load_state(path)
    # A placement is not a hyperparameter: no "other hyperparameters" warning.
    assert not [w for w in caught if "hyperparameters" in str(w.message)]
    assert loader.step == saver.step == 6
    assert loader.skipped_updates == saver.skipped_updates
    assert_bit_equal(ema_values(saver), ema_values(loader))
    assert_on_host(saver if save_offloaded else loader)


def test_resume_from_state_file_continues_the_same_average(tmp_path):
    hp = HYPERPARAMETERS["every_3_no_delay"]
    model = make_model()
    ema = offloaded(**hp)
    oracle = ArticleEMA(float_weights(model), **hp)
    x, y = make_data(48)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[ema, Recorder(ema, oracle)])
    path = str(tmp_path / "ema.npz")
    ema.save_state(path)
    resumed = offloaded(**hp)
    resumed.set_model(model)
    resumed.load_state(path)
    assert_on_host(resumed)
    model.fit(
        x, y, batch_size=8, epochs=1, callbacks=[resumed, Recorder(resumed, oracle)]
    )
    assert resumed.step == 12 == oracle.step
    assert_close(oracle.ema, ema_values(resumed))
    assert_on_host(resumed)


# --------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize("value", [1, 0, "yes", None, np.bool_(True)])
def test_offload_to_host_must_be_a_boolean(value):
    with pytest.raises(ValueError, match="`offload_to_host` must be a boolean"):
        keras_ema.EMA(offload_to_host=value)


def test_get_config_round_trip_keeps_offload():
    ema = offloaded(beta=0.9)
    config = ema.get_config()
    assert config["offload_to_host"] is True
    assert keras_ema.EMA.from_config(config).get_config() == config
    assert keras_ema.EMA().get_config()["offload_to_host"] is False


# --------------------------------------------------------------------------
# JAX: host and "accelerator" as two distinct devices


def _second_cpu():
    import jax

    devices = jax.devices("cpu")
    return devices[1] if len(devices) > 1 else None


@pytest.mark.skipif(
    BACKEND != "jax" or _second_cpu() is None,
    reason="needs JAX with two CPU devices (XLA_FLAGS host platform count)",
)
def test_jax_model_on_another_device_trains_swaps_and_keeps_shadows_on_host():
    # The model's default device stands in for an accelerator: every transfer
    # (weights to host on due steps, shadows back on swaps) crosses devices,
    # which a jitted function with mixed device inputs would refuse.
    import jax

    device = _second_cpu()
    hp = HYPERPARAMETERS["every_3_no_delay"]
    with jax.default_device(device):
        model = make_model()
        ema = offloaded(**hp)
        oracle = ArticleEMA(float_weights(model), **hp)
        x, y = make_data(48)
        xv, yv = make_data(16, seed=1)
        history = model.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            validation_data=(xv, yv),
            callbacks=[ema, Recorder(ema, oracle)],
            verbose=0,
        )
        assert ema.step == 12 == oracle.step
        assert_close(oracle.ema, ema_values(ema))
        assert "val_ema_loss" in history.history
        online = numpy_weights(model)
        with ema.swap_weights():
            for weight in model.weights:
                assert weight.value.devices() == {device}, weight.path
        model.evaluate(xv, yv, callbacks=[ema], verbose=0)
        for weight in model.weights:
            assert weight.value.devices() == {device}, weight.path
        assert_bit_equal(online, numpy_weights(model))
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[ema], verbose=0)
    assert_on_host(ema)
