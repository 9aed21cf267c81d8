"""Shared fixtures: a fresh Keras session per test and small models."""

from __future__ import annotations

import contextlib
import gc
import os

import keras
import numpy as np
import pytest
from keras import ops

BACKEND = keras.backend.backend()

# tests/test_distribution.py runs `tf.distribute.MirroredStrategy` on two
# logical CPUs. They can only be configured before TensorFlow initialises its
# runtime, and the whole session is one process: so here, at import time.
TF_LOGICAL_CPUS = 2
if BACKEND == "tensorflow":
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    # If a plugin already initialised TensorFlow this raises RuntimeError:
    # the rest runs, and the MirroredStrategy tests fail on their device count.
    with contextlib.suppress(RuntimeError):
        tf.config.set_logical_device_configuration(
            _cpu, [tf.config.LogicalDeviceConfiguration()] * TF_LOGICAL_CPUS
        )
# The `keras.distribution` tests want four virtual CPU devices on JAX (tox
# sets the flag; this covers a bare `pytest`). XLA reads it when JAX first
# creates its backend, which importing Keras does not do.
JAX_DEVICES = 4
if BACKEND == "jax" and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={JAX_DEVICES}"
    ).strip()


@pytest.fixture(autouse=True)
def clear_session():
    keras.backend.clear_session()
    # `clear_session` collects garbage, a pass over every object Python
    # tracks: with TensorFlow, JAX or torch imported, a few hundred thousand,
    # about half a second twice per test. What outlives this collection
    # (modules, caches, fixtures of wider scope) is moved out of the later
    # ones, which then scan only what the tests made since.
    gc.freeze()
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


def make_model(batch_norm: bool = True, compile: bool = True, **compile_kwargs):
    """A small MLP (with BatchNormalization statistics to average)."""
    layers = [keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="d1")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(name="bn"))
    layers.append(keras.layers.Dense(1, name="d2"))
    model = keras.Sequential(layers, name="net")
    if compile:
        compile_kwargs.setdefault("optimizer", keras.optimizers.SGD(0.05))
        model.compile(loss="mse", metrics=["mae"], **compile_kwargs)
    return model


def make_data(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) + 0.1).astype("float32")
    return x, y


def numpy_weights(model) -> dict:
    return {w.path: ops.convert_to_numpy(w.value).copy() for w in model.weights}


def float_weights(model) -> dict:
    return {
        w.path: ops.convert_to_numpy(w.value).copy()
        for w in model.weights
        if keras.backend.is_float_dtype(w.dtype)
    }


def ema_values(ema) -> dict:
    return {
        path: ops.convert_to_numpy(v.value).copy()
        for path, v in zip(ema.tracked_paths, ema.variables, strict=True)
    }


def assert_bit_equal(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        np.testing.assert_array_equal(expected[key], actual[key], err_msg=key)


def assert_close(expected: dict, actual: dict, rtol=2e-5, atol=2e-6) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        np.testing.assert_allclose(
            actual[key], expected[key], rtol=rtol, atol=atol, err_msg=key
        )


def device_kind(value) -> str:
    """`"cpu"` when `value` lives in host memory."""
    if BACKEND == "jax":
        (device,) = value.devices()
        return device.platform
    if BACKEND == "torch":
        return value.device.type
    return value.device.split(":")[-2].split("/")[-1].lower()


def assert_on_host(ema) -> None:
    state = ema._state
    for variable in [*state.shadows, *state.counters]:
        assert device_kind(variable.value) == "cpu", variable.path
    if BACKEND == "jax":
        import jax

        host = jax.devices("cpu")[0]
        for variable in [*state.shadows, *state.counters]:
            assert variable.value.devices() == {host}, variable.path


def reload_state_into_fresh_ema(ema, model, path, **hyperparameters):
    """Saves `ema`'s state, loads it into a new EMA of `model`, checks that
    the step and every shadow came back bit for bit, and returns the new EMA."""
    import keras_ema

    ema.save_state(path)
    fresh = keras_ema.EMA(**hyperparameters)
    fresh.set_model(model)
    fresh.load_state(path)
    assert fresh.step == ema.step
    assert_bit_equal(ema_values(ema), ema_values(fresh))
    return fresh
