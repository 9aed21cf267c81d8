"""The EMA under Keras' distribution engines.

- JAX, `keras.distribution`: `DataParallel` and `ModelParallel` (with a
  `LayoutMap`) on four virtual CPU devices.
- TensorFlow, `tf.distribute.MirroredStrategy` on two logical CPUs
  (configured in conftest.py).
- torch: what the callback refuses.

Every distributed EMA is compared with the same run on one device, within
1e-5, for the same data order (no shuffling).
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import JAX_DEVICES
from conftest import TF_LOGICAL_CPUS
from conftest import assert_bit_equal
from conftest import ema_values
from conftest import float_weights
from conftest import make_data
from conftest import make_model
from conftest import reload_state_into_fresh_ema
from keras import ops

import keras_ema
from keras_ema import posthoc
from keras_ema.posthoc.folder import snapshot_paths

HP = dict(beta=0.9, update_after_step=3, update_every=1)
TOLERANCE = 1e-5
EPOCHS = 2
BATCH_SIZE = 16


def assert_within_tolerance(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        np.testing.assert_allclose(
            actual[key], expected[key], rtol=0, atol=TOLERANCE, err_msg=key
        )


def train(
    scope=contextlib.nullcontext,
    model_kwargs=None,
    ema_in_scope=True,
    fit_in_scope=True,
):
    """Fits the conftest model with an EMA built under `scope()`, no shuffling.

    `fit` runs under `scope()` too unless `fit_in_scope=False` (as a
    `tf.distribute` model may be fitted outside its strategy's scope).
    Returns `(model, ema, history)`; the EMA values and logs must not depend
    on `scope`.
    """
    x, y = make_data(64)
    x_val, y_val = make_data(32, seed=1)
    with scope():
        model = make_model(**(model_kwargs or {}))
        ema = keras_ema.EMA(**HP) if ema_in_scope else None
    ema = ema or keras_ema.EMA(**HP)
    with scope() if fit_in_scope else contextlib.nullcontext():
        history = model.fit(
            x,
            y,
            batch_size=BATCH_SIZE,
            epochs=EPOCHS,
            shuffle=False,
            verbose=0,
            validation_data=(x_val, y_val),
            callbacks=[ema],
        )
    return model, ema, history


def assert_logs_close(expected, actual) -> None:
    for key in ("loss", "val_loss", "val_ema_loss", "val_ema_mae"):
        np.testing.assert_allclose(
            actual.history[key],
            expected.history[key],
            rtol=TOLERANCE,
            atol=TOLERANCE,
            err_msg=key,
        )


# --------------------------------------------------------------------------
# JAX: keras.distribution


def _jax_device_count() -> int:
    if BACKEND != "jax":
        return 0
    import jax

    return jax.device_count()


jax_only = pytest.mark.skipif(
    BACKEND != "jax" or _jax_device_count() < JAX_DEVICES,
    reason=f"keras.distribution tests run on JAX with {JAX_DEVICES} devices "
    f"(XLA_FLAGS=--xla_force_host_platform_device_count={JAX_DEVICES}).",
)


def data_parallel():
    return keras.distribution.DataParallel(devices=keras.distribution.list_devices())


def model_parallel():
    """A 2x2 mesh; the conftest model's weights sharded over "model"."""
    mesh = keras.distribution.DeviceMesh(
        (2, 2), ["batch", "model"], keras.distribution.list_devices()
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    # Keys are regexes matched from the start of `variable.path`.
    layout_map[".*d1/kernel"] = (None, "model")
    layout_map[".*d1/bias"] = ("model",)
    layout_map[".*bn/.*"] = ("model",)
    layout_map[".*d2/kernel"] = ("model", None)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def assert_laid_out_like_weights(shadows, weights) -> None:
    for shadow, weight in zip(shadows, weights, strict=True):
        value, expected = shadow.value, weight.value
        assert value.sharding.is_equivalent_to(expected.sharding, value.ndim), (
            weight.path,
            value.sharding,
            expected.sharding,
        )
        # Same pieces on the same devices: nothing gathered anywhere.
        shards = {s.device: s.data.shape for s in value.addressable_shards}
        expected_shards = {s.device: s.data.shape for s in expected.addressable_shards}
        assert shards == expected_shards, weight.path


def sharded_paths(model) -> list[str]:
    return [
        w.path
        for w in model.weights
        if any(s.data.shape != w.value.shape for s in w.value.addressable_shards)
    ]


class RecordLiveShardings(keras.callbacks.Callback):
    """Records the shardings of the EMA arrays the fused step returns."""

    def __init__(self, ema):
        super().__init__()
        self.ema = ema
        self.shardings = []

    def on_train_batch_end(self, batch, logs=None):
        import jax

        arrays = jax.tree.leaves(self.ema._engine._arrays)
        self.shardings.append([a.sharding for a in arrays])


@jax_only
@pytest.mark.parametrize("make_distribution", [data_parallel, model_parallel])
def test_jax_distributed_ema_equals_single_device(make_distribution):
    _, expected, expected_history = train()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    distribution = make_distribution()
    model, ema, history = train(distribution.scope)

    assert_within_tolerance(ema_values(expected), ema_values(ema))
    assert_logs_close(expected_history, history)
    assert_laid_out_like_weights(ema.variables, ema._state.weights)
    if isinstance(distribution, keras.distribution.ModelParallel):
        assert sharded_paths(model) == [
            "net/d1/kernel",
            "net/d1/bias",
            "net/bn/gamma",
            "net/bn/beta",
            "net/bn/moving_mean",
            "net/bn/moving_variance",
            "net/d2/kernel",
        ]


@jax_only
@pytest.mark.parametrize("update_every", [1, 2])
def test_jax_model_parallel_update_runs_sharded(update_every):
    # update_every=2: Keras' own step, then the update jitted alone on due
    # steps; each must keep the shadows laid out like their weights.
    distribution = model_parallel()
    x, y = make_data(64)
    with distribution.scope():
        model = make_model()
        ema = keras_ema.EMA(**{**HP, "update_every": update_every})
        ema.set_model(model)
        weight_shardings = [w.value.sharding for w in ema._state.weights]
        probe = RecordLiveShardings(ema)
        model.fit(x, y, batch_size=BATCH_SIZE, verbose=0, callbacks=[ema, probe])
    assert len(probe.shardings) == len(x) // BATCH_SIZE
    mesh = weight_shardings[0].mesh
    for step in probe.shardings:
        counters, shadows = step[:2], step[2:]
        for sharding, expected in zip(shadows, weight_shardings, strict=True):
            assert sharding.mesh == mesh
            assert sharding.spec == expected.spec
        for sharding in counters:
            assert sharding.mesh == mesh and sharding.is_fully_replicated


@jax_only
def test_jax_model_parallel_swaps_evaluate_predict_and_update():
    distribution = model_parallel()
    x, y = make_data(32, seed=2)
    with distribution.scope():
        model, ema, _ = train(distribution.scope)
        online = float_weights(model)
        shardings = [w.value.sharding for w in model.weights]

        twin = make_model()
        twin.set_weights(ema.get_weights())
        expected_eval = twin.evaluate(x, y, verbose=0)
        expected_pred = twin.predict(x, verbose=0)
        np.testing.assert_allclose(
            model.evaluate(x, y, verbose=0, callbacks=[ema]), expected_eval, rtol=1e-6
        )
        np.testing.assert_allclose(
            model.predict(x, verbose=0, callbacks=[ema]), expected_pred, rtol=1e-6
        )
        with ema.swap_weights():
            for weight, sharding in zip(model.weights, shardings, strict=True):
                assert weight.value.sharding.is_equivalent_to(
                    sharding, weight.value.ndim
                )
            assert_within_tolerance(ema_values(ema), float_weights(model))
        assert_bit_equal(online, float_weights(model))
        for weight, sharding in zip(model.weights, shardings, strict=True):
            assert weight.value.sharding.is_equivalent_to(sharding, weight.value.ndim)

        ema.update()
        assert ema.step == EPOCHS * 64 // BATCH_SIZE + 1
        assert_laid_out_like_weights(ema.variables, ema._state.weights)


@jax_only
def test_jax_model_parallel_state_round_trip_across_load_model(tmp_path):
    distribution = model_parallel()
    with distribution.scope():
        model, ema, _ = train(distribution.scope)
        ema.save_state(str(tmp_path / "ema.npz"))
        model.save(tmp_path / "model.keras")
        loaded = keras.models.load_model(tmp_path / "model.keras")
        # `variable.path` loses the model name; the LayoutMap regexes still match.
        assert loaded.weights[0].path == "d1/kernel"
        fresh = keras_ema.EMA(**HP)
        fresh.set_model(loaded)
        fresh.load_state(str(tmp_path / "ema.npz"))
    assert len(sharded_paths(loaded)) == 7
    assert_laid_out_like_weights(fresh.variables, fresh._state.weights)
    expected = list(ema_values(ema).values())
    for shadow, value in zip(fresh.variables, expected, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(shadow.value), value)
    assert fresh.step == ema.step


@jax_only
def test_jax_ema_created_outside_the_distribution_scope():
    """Model built under the distribution, EMA created and fitted outside it:
    shadows and counters still live on the weights' mesh."""
    distribution = model_parallel()
    _, expected, _ = train()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    x, y = make_data(64)
    x_val, y_val = make_data(32, seed=1)
    with distribution.scope():
        model = make_model()
    ema = keras_ema.EMA(**HP)
    ema.set_model(model)
    for counter in ema._state.counters:
        assert counter.value.sharding.is_fully_replicated
        assert len(counter.value.sharding.device_set) == JAX_DEVICES
    assert_laid_out_like_weights(ema.variables, ema._state.weights)
    with distribution.scope():
        model.fit(
            x,
            y,
            batch_size=BATCH_SIZE,
            epochs=EPOCHS,
            shuffle=False,
            verbose=0,
            validation_data=(x_val, y_val),
            callbacks=[ema],
        )
    assert_within_tolerance(ema_values(expected), ema_values(ema))


# --------------------------------------------------------------------------
# TensorFlow: tf.distribute


tf_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="tf.distribute runs on TensorFlow only."
)


def mirrored_strategy():
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) == TF_LOGICAL_CPUS
    return tf.distribute.MirroredStrategy(devices)


def replica_values(variable) -> list:
    """Each replica's copy of a Keras variable (one item when not mirrored)."""
    value = variable.value
    return [ops.convert_to_numpy(v) for v in getattr(value, "values", (value,))]


def assert_mirrored(variables) -> None:
    for variable in variables:
        copies = variable.value.values
        assert len({c.device for c in copies}) == TF_LOGICAL_CPUS, variable.path
        values = replica_values(variable)
        for other in values[1:]:
            np.testing.assert_array_equal(other, values[0], err_msg=variable.path)


# BatchNormalization normalises with each replica's own batch, so a mirrored
# run is compared on a model without it (see docs/distributed.md).
NO_BN = dict(batch_norm=False)


@tf_only
@pytest.mark.parametrize("ema_in_scope", [True, False], ids=["inside", "outside"])
def test_mirrored_strategy_equals_single_device(ema_in_scope):
    _, expected, expected_history = train(model_kwargs=NO_BN)
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    strategy = mirrored_strategy()
    _, ema, history = train(
        strategy.scope,
        model_kwargs=NO_BN,
        ema_in_scope=ema_in_scope,
        fit_in_scope=False,
    )
    assert "val_ema_loss" in history.history
    assert_logs_close(expected_history, history)
    assert_within_tolerance(ema_values(expected), ema_values(ema))
    assert_mirrored(ema.variables + ema._state.counters)
    assert ema.step == EPOCHS * 64 // BATCH_SIZE


@tf_only
def test_mirrored_strategy_swaps_reach_every_replica():
    strategy = mirrored_strategy()
    model, ema, _ = train(strategy.scope, model_kwargs=NO_BN, fit_in_scope=False)
    x, y = make_data(32, seed=2)
    online = {w.path: replica_values(w) for w in model.weights}
    ema_weights = ema_values(ema)

    with ema.swap_weights():
        for weight in model.weights:
            for copy in replica_values(weight):
                np.testing.assert_array_equal(copy, ema_weights[weight.path])
    for weight in model.weights:
        for copy, before in zip(
            replica_values(weight), online[weight.path], strict=True
        ):
            np.testing.assert_array_equal(copy, before)

    twin = make_model(**NO_BN)
    twin.set_weights(ema.get_weights())
    np.testing.assert_allclose(
        model.evaluate(x, y, verbose=0, callbacks=[ema]),
        twin.evaluate(x, y, verbose=0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        model.predict(x, verbose=0, callbacks=[ema]),
        twin.predict(x, verbose=0),
        rtol=1e-6,
    )
    for weight in model.weights:
        for copy, before in zip(
            replica_values(weight), online[weight.path], strict=True
        ):
            np.testing.assert_array_equal(copy, before)


@tf_only
def test_mirrored_strategy_update_outside_fit_and_state_round_trip(tmp_path):
    _, expected, _ = train(model_kwargs=NO_BN)
    expected.update()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    strategy = mirrored_strategy()
    model, ema, _ = train(strategy.scope, model_kwargs=NO_BN, fit_in_scope=False)
    # Cross-replica context: the update writes every replica's copy.
    ema.update()
    assert ema.step == expected.step
    assert_within_tolerance(ema_values(expected), ema_values(ema))
    assert_mirrored(ema.variables + ema._state.counters)

    path = str(tmp_path / "ema.npz")
    fresh = reload_state_into_fresh_ema(ema, model, path, **HP)
    assert_mirrored(fresh.variables + fresh._state.counters)


def posthoc_snapshots(directory: str, scope=contextlib.nullcontext) -> dict:
    """Fits the conftest model (no BatchNormalization) with a `PostHocEMA`
    built under `scope()`; returns each snapshot's averages by step."""
    x, y = make_data(64)
    with scope():
        model = make_model(**NO_BN)
        callback = keras_ema.PostHocEMA(directory, snapshot_every=3, verbose=0)
    model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=[callback],
    )
    callback.wait()
    return {
        step: posthoc.read_snapshot(path).averaged
        for step, path in snapshot_paths(directory)
    }


@tf_only
def test_mirrored_strategy_posthoc_snapshots_equal_single_device(tmp_path):
    expected = posthoc_snapshots(str(tmp_path / "one_device"))
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    strategy = mirrored_strategy()
    snapshots = posthoc_snapshots(str(tmp_path / "mirrored"), strategy.scope)
    steps = EPOCHS * 64 // BATCH_SIZE
    assert list(snapshots) == list(expected) == [3, 6, steps]
    for step, averaged in expected.items():
        assert snapshots[step].keys() == averaged.keys()
        for path, values in averaged.items():
            np.testing.assert_allclose(
                snapshots[step][path], values, rtol=0, atol=TOLERANCE, err_msg=path
            )


# --------------------------------------------------------------------------
# torch: refusals


torch_only = pytest.mark.skipif(BACKEND != "torch", reason="torch backend only.")


@torch_only
def test_torch_refuses_a_keras_distribution():
    model = make_model()
    x, y = make_data(16)
    try:
        distribution = keras.distribution.DataParallel(devices=["cpu:0"])
    except AttributeError as error:
        # Before Keras 3.15 `DataParallel` calls the backend's
        # `distribution_lib.num_processes()`, and that module is `None` on
        # torch: there is no distribution to refuse.
        if "num_processes" not in str(error):
            raise
        pytest.skip("This Keras cannot create a keras.distribution on torch.")
    keras.distribution.set_distribution(distribution)
    try:
        with pytest.raises(ValueError, match="keras.distribution"):
            keras_ema.EMA(**HP).set_model(model)
    finally:
        keras.distribution.set_distribution(None)

    # A distribution set after the EMA was created is refused by `fit`.
    ema = keras_ema.EMA(**HP)
    ema.set_model(model)
    online = float_weights(model)
    with (
        distribution.scope(),
        pytest.raises(ValueError, match="keras.distribution"),
    ):
        model.fit(x, y, verbose=0, callbacks=[ema])
    assert_bit_equal(online, float_weights(model))


@torch_only
def test_torch_refuses_weights_on_several_devices():
    import torch

    model = make_model()
    weight = model.weights[0]
    weight._value = torch.nn.Parameter(
        torch.empty(weight.shape, device="meta"), requires_grad=False
    )
    with pytest.raises(ValueError, match="one device"):
        keras_ema.EMA(**HP).set_model(model)
