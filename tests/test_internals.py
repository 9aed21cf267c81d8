"""The private Keras internals keras_ema relies on still exist and behave."""

from __future__ import annotations

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


def test_running_fit_exposes_the_callbacks_and_whether_fit_validates():
    from keras_ema import _internals

    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["callbacks"] = _internals.fit_callbacks(self.model)
            seen["validates"] = _internals.fit_validates(self.model)

    model = make_model()
    x, y = make_data(16)
    probe = Probe()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[probe])
    assert probe in seen["callbacks"] and seen["validates"] is False
    model.fit(x, y, epochs=1, verbose=0, callbacks=[probe], validation_split=0.5)
    assert seen["validates"] is True
    model.fit(x, y, epochs=1, verbose=0, callbacks=[probe], validation_data=(x, y))
    assert seen["validates"] is True
    assert _internals.fit_callbacks(model) == []
    assert _internals.fit_validates(model) is None


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
