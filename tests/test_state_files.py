"""State files of models built again in one process, and errors on files."""

from __future__ import annotations

import gc
import os
import re
import stat
import warnings

import keras
import numpy as np
import pytest
from conftest import assert_bit_equal
from conftest import ema_values
from conftest import make_data

import keras_ema
from keras_ema.saving import atomic
from keras_ema.saving.sidecars import sidecar_path

HP = dict(beta=0.99, update_after_step=2, update_every=1)


def make_auto_named_model(normalization=keras.layers.BatchNormalization):
    """A small MLP whose layers and model get Keras' automatic names, which
    change with every model built in a process."""
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            normalization(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


class Interrupted(Exception):
    pass


class FailAtEpochEnd(keras.callbacks.Callback):
    """Interrupts the run at the end of epoch `epoch`, as a crash would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupted(f"interrupted at the end of epoch {epoch}")


@pytest.mark.parametrize("ema_first", [True, False])
def test_backup_and_restore_resumes_a_model_built_again_in_the_same_process(
    tmp_path, ema_first
):
    x, y = make_data(48)
    initial = make_auto_named_model().get_weights()
    backup_dir = str(tmp_path / "backup")

    emas = []

    def run(*callbacks):
        # No `clear_session()`: every model built here gets new layer names.
        model = make_auto_named_model()
        model.set_weights(initial)
        emas.append(keras_ema.EMA(**HP))
        callbacks = [emas[-1], *callbacks] if ema_first else [*callbacks, emas[-1]]
        model.fit(
            x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=callbacks
        )
        return model, emas[-1]

    full_model, full_ema = run()
    with pytest.raises(Interrupted):
        run(keras.callbacks.BackupAndRestore(backup_dir), FailAtEpochEnd(1))
    interrupted_ema = emas[-1]

    model, ema = run(keras.callbacks.BackupAndRestore(backup_dir))
    assert ema.tracked_paths != interrupted_ema.tracked_paths
    assert ema.step == full_ema.step == 24
    for expected, actual in zip(
        ema_values(full_ema).values(), ema_values(ema).values(), strict=True
    ):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    for expected, actual in zip(
        full_model.get_weights(), model.get_weights(), strict=True
    ):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def test_load_state_into_the_same_architecture_built_again(tmp_path):
    x, y = make_data(48)
    model = make_auto_named_model()
    ema = keras_ema.EMA(**HP)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    path = str(tmp_path / "ema.npz")
    ema.save_state(path)

    rebuilt = make_auto_named_model()
    rebuilt_ema = keras_ema.EMA(**HP)
    rebuilt_ema.set_model(rebuilt)
    assert rebuilt_ema.tracked_paths != ema.tracked_paths
    rebuilt_ema.load_state(path)
    assert rebuilt_ema.step == ema.step == 6
    assert_bit_equal(
        dict(enumerate(ema_values(ema).values())),
        dict(enumerate(ema_values(rebuilt_ema).values())),
    )


def test_another_architecture_with_weights_of_the_same_shapes_is_refused(tmp_path):
    model = make_auto_named_model()
    ema = keras_ema.EMA(**HP)
    ema.set_model(model)
    path = str(tmp_path / "ema.npz")
    ema.save_state(path)

    # Dense, LayerNormalization (gamma, beta), LayerNormalization, Dense: as
    # many weights as Dense, BatchNormalization (four), Dense, shapes equal.
    other = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.LayerNormalization(),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(1),
        ]
    )
    other_ema = keras_ema.EMA(**HP)
    other_ema.set_model(other)
    assert [tuple(v.shape) for v in other_ema.variables] == [
        tuple(v.shape) for v in ema.variables
    ]
    before = ema_values(other_ema)
    with pytest.raises(
        ValueError,
        match=r"variable '[\w/]*layer_normalization[\w/]*/gamma' is "
        r"'[\w/]*batch_normalization[\w/]*/gamma' in the file",
    ):
        other_ema.load_state(path)
    assert_bit_equal(before, ema_values(other_ema))
    assert other_ema.step == 0


@pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_state_files_get_the_mode_the_umask_gives_like_the_weights_file(
    tmp_path, umask
):
    model = make_auto_named_model()
    ema = keras_ema.EMA(**HP)
    ema.set_model(model)
    previous = os.umask(umask)
    try:
        ema.save_state(str(tmp_path / "ema.npz"))
        weights = str(tmp_path / "w.weights.h5")
        model.save_weights(weights)
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "ema.npz").st_mode) == expected
    assert stat.S_IMODE(os.stat(sidecar_path(weights)).st_mode) == expected
    assert stat.S_IMODE(os.stat(weights).st_mode) == expected
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["ema.npz", "w.weights.h5", os.path.basename(sidecar_path(weights))]
    )


def test_loading_a_missing_file_says_it_does_not_exist(tmp_path):
    model = make_auto_named_model()
    ema = keras_ema.EMA(**HP)
    ema.set_model(model)
    path = str(tmp_path / "missing.npz")
    before = ema_values(ema)
    for error_type in (FileNotFoundError, ValueError):
        with pytest.raises(error_type, match="does not exist") as raised:
            ema.load_state(path)
        assert raised.value.filename == path
        assert "missing.npz" in str(raised.value)
        assert "corrupt" not in str(raised.value)
    assert_bit_equal(before, ema_values(ema))


def test_saving_into_a_missing_folder_names_the_path_given(tmp_path):
    model = make_auto_named_model()
    ema = keras_ema.EMA(**HP)
    ema.set_model(model)
    path = str(tmp_path / "no_such_folder" / "ema.npz")
    for error_type in (FileNotFoundError, ValueError):
        with pytest.raises(error_type) as raised:
            ema.save_state(path)
        assert raised.value.filename == path
        assert str(raised.value).endswith(f"{path!r}")
        assert f"{str(tmp_path / 'no_such_folder')!r} does not exist" in str(
            raised.value
        )
        assert ".tmp" not in str(raised.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("filepath", [123, None, b"m.keras", ["m.keras"]])
def test_ema_model_checkpoint_refuses_a_filepath_that_is_not_a_path(filepath):
    ema = keras_ema.EMA(**HP)
    expected = rf"`filepath` must be .*Received: filepath={re.escape(repr(filepath))}$"
    with pytest.raises(ValueError, match=expected):
        keras_ema.EMAModelCheckpoint(ema, filepath)


def test_ema_model_checkpoint_takes_a_path_like_filepath(tmp_path):
    ema = keras_ema.EMA(**HP)
    checkpoint = keras_ema.EMAModelCheckpoint(ema, tmp_path / "m.keras")
    assert checkpoint.filepath == str(tmp_path / "m.keras")


class RecordEpochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


@pytest.mark.parametrize("checkpoint_first", [True, False])
def test_ema_model_checkpoint_accepts_its_ema_before_or_after_it(
    tmp_path, checkpoint_first
):
    model = make_auto_named_model()
    ema = keras_ema.EMA(**HP)
    checkpoint = keras_ema.EMAModelCheckpoint(ema, str(tmp_path / "m.keras"))
    callbacks = [checkpoint, ema] if checkpoint_first else [ema, checkpoint]
    x, y = make_data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=callbacks)
    assert os.path.exists(tmp_path / "m.keras")


def fit_without_the_ema(model, checkpoint):
    """Fits one epoch with `checkpoint` but not its EMA; checks that the
    error comes before any epoch and that nothing was trained or saved."""
    x, y = make_data(16)
    record = RecordEpochs()
    weights = model.get_weights()
    iterations = int(model.optimizer.iterations)
    with pytest.raises(ValueError, match="`ema` must be a callback of the same"):
        model.fit(
            x, y, batch_size=8, epochs=1, verbose=0, callbacks=[checkpoint, record]
        )
    assert record.epochs == []
    assert int(model.optimizer.iterations) == iterations
    for a, b in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(checkpoint.filepath)


def test_ema_model_checkpoint_without_its_ema_fails_before_the_first_epoch(
    tmp_path,
):
    model = make_auto_named_model()
    ema = keras_ema.EMA(**HP)
    checkpoint = keras_ema.EMAModelCheckpoint(ema, str(tmp_path / "m.keras"))
    fit_without_the_ema(model, checkpoint)


def test_ema_model_checkpoint_refuses_an_ema_of_an_earlier_fit(tmp_path):
    model = make_auto_named_model()
    ema = keras_ema.EMA(**HP)
    x, y = make_data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    checkpoint = keras_ema.EMAModelCheckpoint(ema, str(tmp_path / "m.keras"))
    fit_without_the_ema(model, checkpoint)
    # The same checkpoint works once the EMA is in the fit again.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[checkpoint, ema])
    assert os.path.exists(tmp_path / "m.keras")


def test_ema_model_checkpoint_refuses_an_ema_of_another_model(tmp_path):
    model = make_auto_named_model()
    ema = keras_ema.EMA(**HP)
    ema.set_model(make_auto_named_model())
    checkpoint = keras_ema.EMAModelCheckpoint(ema, str(tmp_path / "m.keras"))
    fit_without_the_ema(model, checkpoint)


@pytest.mark.skipif(os.name != "posix", reason="symbolic links and folder fsync")
def test_state_files_and_snapshots_share_one_atomic_write(tmp_path, monkeypatch):
    # Every temporary name taken, one by a link that points elsewhere: the
    # write gives up after a bounded number of names and follows no link.
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda _: "0" * 16)
    target = tmp_path / "elsewhere"
    for name in ("ema.npz", "snapshot-000000000004.npz"):
        os.symlink(target, tmp_path / f".{name}.{'0' * 16}.tmp")
    model = make_auto_named_model()
    ema = keras_ema.EMA(**HP)
    ema.set_model(model)
    with pytest.raises(FileExistsError, match="No free temporary file name"):
        ema.save_state(str(tmp_path / "ema.npz"))
    with pytest.raises(FileExistsError, match="No free temporary file name"):
        keras_ema.posthoc.write_snapshot(tmp_path, 4, (0.05,), 1, {}, {}, "f", "r")
    assert not target.exists()
    monkeypatch.undo()

    # Otherwise the file, then its folder, are synced.
    synced = []
    real_fsync = os.fsync

    def fsync(handle):
        synced.append(stat.S_ISDIR(os.fstat(handle).st_mode))
        real_fsync(handle)

    monkeypatch.setattr(os, "fsync", fsync)
    ema.save_state(str(tmp_path / "ema.npz"))
    keras_ema.posthoc.write_snapshot(tmp_path, 4, (0.05,), 1, {}, {}, "f", "r")
    assert synced == [False, True, False, True]


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def assert_refused_without_an_open_file(read, path) -> None:
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read()
        gc.collect()
    leaks = [str(r.message) for r in records if r.category is ResourceWarning]
    assert not leaks, leaks


def test_a_truncated_state_file_is_refused_and_closed(tmp_path):
    model = make_auto_named_model()
    ema = keras_ema.EMA(**HP)
    ema.set_model(model)
    path = tmp_path / "ema.npz"
    ema.save_state(str(path))
    truncate(path)
    assert_refused_without_an_open_file(lambda: ema.load_state(str(path)), path)


def test_a_truncated_snapshot_is_refused_and_closed(tmp_path):
    weights = {"d/kernel": np.ones((2, 3), np.float32)}
    keras_ema.posthoc.write_snapshot(
        tmp_path, 4, (0.05,), 1, {"d/kernel": [weights["d/kernel"]]}, {}, "f", "r"
    )
    path = tmp_path / keras_ema.posthoc.snapshot_filename(4)
    truncate(path)
    assert_refused_without_an_open_file(
        lambda: keras_ema.posthoc.read_snapshot(path), path
    )
    assert_refused_without_an_open_file(lambda: keras_ema.PostHocRun(tmp_path), path)
