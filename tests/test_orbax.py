"""The EMA with Keras' Orbax checkpoints, in one process.

- `keras.callbacks.OrbaxCheckpoint` saves carry the state of every EMA
  attached to the model (every profile, the counters), and
  `model.load_weights(directory)` restores it, checked first;
- `keras_ema.EMAOrbaxCheckpoint` saves the EMA weights as a plain Keras
  Orbax checkpoint;
- on TensorFlow and torch the shadows are saved as NumPy arrays (as Keras
  saves the weights there), on JAX as they are sharded; a checkpoint of
  one backend restores on the others;
- what is refused: Keras before 3.14; without orbax-checkpoint nothing
  changes.

The runs across processes are in tests/test_multiprocess.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import assert_bit_equal
from conftest import float_weights
from conftest import make_data
from conftest import make_model
from keras import ops

import keras_ema
from keras_ema.saving import orbax_state


def _orbax_installed() -> bool:
    try:
        return importlib.util.find_spec("orbax.checkpoint") is not None
    except ModuleNotFoundError:
        return False


HAS_ORBAX_CHECKPOINT = hasattr(keras.callbacks, "OrbaxCheckpoint")
needs_orbax = pytest.mark.skipif(
    not HAS_ORBAX_CHECKPOINT or not _orbax_installed(),
    reason="The EMA rides along with OrbaxCheckpoint with Keras 3.14+ and "
    "orbax-checkpoint installed (pip install 'keras-ema[orbax]').",
)
needs_jax = pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.")

TOLERANCE = 1e-5
BATCH_SIZE = 8


def profiles():
    return {
        "fast": keras_ema.WarmupSchedule(beta=0.9, update_after_step=2, update_every=1),
        "slow": keras_ema.WarmupSchedule(
            beta=0.99, update_after_step=2, update_every=2
        ),
    }


def profile_values(ema) -> dict:
    """Every profile's shadows, keyed `(profile, path)`."""
    state = ema._flushed_state()
    return {
        (profile.name, path): ops.convert_to_numpy(shadow.value).copy()
        for profile in state.profiles
        for path, shadow in zip(state.paths, profile.shadows, strict=True)
    }


def fit(model, callbacks, epochs=1, initial_epoch=0):
    x, y = make_data(48)
    return model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        validation_data=make_data(16, seed=1),
        callbacks=callbacks,
    )


class AtEpochEnd(keras.callbacks.Callback):
    """Records the EMA (every profile) and the model's weights at every
    epoch's end."""

    def __init__(self, ema):
        super().__init__()
        self.ema = ema
        self.seen = {}

    def on_epoch_end(self, epoch, logs=None):
        self.seen[epoch] = (
            self.ema.step,
            profile_values(self.ema),
            float_weights(self.model),
        )


def saved_checkpoint(directory, **checkpoint_kwargs):
    """A fitted model with an EMA of two profiles, saved in `directory` with
    `OrbaxCheckpoint` after each of 2 epochs."""
    model = make_model()
    ema = keras_ema.EMA(profiles=profiles())
    checkpoint = keras.callbacks.OrbaxCheckpoint(str(directory), **checkpoint_kwargs)
    fit(model, [ema, checkpoint], epochs=2)
    return model, ema


def assert_close(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        np.testing.assert_allclose(
            actual[key], expected[key], rtol=0, atol=TOLERANCE, err_msg=str(key)
        )


# --------------------------------------------------------------------------
# The EMA rides along with OrbaxCheckpoint


@needs_orbax
def test_resume_from_orbax_checkpoint_equals_uninterrupted(tmp_path):
    directory = str(tmp_path / "ckpt")
    keras.utils.set_random_seed(3)
    initial = make_model().get_weights()

    def fresh():
        keras.backend.clear_session()
        model = make_model()
        model.set_weights(initial)
        return model, keras_ema.EMA(profiles=profiles())

    model, ema = fresh()
    fit(model, [ema], epochs=4)
    uninterrupted = (ema.step, profile_values(ema), float_weights(model))

    model, ema = fresh()
    probe = AtEpochEnd(ema)
    # Saved in the background (Keras' default), every epoch; only the
    # latest step is kept.
    fit(model, [ema, probe, keras.callbacks.OrbaxCheckpoint(directory)], epochs=2)
    assert sorted(os.listdir(directory)) == ["1"]
    assert orbax_state.NAME in os.listdir(os.path.join(directory, "1"))
    saved_step, saved_ema, _ = probe.seen[1]

    # A new process would do the same: build, attach the EMA, load, fit on.
    keras.backend.clear_session()
    keras.utils.set_random_seed(4)
    model = make_model()
    ema = keras_ema.EMA(profiles=profiles())
    ema.set_model(model)
    model.load_weights(directory)
    assert ema.step == saved_step == 12
    assert_bit_equal(saved_ema, profile_values(ema))

    fit(model, [ema, keras.callbacks.OrbaxCheckpoint(directory)], 4, initial_epoch=2)
    assert ema.step == uninterrupted[0] == 24
    assert_close(uninterrupted[1], profile_values(ema))
    assert_close(uninterrupted[2], float_weights(model))


KERAS_VERSION = tuple(int(part) for part in keras.__version__.split(".")[:2])


@needs_orbax
@needs_jax
@pytest.mark.xfail(
    KERAS_VERSION < (3, 15),
    reason="Under a keras.distribution, Keras 3.14's load_weights reads the "
    "metadata of the step's first pytree checkpointable by name (Orbax 0.12.8 "
    "resolves `pytree_metadata` so), `keras_ema` or its own `model_config`, "
    "not `pytree`; Keras 3.15 names `pytree`.",
    raises=KeyError,
    strict=True,
)
def test_sharded_ema_restored_with_its_own_sharding(tmp_path):
    """Under `ModelParallel` on this process's four devices, saved every 3
    batches without the background: each shadow comes back sharded like its
    weight."""
    from test_distribution import assert_laid_out_like_weights
    from test_distribution import model_parallel

    directory = str(tmp_path / "ckpt")
    distribution = model_parallel()
    with distribution.scope():
        model = make_model()
        ema = keras_ema.EMA(profiles=profiles())
        checkpoint = keras.callbacks.OrbaxCheckpoint(
            directory, save_freq=3, save_on_background=False
        )
        fit(model, [ema, checkpoint])
    assert sorted(os.listdir(directory)) == ["6"]
    saved = profile_values(ema)

    keras.backend.clear_session()  # Also unsets the distribution.
    with distribution.scope():
        model = make_model()
        resumed = keras_ema.EMA(profiles=profiles())
        resumed.set_model(model)
        model.load_weights(directory)
    assert resumed.step == ema.step == 6
    assert_bit_equal(saved, profile_values(resumed))
    for profile in resumed._state.profiles:
        assert_laid_out_like_weights(profile.shadows, resumed._state.weights)


@needs_orbax
@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute.")
@pytest.mark.xfail(
    reason="Keras' own OrbaxCheckpoint fails under tf.distribute, with or "
    "without the EMA (Keras 3.14, 3.15): its `set_model` takes `int()` of the "
    "optimizer's `iterations`, a `MirroredVariable`, a `TypeError`.",
    raises=TypeError,
    strict=True,
)
def test_mirrored_ema_saved_and_restored_into_every_replica(tmp_path):
    """Under `tf.distribute.MirroredStrategy` on two logical CPUs: the
    checkpoint holds one copy of each shadow, restored into every replica."""
    from test_distribution import NO_BN
    from test_distribution import assert_mirrored
    from test_distribution import mirrored_strategy

    directory = str(tmp_path / "ckpt")
    strategy = mirrored_strategy()
    with strategy.scope():
        model = make_model(**NO_BN)
        ema = keras_ema.EMA(profiles=profiles())
    checkpoint = keras.callbacks.OrbaxCheckpoint(directory, save_on_background=False)
    fit(model, [ema, checkpoint])
    saved = profile_values(ema)

    keras.backend.clear_session()
    with strategy.scope():
        model = make_model(**NO_BN)
        resumed = keras_ema.EMA(profiles=profiles())
        resumed.set_model(model)
    model.load_weights(directory)
    assert resumed.step == ema.step == 6
    assert_bit_equal(saved, profile_values(resumed))
    assert_mirrored(resumed.variables + resumed._state.counters)


@needs_orbax
def test_every_attached_ema_rides_along_under_its_own_name(tmp_path):
    directory = str(tmp_path / "ckpt")
    model = make_model()
    first = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    fit(model, [first])
    # `first` stays attached: the checkpoints of this fit carry it too.
    second = keras_ema.EMA(profiles=profiles())
    checkpoint = keras.callbacks.OrbaxCheckpoint(directory, save_on_background=False)
    fit(model, [second, checkpoint])
    assert first.step == second.step == 6
    step_folder = os.listdir(os.path.join(directory, "0"))
    assert {"keras_ema", "keras_ema_1"} <= set(step_folder)

    keras.backend.clear_session()
    other = make_model()
    other_first = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    other_second = keras_ema.EMA(profiles=profiles())
    other_first.set_model(other)
    other_second.set_model(other)
    other.load_weights(directory)
    assert_bit_equal(profile_values(first), profile_values(other_first))
    assert_bit_equal(profile_values(second), profile_values(other_second))


@needs_orbax
def test_load_weights_refuses_an_ema_state_that_does_not_fit_first(tmp_path):
    directory = tmp_path / "ckpt"
    saved_checkpoint(directory, save_on_background=False)

    def refused(model, ema, match):
        ema.set_model(model)
        weights, before = float_weights(model), profile_values(ema)
        with pytest.raises(ValueError, match=match):
            model.load_weights(str(directory))
        assert_bit_equal(weights, float_weights(model))
        assert_bit_equal(before, profile_values(ema))

    keras.backend.clear_session()
    refused(make_model(), keras_ema.EMA(), r"keras_ema'.*holds the EMA profiles")
    keras.backend.clear_session()
    refused(
        make_model(batch_norm=False),
        keras_ema.EMA(profiles=profiles()),
        "holds 8 EMA variables but the model has 4",
    )


@needs_orbax
@pytest.mark.parametrize("damage", ["header", "shape"])
def test_load_weights_refuses_a_damaged_ema_state_first(tmp_path, damage):
    from orbax.checkpoint import v1 as ocp

    model = make_model()
    ema = keras_ema.EMA(profiles=profiles())
    ema.set_model(model)
    tree = ema.state_store.orbax_tree()
    if damage == "header":
        tree["header"] = '{"format": "something else"}'
        match = "not a valid keras_ema state: its header does not name"
    else:
        tree["shadows"][1][0] = np.zeros((2, 2), np.float32)
        match = r"is corrupt: variable 'net/d1/kernel' is stored with shape \[2, 2\]"
    directory = str(tmp_path / "ckpt")
    ocp.training.Checkpointer(directory).save_checkpointables(0, {"keras_ema": tree})

    weights, before = float_weights(model), profile_values(ema)
    with pytest.raises(ValueError, match=match):
        model.load_weights(directory)
    assert_bit_equal(weights, float_weights(model))
    assert_bit_equal(before, profile_values(ema))


@needs_orbax
def test_orbax_checkpoint_without_ema_state_resets_an_ema_that_never_updated(
    tmp_path,
):
    directory = str(tmp_path / "ckpt")
    fit(make_model(), [keras.callbacks.OrbaxCheckpoint(directory)])
    keras.backend.clear_session()
    keras.utils.set_random_seed(5)
    model = make_model()
    ema = keras_ema.EMA(profiles=profiles())
    ema.set_model(model)
    model.load_weights(directory)
    loaded = float_weights(model)
    for (_, path), value in profile_values(ema).items():
        np.testing.assert_array_equal(value, loaded[path])


@needs_orbax
def test_shadows_are_stored_as_keras_stores_the_weights(tmp_path):
    """NumPy arrays on TensorFlow and torch, JAX arrays on JAX: Orbax stores
    the EMA's shadows with the same kind of metadata as Keras' weights."""
    from orbax.checkpoint import v1 as ocp

    directory = tmp_path / "ckpt"
    saved_checkpoint(directory, save_on_background=False)
    step = str(directory / "1")
    saved = ocp.checkpointables_metadata(step).metadata
    weights = keras.tree.flatten(saved["pytree"]["trainable_variables"])
    shadows = [array for row in saved[orbax_state.NAME]["shadows"] for array in row]
    expected = "ArrayMetadata" if BACKEND == "jax" else "NumpyMetadata"
    assert {type(a).__name__ for a in weights} == {expected}
    assert {type(a).__name__ for a in shadows} == {expected}
    assert len(shadows) == 2 * 8


@needs_orbax
def test_ema_state_saved_on_another_backend_restores(tmp_path):
    """A checkpoint of JAX (JAX arrays) restores on TensorFlow and torch, one
    of TensorFlow or torch (NumPy arrays) on JAX, bit for bit."""
    import jax.numpy as jnp
    from orbax.checkpoint import v1 as ocp

    model = make_model()
    ema = keras_ema.EMA(profiles=profiles())
    fit(model, [ema])
    tree = ema.state_store.orbax_tree()
    other_kind = np.asarray if BACKEND == "jax" else jnp.asarray
    tree["shadows"] = [[other_kind(a) for a in row] for row in tree["shadows"]]
    directory = str(tmp_path / "ckpt")
    ocp.training.Checkpointer(directory).save_checkpointables(0, {"keras_ema": tree})

    resumed = keras_ema.EMA(profiles=profiles())
    resumed.set_model(make_model())
    step_path = os.path.join(directory, "0")
    resumed.state_store.apply(*resumed.state_store.read_orbax(step_path, "keras_ema"))
    assert resumed.step == ema.step == 6
    assert_bit_equal(profile_values(ema), profile_values(resumed))


def test_without_orbax_installed_the_ema_saves_and_loads_as_before(
    tmp_path, monkeypatch
):
    # Importing orbax fails from here on, as where it is not installed.
    monkeypatch.setitem(sys.modules, "orbax", None)
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    model = make_model()
    ema = keras_ema.EMA(profiles=profiles())
    fit(model, [ema])
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    keras.backend.clear_session()
    other = make_model()
    resumed = keras_ema.EMA(profiles=profiles())
    resumed.set_model(other)
    other.load_weights(path)
    assert resumed.step == ema.step == 6
    assert_bit_equal(profile_values(ema), profile_values(resumed))
    assert_bit_equal(float_weights(model), float_weights(other))


# --------------------------------------------------------------------------
# EMA weights as an Orbax checkpoint


def functional_model():
    """The conftest model, functional: Keras 3.15's `load_model` of an Orbax
    checkpoint restores no weight of a `Sequential` model (it matches
    variable paths, which lose the model's name when it is rebuilt)."""
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu", name="d1")(inputs)
    hidden = keras.layers.BatchNormalization(name="bn")(hidden)
    outputs = keras.layers.Dense(1, name="d2")(hidden)
    model = keras.Model(inputs, outputs, name="net")
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    return model


@needs_orbax
@pytest.mark.parametrize("ema_first", [True, False])
def test_ema_orbax_checkpoint_holds_the_ema_weights_in_any_order(tmp_path, ema_first):
    directory = str(tmp_path / "ema")
    model = functional_model()
    ema = keras_ema.EMA(profiles=profiles())
    export = keras_ema.EMAOrbaxCheckpoint(ema, directory, profile="slow")
    probe = AtEpochEnd(ema)
    callbacks = [ema, export] if ema_first else [export, ema]
    fit(model, [probe, *callbacks], epochs=2)
    _, ema_values, online = probe.seen[1]
    slow = [v for (name, _), v in ema_values.items() if name == "slow"]
    # The training model keeps its online weights.
    assert_bit_equal(online, float_weights(model))
    assert not np.array_equal(slow[0], online["d1/kernel"])

    keras.backend.clear_session()
    loaded = keras.models.load_model(directory)
    for weight, value in zip(loaded.weights, slow, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(weight.value), value)
    keras.backend.clear_session()
    other = functional_model()
    other.load_weights(directory)
    for weight, value in zip(other.weights, slow, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(weight.value), value)


@needs_orbax
def test_ema_weights_saved_with_orbax_inside_swap_weights_load(tmp_path):
    """Outside `fit`: the recipe of docs/distributed.md (Orbax saves JAX and
    NumPy arrays: NumPy copies on TensorFlow and torch)."""
    from orbax.checkpoint import v1 as ocp

    model = make_model()
    ema = keras_ema.EMA(profiles=profiles())
    fit(model, [ema])
    online = float_weights(model)
    directory = str(tmp_path / "ema")
    value_format = "backend_tensor" if BACKEND == "jax" else "numpy_array"
    with ema.swap_weights("fast"):
        state = model.get_state_tree(value_format)
        weights = {
            k: state[k] for k in ("trainable_variables", "non_trainable_variables")
        }
        with ocp.training.Checkpointer(directory) as saver:
            saver.save_checkpointables(0, {"pytree": weights}, overwrite=True)
    assert_bit_equal(online, float_weights(model))

    fast = [v for (name, _), v in profile_values(ema).items() if name == "fast"]
    keras.backend.clear_session()
    other = make_model()
    other.load_weights(directory)
    for weight, value in zip(other.weights, fast, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(weight.value), value)


@pytest.mark.skipif(not HAS_ORBAX_CHECKPOINT, reason="Keras 3.14+.")
def test_ema_orbax_checkpoint_needs_an_ema_callback(tmp_path):
    with pytest.raises(ValueError, match="`ema` must be a `keras_ema.EMA`"):
        keras_ema.EMAOrbaxCheckpoint(keras.callbacks.History(), str(tmp_path))


def test_before_keras_3_14_orbax_checkpoints_are_refused_naming_the_version(
    tmp_path, monkeypatch
):
    monkeypatch.delattr(keras.callbacks, "OrbaxCheckpoint", raising=False)
    with pytest.raises(ValueError, match=f"Installed: Keras {keras.__version__}"):
        keras_ema.EMAOrbaxCheckpoint(keras_ema.EMA(), str(tmp_path))
    # Without Orbax checkpoints in Keras, the EMA trains as before.
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    fit(model, [ema])
    assert ema.step == 6
