"""State files, resume and low-precision shadows."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import assert_bit_equal
from conftest import assert_close
from conftest import ema_values
from conftest import make_data
from conftest import make_model
from conftest import reload_state_into_fresh_ema
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_ema
from keras_ema.saving.sidecars import sidecar_path

HP = dict(beta=0.99, update_after_step=2, update_every=1)


def trained(epochs=1, **hp):
    model = make_model()
    ema = keras_ema.EMA(**(hp or HP))
    x, y = make_data(48)
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, callbacks=[ema])
    return model, ema


def test_save_and_load_round_trip(tmp_path):
    model, ema = trained()
    reload_state_into_fresh_ema(ema, model, str(tmp_path / "ema.npz"), **HP)


def test_loads_into_a_model_reloaded_with_load_model(tmp_path):
    model, ema = trained()
    model.save(tmp_path / "m.keras")
    ema.save_state(str(tmp_path / "ema.npz"))
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    other = keras_ema.EMA(**HP)
    other.set_model(reloaded)
    other.load_state(str(tmp_path / "ema.npz"))
    assert [v.tolist() for v in other.get_weights()] == [
        v.tolist() for v in ema.get_weights()
    ]


def test_resume_equals_uninterrupted(tmp_path):
    x, y = make_data(48)
    keras.utils.set_random_seed(3)
    full = make_model()
    initial = full.get_weights()
    full_ema = keras_ema.EMA(**HP)
    full.fit(
        x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[full_ema]
    )

    keras.backend.clear_session()
    first = make_model()
    first.set_weights(initial)
    first_ema = keras_ema.EMA(**HP)
    first.fit(
        x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[first_ema]
    )
    first.save(tmp_path / "m.keras")
    first_ema.save_state(str(tmp_path / "ema.npz"))

    resumed = keras.models.load_model(tmp_path / "m.keras")
    resumed_ema = keras_ema.EMA(**HP)
    resumed_ema.set_model(resumed)
    resumed_ema.load_state(str(tmp_path / "ema.npz"))
    resumed.fit(
        x,
        y,
        batch_size=8,
        epochs=4,
        initial_epoch=2,
        shuffle=False,
        verbose=0,
        callbacks=[resumed_ema],
    )
    assert resumed_ema.step == full_ema.step == 24
    assert_close(
        dict(enumerate(ema_values(full_ema).values())),
        dict(enumerate(ema_values(resumed_ema).values())),
        rtol=1e-5,
        atol=1e-6,
    )


def test_other_architecture_is_refused_naming_the_variable(tmp_path):
    _, ema = trained()
    path = str(tmp_path / "ema.npz")
    ema.save_state(path)
    keras.backend.clear_session()
    other = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(9, name="d1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(1, name="d2"),
        ],
        name="net",
    )
    other_ema = keras_ema.EMA(**HP)
    other_ema.set_model(other)
    before = ema_values(other_ema)
    with pytest.raises(ValueError, match="net/d1/kernel.*shape"):
        other_ema.load_state(path)
    assert_bit_equal(before, ema_values(other_ema))
    assert other_ema.step == 0


def test_missing_variable_is_refused(tmp_path):
    _, ema = trained()
    path = str(tmp_path / "ema.npz")
    ema.save_state(path)
    keras.backend.clear_session()
    smaller = make_model(batch_norm=False)
    small_ema = keras_ema.EMA(**HP)
    small_ema.set_model(smaller)
    with pytest.raises(ValueError, match="moving_mean"):
        small_ema.load_state(path)


def test_pickle_is_refused_without_executing_anything(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.npz"
    np.savez(path, header=np.array([Exploit()], dtype=object))
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Exploit()))
    model, ema = trained()
    before = ema_values(ema)
    for bad in (path, raw):
        with pytest.raises(ValueError, match="not a valid keras_ema state file"):
            ema.load_state(str(bad))
    assert not marker.exists()
    assert_bit_equal(before, ema_values(ema))


def test_not_a_state_file_is_refused(tmp_path):
    _, ema = trained()
    path = tmp_path / "weights.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match="header"):
        ema.load_state(str(path))


def test_save_is_atomic(tmp_path, monkeypatch):
    _, ema = trained()
    path = str(tmp_path / "ema.npz")
    ema.save_state(path)
    original = Path(path).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        ema.save_state(path)
    assert Path(path).read_bytes() == original
    assert os.listdir(tmp_path) == ["ema.npz"]


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    keras.backend.clear_session()
    model, ema = trained()
    path = tmp_path_factory.mktemp("state") / "ema.npz"
    ema.save_state(str(path))
    return model, ema, path.read_bytes()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_truncations_and_byte_flips_load_identically_or_raise(
    saved_state, tmp_path, data
):
    model, ema, good = saved_state
    if data.draw(st.booleans()):
        bad = good[: data.draw(st.integers(0, len(good) - 1))]
    else:
        position = data.draw(st.integers(0, len(good) - 1))
        flip = data.draw(st.integers(1, 255))
        bad = good[:position] + bytes([good[position] ^ flip]) + good[position + 1 :]
    path = tmp_path / "bad.npz"
    path.write_bytes(bad)
    before, step = ema_values(ema), ema.step
    try:
        ema.load_state(str(path))
    except ValueError:
        assert_bit_equal(before, ema_values(ema))
        assert ema.step == step
    else:
        assert_bit_equal(before, ema_values(ema))
        assert ema.step == step


def test_hyperparameters_in_file_differ_callback_keeps_its_own(tmp_path):
    model, ema = trained()
    path = str(tmp_path / "ema.npz")
    ema.save_state(path)
    other = keras_ema.EMA(beta=0.5, update_after_step=2, update_every=1)
    other.set_model(model)
    with pytest.warns(UserWarning, match="beta"):
        other.load_state(path)
    assert other.get_config()["beta"] == 0.5
    assert other.step == ema.step


def test_bfloat16_weights_get_float32_shadows_that_move():
    keras.config.set_dtype_policy("bfloat16")
    try:
        model = make_model(batch_norm=False)
    finally:
        keras.config.set_dtype_policy("float32")
    ema = keras_ema.EMA(
        beta=0.999, update_after_step=0, update_every=1, min_value=0.999
    )
    ema.set_model(model)
    assert {keras.backend.standardize_dtype(v.dtype) for v in ema.variables} == {
        "float32"
    }
    start = ema_values(ema)
    x, y = make_data(48)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[ema])
    moved = ema_values(ema)
    assert any(not np.array_equal(start[k], moved[k]) for k in start)
    online = {w.path: w.numpy() for w in model.weights}
    with ema.swap_weights():
        for weight in model.weights:
            assert keras.backend.standardize_dtype(weight.dtype) == "bfloat16"
    for weight in model.weights:
        np.testing.assert_array_equal(weight.numpy(), online[weight.path])


@pytest.mark.parametrize("ema_first", [True, False])
def test_ema_checkpoints_hold_ema_weights_in_any_order(tmp_path, ema_first):
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    every = keras_ema.EMAModelCheckpoint(ema, str(tmp_path / "e{epoch}.keras"))
    best = keras_ema.EMAModelCheckpoint(
        ema,
        str(tmp_path / "best.keras"),
        monitor="val_ema_loss",
        mode="min",
        save_best_only=True,
    )
    saved_at_epoch_end = {}

    class Capture(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved_at_epoch_end[epoch] = (ema.get_weights(), self.model.get_weights())

    x, y = make_data(48)
    callbacks = [ema, every, best] if ema_first else [every, best, ema]
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        validation_data=make_data(16, seed=1),
        verbose=0,
        callbacks=[Capture(), *callbacks],
    )
    for epoch in (0, 1):
        loaded = keras.models.load_model(tmp_path / f"e{epoch + 1}.keras")
        ema_weights, online = saved_at_epoch_end[epoch]
        for a, b in zip(loaded.get_weights(), ema_weights, strict=True):
            np.testing.assert_array_equal(a, b)
    best_epoch = int(np.argmin(history.history["val_ema_loss"]))
    loaded = keras.models.load_model(tmp_path / "best.keras")
    for a, b in zip(
        loaded.get_weights(), saved_at_epoch_end[best_epoch][0], strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.get_weights(), saved_at_epoch_end[1][1], strict=True):
        np.testing.assert_array_equal(a, b)


class PreemptAt(keras.callbacks.Callback):
    """Kills the run when epoch `epoch` begins, as a preemption would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt("preempted")


@pytest.mark.parametrize("ema_first", [True, False])
def test_backup_and_restore_resumes_the_ema_with_no_extra_code(tmp_path, ema_first):
    x, y = make_data(48)
    keras.utils.set_random_seed(3)
    initial = make_model().get_weights()
    backup_dir = str(tmp_path / "backup")

    def run(*callbacks):
        keras.backend.clear_session()
        model = make_model()
        model.set_weights(initial)
        ema = keras_ema.EMA(**HP)
        callbacks = [ema, *callbacks] if ema_first else [*callbacks, ema]
        model.fit(
            x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=callbacks
        )
        return model, ema

    full_model, full_ema = run()
    full = (full_ema.step, ema_values(full_ema), full_model.get_weights())

    with pytest.raises(KeyboardInterrupt):
        run(keras.callbacks.BackupAndRestore(backup_dir), PreemptAt(2))
    assert os.path.exists(sidecar_path(os.path.join(backup_dir, "latest.weights.h5")))

    model, ema = run(keras.callbacks.BackupAndRestore(backup_dir))
    assert ema.step == full[0] == 24
    assert_close(
        dict(enumerate(full[1].values())),
        dict(enumerate(ema_values(ema).values())),
        rtol=1e-5,
        atol=1e-6,
    )
    for a, b in zip(full[2], model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not os.path.exists(backup_dir)


def test_save_weights_carries_the_ema_state_and_load_weights_restores_it(tmp_path):
    model, ema = trained()
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    assert os.path.exists(sidecar_path(path))
    keras.backend.clear_session()
    other = make_model()
    other_ema = keras_ema.EMA(**HP)
    other_ema.set_model(other)
    other.load_weights(path)
    assert other_ema.step == ema.step
    assert_bit_equal(
        dict(enumerate(ema_values(ema).values())),
        dict(enumerate(ema_values(other_ema).values())),
    )


def test_load_weights_refuses_a_bad_ema_file_before_changing_anything(tmp_path):
    model, ema = trained()
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    Path(sidecar_path(path)).write_bytes(b"not a state file")
    keras.backend.clear_session()
    other = make_model()
    other_ema = keras_ema.EMA(**HP)
    other_ema.set_model(other)
    weights_before, ema_before = other.get_weights(), ema_values(other_ema)
    with pytest.raises(ValueError, match="not a valid keras_ema state file"):
        other.load_weights(path)
    for a, b in zip(weights_before, other.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert_bit_equal(ema_before, ema_values(other_ema))


def test_load_weights_without_ema_file_resets_an_ema_that_never_updated(tmp_path):
    source = make_model()
    path = str(tmp_path / "plain.weights.h5")
    source.save_weights(path)  # no EMA attached: no EMA file
    assert not os.path.exists(sidecar_path(path))
    keras.backend.clear_session()
    model = make_model()
    ema = keras_ema.EMA(**HP)
    ema.set_model(model)
    model.load_weights(path)
    expected = {w.path: np.asarray(w.numpy()) for w in model.weights}
    assert_bit_equal({p: expected[p] for p in ema.tracked_paths}, ema_values(ema))


def test_ema_model_checkpoint_needs_an_ema_callback(tmp_path):
    with pytest.raises(ValueError, match="`ema` must be a `keras_ema.EMA`"):
        keras_ema.EMAModelCheckpoint(
            keras.callbacks.History(), str(tmp_path / "m.keras")
        )


def test_values_sharded_across_processes_are_refused_not_gathered(
    tmp_path, monkeypatch
):
    """Across JAX processes a shadow sharded over devices of several of them
    cannot be read whole on one (tests/test_multiprocess.py runs it): there
    `get_weights` and `save_state` raise a `ValueError` naming the ways that
    keep every process on its own shards."""
    from keras_ema import backends

    model, ema = trained()
    sharded = {id(ema.variables[1].value)}
    monkeypatch.setattr(
        backends.BACKEND_OPS, "held_here", lambda value: id(value) not in sharded
    )
    path = tmp_path / "ema.npz"
    for action, call, named in (
        ("save_state()", lambda: ema.save_state(str(path)), "'net/d1/bias'"),
        ("get_weights()", ema.get_weights, "'net/d1/bias'"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"`{action}` needs")) as error:
            call()
        message = str(error.value)
        assert named in message
        for alternative in (
            "keras.callbacks.OrbaxCheckpoint",
            "model.load_weights(<directory>)",
            "keras_ema.EMAOrbaxCheckpoint",
            "`model.get_state_tree()` with Orbax inside `ema.swap_weights()`",
        ):
            assert alternative in message
    assert not path.exists()
    assert os.listdir(tmp_path) == []
