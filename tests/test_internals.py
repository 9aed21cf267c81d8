"""The private Keras internals keras_ema relies on still exist and behave."""

from __future__ import annotations

import contextlib
import inspect
import pathlib

import keras
import pytest
from conftest import BACKEND
from conftest import make_data
from conftest import make_model

from keras_ema import _internals


def test_fit_validates_through_evaluate_with_the_cached_dataset_flag():
    source = inspect.getsource(type(make_model()).fit)
    assert "self.evaluate(" in source
    assert _internals.CACHED_EVAL_KWARG in source


def test_wrap_evaluate_is_undone():
    model = make_model()
    unwrap = _internals.wrap_evaluate(model, lambda keras_evaluate, *a, **k: "x")
    assert model.evaluate() == "x"
    unwrap()
    assert "evaluate" not in model.__dict__


def test_raw_iterations_is_the_optimizer_counter_variable():
    optimizer = keras.optimizers.SGD(gradient_accumulation_steps=2)
    optimizer.build([keras.Variable(1.0)])
    counter = _internals.raw_iterations(optimizer)
    assert any(counter is v for v in optimizer.variables)


# The Keras range of pyproject.toml; CI runs the suite on 3.12, 3.14 and 3.15.
SUPPORTED_KERAS = ((3, 12), (3, 16))
PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_supported_keras_version():
    low, high = SUPPORTED_KERAS
    assert low <= _internals.keras_version()[:2] < high


@pytest.mark.skipif(not PYPROJECT.exists(), reason="Needs the source tree.")
def test_supported_keras_version_is_the_range_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (low, high) = SUPPORTED_KERAS
    expected = f"keras>={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    assert expected in dependencies


def test_train_function_attribute_is_used_by_fit():
    source = inspect.getsource(type(make_model()).fit)
    assert "self.train_function(" in source
    assert "self.make_train_function()" in source


def test_model_checkpoint_writes_through_save_model():
    assert callable(getattr(keras.callbacks.ModelCheckpoint, "_save_model", None))
    source = inspect.getsource(keras.callbacks.ModelCheckpoint.on_epoch_end)
    assert "self._save_model(" in source


@pytest.mark.skipif(BACKEND != "jax", reason="JAX trainer only.")
def test_jax_train_out_shardings_mirror_keras_make_train_function():
    source = inspect.getsource(type(make_model()).make_train_function)
    assert "self._get_state_sharding_spec()" in source
    assert "out_shardings = (None, state_shardings)" in source

    assert _internals.jax_train_out_shardings(make_model()) is None
    devices = keras.distribution.list_devices()
    with keras.distribution.DataParallel(devices=devices).scope():
        model = make_model()
        model.optimizer.build(model.trainable_variables)
        logs_sharding, state = _internals.jax_train_out_shardings(model)
    assert logs_sharding is None
    groups = (
        model.trainable_variables,
        model.non_trainable_variables,
        model.optimizer.variables,
        model.metrics_variables,
    )
    assert len(state) == len(groups)
    for shardings, variables in zip(state, groups, strict=True):
        assert shardings == [v.value.sharding for v in variables]


@pytest.mark.skipif(BACKEND != "jax", reason="JAX trainer only.")
@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("distributed", [False, True])
def test_jit_keras_train_step_is_keras_own_jitted_step(jit_compile, distributed):
    # `jit_keras_train_step` copies how `JAXTrainer.make_train_function`
    # jits the train step. A failure means that Keras now jits (or wraps)
    # its step otherwise: the EMA's train functions would run a step that
    # differs from Keras' own (other donation, shardings or function), and
    # the copy must follow Keras.
    from unittest import mock

    from keras.src.backend.config import is_nnx_enabled
    from keras.src.backend.jax import trainer as jax_trainer

    # Keras' nnx branch wraps the step in a lambda; the copy omits it, as
    # keras_ema does not support nnx.
    assert not is_nnx_enabled()
    scope = contextlib.nullcontext()
    if distributed:
        devices = keras.distribution.list_devices()
        scope = keras.distribution.DataParallel(devices=devices).scope()
    calls = []

    def recording_jit(function, **kwargs):
        calls.append((function, kwargs))
        return function

    with scope:
        model = make_model(jit_compile=jit_compile)
        model.optimizer.build(model.trainable_variables)
        with mock.patch.object(jax_trainer, "jit", recording_jit):
            model.make_train_function(force=True)
        with mock.patch("jax.jit", recording_jit):
            ours = _internals.jit_keras_train_step(model)
    if not jit_compile:
        assert calls == [] and ours == model.train_step
        return
    (keras_function, keras_kwargs), (our_function, our_kwargs) = calls
    assert keras_function == our_function == model.train_step
    assert keras_kwargs == our_kwargs


@pytest.mark.skipif(BACKEND != "jax", reason="JAX trainer only.")
@pytest.mark.parametrize("steps_per_execution", [1, 3])
@pytest.mark.parametrize("available", [0, 1, 2, 3, 5])
def test_batches_takes_what_keras_iterator_step_takes(steps_per_execution, available):
    # `batches` copies how `JAXTrainer._make_function`'s `iterator_step`
    # takes one call's batches. A failure means that Keras now takes them
    # otherwise, and the EMA's train functions would run other steps.
    model = make_model(steps_per_execution=steps_per_execution)

    def keras_taken():
        taken = []

        def step_function(state, data):
            taken.append(data)
            return None, state

        iterator_step = model._make_function(step_function)
        try:
            iterator_step(None, iter(range(available)))
        except StopIteration:
            return None
        return taken

    def ours_taken():
        try:
            return list(_internals.batches(iter(range(available)), steps_per_execution))
        except StopIteration:
            return None

    assert ours_taken() == keras_taken()


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's XLA op.")
def test_tf_optimization_barrier_passes_values_through_under_xla():
    import numpy as np
    import tensorflow as tf

    values = [tf.constant([1.5, 2.5], tf.bfloat16), tf.constant(3.0)]
    barrier = tf.function(_internals.tf_optimization_barrier, jit_compile=True)
    out = barrier(values)
    assert len(out) == len(values)
    for got, want in zip(out, values, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_running_fit_exposes_the_callbacks_and_whether_fit_validates():
    from keras_ema import _internals

    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            context = _internals.fit_context(self.model)
            seen["callbacks"] = context.callbacks
            seen["validates"] = context.validates
            seen["batch_size"] = context.batch_size

    model = make_model()
    x, y = make_data(16)
    probe = Probe()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[probe], batch_size=4)
    assert probe in seen["callbacks"] and seen["validates"] is False
    assert seen["batch_size"] == 4
    model.fit(x, y, epochs=1, verbose=0, callbacks=[probe], validation_split=0.5)
    assert seen["validates"] is True
    model.fit(x, y, epochs=1, verbose=0, callbacks=[probe], validation_data=(x, y))
    assert seen["validates"] is True
    assert _internals.fit_callbacks(model) == []
    assert _internals.fit_context(model) == ([], None, None)


needs_orbax_checkpoint = pytest.mark.skipif(
    not hasattr(keras.callbacks, "OrbaxCheckpoint"),
    reason="keras.callbacks.OrbaxCheckpoint exists from Keras 3.14 on.",
)


@needs_orbax_checkpoint
def test_orbax_checkpoint_saves_its_payload_through_its_checkpointer():
    checkpoint_class = keras.callbacks.OrbaxCheckpoint
    source = inspect.getsource(checkpoint_class._save_checkpoint)
    assert "self.checkpointer.save_checkpointables(step, payload)" in source
    assert "self.checkpointer.save_checkpointables_async(" in source
    assert "self._save_checkpoint(" in inspect.getsource(checkpoint_class.on_epoch_end)
    assert list(inspect.signature(checkpoint_class._save_checkpoint).parameters) == [
        "self",
        "step",
        "logs",
    ]

    saved = []

    class Checkpointer:
        def save_checkpointables(self, step, checkpointables):
            saved.append((step, checkpointables))

        def save_checkpointables_async(self, step, checkpointables):
            saved.append(("async", step, checkpointables))

        def wait(self):
            return "waited"

    class Checkpoint:
        checkpointer = Checkpointer()

    checkpoint = Checkpoint()
    _internals.add_orbax_checkpointables(checkpoint, lambda: {"extra": 1})
    checkpoint.checkpointer.save_checkpointables(3, {"pytree": 0})
    # A second call replaces the extra checkpointables, wrapping once.
    _internals.add_orbax_checkpointables(checkpoint, lambda: {"extra": 2})
    checkpoint.checkpointer.save_checkpointables_async(4, {"pytree": 0})
    assert saved == [
        (3, {"pytree": 0, "extra": 1}),
        ("async", 4, {"pytree": 0, "extra": 2}),
    ]
    assert checkpoint.checkpointer.wait() == "waited"
    assert checkpoint.checkpointer.checkpointer.__class__ is Checkpointer


@needs_orbax_checkpoint
def test_orbax_checkpoint_step_follows_keras_load_weights(tmp_path):
    from keras.src.saving import saving_api

    source = inspect.getsource(saving_api.load_weights)
    assert "elif is_orbax_checkpoint(filepath):" in source
    assert "find_latest_orbax_checkpoint(filepath)" in source
    assert _internals.orbax_checkpoint_step(tmp_path / "w.weights.h5") is None
    assert _internals.orbax_checkpoint_step(tmp_path / "missing") is None
    assert _internals.orbax_checkpoint_step(tmp_path) is None  # an empty folder


def test_orbax_checkpoint_class_names_the_keras_version(monkeypatch):
    monkeypatch.delattr(keras.callbacks, "OrbaxCheckpoint", raising=False)
    with pytest.raises(
        ValueError, match=f"3.14 on. Installed: Keras {keras.__version__}"
    ):
        _internals.orbax_checkpoint_class()
    assert _internals.optional_orbax_checkpoint_class() is None


def test_use_variables_makes_every_layer_compute_with_the_new_variables():
    import numpy as np
    from keras import ops

    model = make_model(batch_norm=False)
    clone = keras.models.clone_model(model)
    replacements = {
        id(copy): keras.Variable(np.full(copy.shape, 0.5, "float32"))
        for copy in clone.weights
    }
    _internals.use_variables(clone, replacements)
    assert [id(w) for w in clone.weights] == [id(replacements[k]) for k in replacements]
    for layer in clone.layers:
        for value in vars(layer).values():
            assert not (isinstance(value, keras.Variable) and id(value) in replacements)
    x = np.ones((1, model.inputs[0].shape[-1]), "float32")
    inputs = x
    for layer in model.layers:
        kernel = np.full(layer.kernel.shape, 0.5, "float32")
        inputs = inputs @ kernel + 0.5
        if layer.activation is keras.activations.relu:
            inputs = np.maximum(inputs, 0)
    np.testing.assert_allclose(ops.convert_to_numpy(clone(x)), inputs, rtol=1e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX only.")
def test_jax_values_while_tracing_makes_a_variable_an_input_of_the_trace():
    import jax
    import numpy as np

    variable = keras.Variable(np.zeros(2, "float32"))
    original = variable.value

    @jax.jit
    def read(value):
        with _internals.jax_values_while_tracing([variable], [value]):
            return variable.value * 2

    np.testing.assert_array_equal(read(np.ones(2, "float32")), [2, 2])
    np.testing.assert_array_equal(read(np.full(2, 3, "float32")), [6, 6])
    assert variable.value is original


@pytest.mark.skipif(BACKEND != "jax", reason="JAX only.")
def test_jax_state_writer_writes_the_slots_of_keras_train_state():
    model = make_model()
    model.compile(optimizer="sgd", loss="mse")
    variables = [model.non_trainable_variables, model.trainable_variables]
    extra = keras.Variable(1.0)
    targets = [model.trainable_variables[1], extra]
    write = _internals.jax_state_writer(model, targets)
    state = (
        [v.value for v in variables[1]],
        [v.value for v in variables[0]],
        ["optimizer"],
        ["metrics"],
    )
    written = write(state, ["new", "ignored"])
    assert written[0][1] == "new"
    assert written[0][0] is state[0][0]
    assert written[2:] == (["optimizer"], ["metrics"])


@pytest.mark.skipif(BACKEND != "jax", reason="JAX only.")
def test_jax_hold_arrays_makes_the_variable_read_the_array():
    import jax.numpy as jnp

    variable = keras.Variable(jnp.zeros(3))
    array = jnp.arange(3.0)
    _internals.jax_hold_arrays([variable], [array])
    assert variable.value is array
