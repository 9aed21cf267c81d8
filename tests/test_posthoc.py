"""`PostHocEMA`: snapshots against a NumPy transcription of the power-function
EMA, step by step; synthesis against a directly tracked EMA; resume, thinning,
refusals and the online weights."""

from __future__ import annotations

import math
import os
import pickle
import re
import time

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import assert_bit_equal
from conftest import assert_close
from conftest import make_data
from conftest import make_model
from conftest import numpy_weights
from oracle import ScheduledEMA
from oracle import power_function_rule
from oracle import sigma_rel_to_gamma_by_bisection

import keras_ema
from keras_ema import posthoc
from keras_ema.posthoc import snapshots as snapshots_module
from keras_ema.saving import npz_state

TRACKED = (0.05, 0.10)


def trainable_weights(model) -> dict:
    return {
        w.path: keras.ops.convert_to_numpy(w.value).copy()
        for w in model.weights
        if w.trainable and keras.backend.is_float_dtype(w.dtype)
    }


def buffer_weights(model) -> dict:
    return {
        w.path: keras.ops.convert_to_numpy(w.value).copy()
        for w in model.weights
        if not (w.trainable and keras.backend.is_float_dtype(w.dtype))
    }


def by_path(model, values) -> dict:
    """`get_weights()`-style arrays keyed by the model's variable paths."""
    return {w.path: v for w, v in zip(model.weights, values, strict=True)}


def snapshot_steps(directory) -> list[int]:
    return sorted(
        int(name[len("snapshot-") : -len(".npz")])
        for name in os.listdir(directory)
        if name.startswith("snapshot-")
    )


def read(directory, step) -> posthoc.Snapshot:
    return posthoc.read_snapshot(
        os.path.join(directory, posthoc.snapshot_filename(step))
    )


class Replay(keras.callbacks.Callback):
    """Replays every optimizer step (a step that moved the optimizer's
    counter) into one oracle per tracked `sigma_rel`, and records what the
    snapshot of each multiple of `snapshot_every` must hold."""

    def __init__(self, update_every: int, snapshot_every: int):
        super().__init__()
        self.update_every = update_every
        self.snapshot_every = snapshot_every
        self.oracles = None
        self.expected = {}
        self.iterations = None

    def on_train_begin(self, logs=None):
        if self.oracles is None:
            online = trainable_weights(self.model)
            self.oracles = [
                ScheduledEMA(
                    online,
                    power_function_rule(sigma_rel_to_gamma_by_bisection(s)),
                    self.update_every,
                )
                for s in TRACKED
            ]
        self.iterations = int(self.model.optimizer.iterations)

    def on_train_batch_end(self, batch, logs=None):
        iterations = int(self.model.optimizer.iterations)
        if iterations == self.iterations:
            return
        self.iterations = iterations
        for oracle in self.oracles:
            oracle.update(trainable_weights(self.model))
        if self.step % self.snapshot_every == 0:
            self.record(self.step)

    @property
    def step(self) -> int:
        return self.oracles[0].step

    def record(self, step: int) -> None:
        """What the snapshot of `step` holds if taken now."""
        averaged = [{k: v.copy() for k, v in o.ema.items()} for o in self.oracles]
        self.expected[step] = (averaged, buffer_weights(self.model))


def assert_snapshot_holds(snapshot, expected) -> None:
    averaged, buffers = expected
    assert snapshot.averaged.keys() == averaged[0].keys()
    for profile, values in enumerate(averaged):
        assert_close(
            values, {path: v[profile] for path, v in snapshot.averaged.items()}
        )
    assert_bit_equal(buffers, snapshot.buffers)


# ----------------------------------------------------------------------------
# Snapshots against the oracle


@pytest.mark.parametrize(
    ("update_every", "offload"),
    [(1, False), (4, False), (4, True)],
    ids=["every_step", "every_4", "every_4_offload"],
)
def test_snapshots_equal_the_power_function_oracle(tmp_path, update_every, offload):
    # 11 batches per epoch, 2 epochs: 22 steps. The last snapshot is the end
    # of the fit, dated by the last update (22 or 20).
    snapshot_every = {1: 4, 4: 8}[update_every]
    model = make_model()
    callback = keras_ema.PostHocEMA(
        tmp_path,
        TRACKED,
        snapshot_every=snapshot_every,
        update_every=update_every,
        offload_to_host=offload,
        verbose=0,
    )
    replay = Replay(update_every, snapshot_every)
    x, y = make_data(88)
    xv, yv = make_data(16, seed=1)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        validation_data=(xv, yv),
        verbose=0,
        callbacks=[callback, replay],
    )
    last_update = 22 - 22 % update_every
    replay.record(last_update)  # No update since: the shadows are as then.
    expected = replay.expected
    grid = list(range(snapshot_every, 22, snapshot_every))
    assert sorted(expected) == snapshot_steps(tmp_path) == [*grid, last_update]

    run = keras_ema.PostHocRun(tmp_path)
    assert run.steps == sorted(expected)
    assert run.sigma_rels == TRACKED
    assert run.run_id == callback.run_id
    assert run.fingerprint == posthoc.model_fingerprint(model.weights)
    assert run.update_every == update_every
    for step in run.steps:
        assert_snapshot_holds(read(tmp_path, step), expected[step])
    # The callback's own profiles hold the same values.
    for profile, name in enumerate(callback.profile_names):
        values = by_path(model, callback.get_weights(name))
        assert_close(
            expected[last_update][0][profile],
            {path: values[path] for path in expected[last_update][0][profile]},
        )


def test_update_outside_fit_snapshots_on_the_same_steps(tmp_path):
    model = make_model()
    callback = keras_ema.PostHocEMA(tmp_path, snapshot_every=2, verbose=0)
    callback.set_model(model)
    replay = Replay(1, 2)
    replay.set_model(model)
    replay.on_train_begin()
    rng = np.random.default_rng(0)
    for _ in range(5):
        for weight in model.trainable_weights:
            noise = rng.normal(scale=0.1, size=weight.shape).astype("float32")
            weight.assign(keras.ops.convert_to_numpy(weight.value) + noise)
        callback.update()
        for oracle in replay.oracles:
            oracle.update(trainable_weights(model))
        if replay.step % 2 == 0:
            replay.record(replay.step)
    assert callback.snapshot() == 5
    replay.record(5)
    callback.wait()
    assert snapshot_steps(tmp_path) == [2, 4, 5]
    for step in (2, 4, 5):
        assert_snapshot_holds(read(tmp_path, step), replay.expected[step])


def test_a_run_opened_while_writing_sees_every_snapshot_handed_over(
    tmp_path, monkeypatch
):
    # A slow disk: the snapshot of step 4 is still being written when the
    # custom loop opens the run.
    write = snapshots_module.write_snapshot

    def slow_write(*args, **kwargs):
        time.sleep(0.5)
        return write(*args, **kwargs)

    monkeypatch.setattr(snapshots_module, "write_snapshot", slow_write)
    model = make_model()
    callback = keras_ema.PostHocEMA(tmp_path, snapshot_every=2, verbose=0)
    callback.set_model(model)
    for _ in range(4):
        for weight in model.trainable_weights:
            weight.assign(keras.ops.convert_to_numpy(weight.value) + 0.01)
        callback.update()
    run = keras_ema.PostHocRun(tmp_path)
    assert run.steps == [2, 4]
    # The 0.10 profile is tracked: synthesized at step 4, it is that
    # profile's average now.
    expected = by_path(model, callback.get_weights("sigma_0_1"))
    synthesized = run.synthesize(0.10)
    paths = callback.tracked_paths
    assert_close({p: expected[p] for p in paths}, {p: synthesized[p] for p in paths})
    callback.wait()


def test_gradient_accumulation_snapshots_optimizer_steps(tmp_path):
    # 24 batches, 2 per optimizer step: 12 steps, snapshots after 4, 8, 12.
    optimizer = keras.optimizers.SGD(0.05, gradient_accumulation_steps=2)
    model = make_model(optimizer=optimizer)
    callback = keras_ema.PostHocEMA(tmp_path, snapshot_every=4, verbose=0)
    replay = Replay(1, 4)
    x, y = make_data(96)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback, replay])
    assert callback.step == replay.step == 12
    assert snapshot_steps(tmp_path) == sorted(replay.expected) == [4, 8, 12]
    for step in (4, 8, 12):
        assert_snapshot_holds(read(tmp_path, step), replay.expected[step])


def test_loss_scale_optimizer_skipped_steps_are_not_counted(tmp_path):
    # A loss scale of 2**127 overflows: the first steps are skipped (the
    # scale halves each time) and move neither the weights nor the counter.
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.05), initial_scale=2.0**127
    )
    model = make_model(optimizer=optimizer)
    callback = keras_ema.PostHocEMA(tmp_path, snapshot_every=2, verbose=0)
    replay = Replay(1, 2)
    x, y = make_data(96)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback, replay])
    steps = callback.step
    assert steps == replay.step < 12
    replay.record(steps)
    assert snapshot_steps(tmp_path) == sorted(replay.expected)
    assert snapshot_steps(tmp_path)[:-1] == list(range(2, steps, 2))
    for step in snapshot_steps(tmp_path):
        assert_snapshot_holds(read(tmp_path, step), replay.expected[step])


@pytest.mark.skipif(BACKEND == "torch", reason="torch runs one step per execution.")
def test_steps_per_execution_that_divides_snapshot_every(tmp_path):
    # 6 batches per epoch, in 3 executions of 2: the same snapshots as one
    # step per execution.
    x, y = make_data(48)
    initial = make_model().get_weights()
    for steps_per_execution in (1, 2):
        keras.backend.clear_session()
        model = make_model(steps_per_execution=steps_per_execution)
        model.set_weights(initial)
        callback = keras_ema.PostHocEMA(
            tmp_path / str(steps_per_execution), snapshot_every=4, verbose=0
        )
        model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[callback]
        )
    one, two = tmp_path / "1", tmp_path / "2"
    assert snapshot_steps(one) == snapshot_steps(two) == [4, 8, 12]
    for step in (4, 8, 12):
        expected, actual = read(one, step), read(two, step)
        for profile in range(len(TRACKED)):
            assert_close(
                {p: v[profile] for p, v in expected.averaged.items()},
                {p: v[profile] for p, v in actual.averaged.items()},
            )
        assert_close(expected.buffers, actual.buffers)


@pytest.mark.skipif(BACKEND == "torch", reason="torch runs one step per execution.")
@pytest.mark.parametrize(
    ("steps_per_execution", "batches", "message"),
    [(3, 6, "divide `snapshot_every`"), (2, 5, "steps of each epoch")],
)
def test_steps_per_execution_that_misses_snapshots_is_refused(
    tmp_path, steps_per_execution, batches, message
):
    model = make_model(steps_per_execution=steps_per_execution)
    before = numpy_weights(model)
    callback = keras_ema.PostHocEMA(tmp_path, snapshot_every=4, verbose=0)
    x, y = make_data(8 * batches)
    with pytest.raises(ValueError, match=f"steps_per_execution.*{message}"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert_bit_equal(before, numpy_weights(model))
    assert "evaluate" not in model.__dict__
    assert not os.path.exists(tmp_path / posthoc.snapshot_filename(4))


# ----------------------------------------------------------------------------
# Synthesis against a directly tracked EMA


class RecordWeights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.history = []

    def on_train_batch_end(self, batch, logs=None):
        self.history.append(trainable_weights(self.model))


def test_synthesized_sigma_rel_equals_a_directly_tracked_ema(tmp_path):
    # 256 steps, a snapshot every 8: 32 snapshots. Noisy targets keep the
    # weights moving, so that EMAs of different lengths differ.
    steps, every, target = 256, 8, 0.07
    rng = np.random.default_rng(4)
    x = rng.normal(size=(256, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) + rng.normal(size=(256, 1))).astype("float32")
    initial = make_model().get_weights()

    def train(callback):
        keras.backend.clear_session()
        model = make_model()
        model.set_weights(initial)
        recorder = RecordWeights()
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=8,
            shuffle=False,
            verbose=0,
            callbacks=[callback, recorder],
        )
        return model, recorder.history

    direct_ema = keras_ema.EMA(
        schedule=keras_ema.PowerFunctionSchedule(sigma_rel=target)
    )
    model, history = train(direct_ema)
    direct = by_path(model, direct_ema.get_weights())
    online = numpy_weights(model)
    posthoc_model, posthoc_history = train(
        keras_ema.PostHocEMA(tmp_path, TRACKED, snapshot_every=every, verbose=0)
    )
    # The same training run: the EMAs do not touch the online weights.
    assert_bit_equal(online, numpy_weights(posthoc_model))
    assert len(history) == steps

    run = keras_ema.PostHocRun(tmp_path)
    assert run.steps == list(range(every, steps + 1, every))
    synthesized = run.synthesize(target)
    error = run.reconstruction_error(target)
    coefficients = np.abs(run.coefficients(target)).sum()
    gamma = sigma_rel_to_gamma_by_bisection(target)
    profile_norm = math.sqrt((gamma + 1) ** 2 / ((2 * gamma + 1) * steps))
    largest_gamma = sigma_rel_to_gamma_by_bisection(min(TRACKED))
    for path in synthesized.keys() & trainable_weights(model).keys():
        thetas = np.stack([h[path] for h in history]).astype(np.float64)
        # The discrete power-function EMA integrates its profile against the
        # piecewise-constant weights, so by Cauchy-Schwarz
        # |sum c_i EMA_i - EMA_r| <= error * ||p_r|| * ||theta - m||_2 for any
        # constant m (the profiles integrate to 1 and sum(c) = 1): m is the
        # mean over training. Float32 shadows add at most 2**-24 * scale *
        # (T + 10 * sum of the update weights) each (one rounding per lerp
        # plus the weight's), mixed with sum |c|.
        deviation = np.sqrt(np.sum((thetas - thetas.mean(axis=0)) ** 2, axis=0))
        scale = np.abs(thetas).max()
        lerp_roundings = steps + 10 * (largest_gamma + 1) * (1 + math.log(steps))
        rounding = (coefficients + 2) * 2.0**-24 * scale * lerp_roundings
        bound = error * profile_norm * deviation + rounding
        difference = np.abs(synthesized[path].astype(np.float64) - direct[path])
        assert np.all(difference <= bound), (path, difference.max(), bound.max())
        # Relative to the weights' scale, the bound is small, and the tracked
        # profiles themselves are farther from the target than it allows.
        assert bound.max() < 0.02 * scale, path
        last = read(tmp_path, steps)
        for tracked in last.averaged[path]:
            assert np.mean(np.abs(tracked - direct[path]) > bound) > 0.5, path


# ----------------------------------------------------------------------------
# Resume, thinning and the end-of-fit snapshot


class InterruptAtEpochEnd(keras.callbacks.Callback):
    """Writes an extra snapshot, then kills the run at the end of `epoch`
    (before the callbacks after it save anything)."""

    def __init__(self, callback, epoch):
        super().__init__()
        self.callback = callback
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.callback.snapshot()
            self.callback.wait()
            raise KeyboardInterrupt("preempted")


@pytest.mark.parametrize("max_snapshots", [None, 3])
def test_resume_through_backup_and_restore_equals_an_uninterrupted_run(
    tmp_path, max_snapshots
):
    # 6 steps per epoch, 4 epochs, a snapshot every 5 steps. The interrupted
    # run is backed up at step 12, writes snapshots up to step 18, and dies.
    x, y = make_data(48)
    keras.utils.set_random_seed(3)
    initial = make_model().get_weights()

    def run(directory, interrupt=False):
        keras.backend.clear_session()
        model = make_model()
        model.set_weights(initial)
        callback = keras_ema.PostHocEMA(
            directory, snapshot_every=5, max_snapshots=max_snapshots, verbose=0
        )
        callbacks = [callback]
        if interrupt:
            callbacks.append(InterruptAtEpochEnd(callback, epoch=2))
        callbacks.append(keras.callbacks.BackupAndRestore(str(tmp_path / "backup")))
        model.fit(
            x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=callbacks
        )
        return callback

    full = tmp_path / "full"
    full_callback = run(full)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(resumed, interrupt=True)
    interrupted_steps = snapshot_steps(resumed)
    assert 18 in interrupted_steps
    assert max(interrupted_steps) > 12
    resumed_callback = run(resumed)

    expected = [5, 10, 15, 20, 24] if max_snapshots is None else [10, 20, 24]
    assert snapshot_steps(full) == snapshot_steps(resumed) == expected
    assert resumed_callback.run_id != full_callback.run_id
    run_ids = {read(resumed, step).header["run_id"] for step in expected}
    assert run_ids == {resumed_callback.run_id}
    for step in expected:
        a, b = read(full, step), read(resumed, step)
        assert a.averaged.keys() == b.averaged.keys()
        for path in a.averaged:
            for u, v in zip(a.averaged[path], b.averaged[path], strict=True):
                np.testing.assert_allclose(v, u, rtol=1e-6, atol=1e-6, err_msg=path)
        for path in a.buffers:
            np.testing.assert_allclose(
                b.buffers[path], a.buffers[path], rtol=1e-6, atol=1e-6, err_msg=path
            )


class ListAtEpochEnd(keras.callbacks.Callback):
    def __init__(self, callback, directory):
        super().__init__()
        self.callback = callback
        self.directory = directory
        self.listings = []

    def on_epoch_end(self, epoch, logs=None):
        self.callback.wait()
        self.listings.append(snapshot_steps(self.directory))


def test_thinning_keeps_an_evenly_spaced_set(tmp_path):
    # 7 steps per epoch; a snapshot every 2 steps, at most 4 files: at most 3
    # regular snapshots, the spacing doubling as needed, and the end-of-fit
    # snapshot on top.
    model = make_model()
    callback = keras_ema.PostHocEMA(
        tmp_path, snapshot_every=2, max_snapshots=4, verbose=0
    )
    lister = ListAtEpochEnd(callback, tmp_path)
    x, y = make_data(56)
    model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=[callback, lister])
    assert lister.listings == [[2, 4, 6], [4, 8, 12], [8, 16], [8, 16, 24]]
    assert snapshot_steps(tmp_path) == [8, 16, 24, 28]
    # The next snapshot (32) doubles the spacing again and retires the
    # end-of-fit one.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert snapshot_steps(tmp_path) == [16, 32, 35]
    run = keras_ema.PostHocRun(tmp_path)
    assert run.steps == [16, 32, 35]


def test_a_checkpoint_is_never_ahead_of_the_snapshots(tmp_path):
    # A weights file saved right after step 4 (as `BackupAndRestore` with
    # `save_freq` does) finds snapshot 4 written: a run resumed from it
    # would not write it again.
    directory = tmp_path / "snapshots"
    callback = keras_ema.PostHocEMA(directory, snapshot_every=4, verbose=0)
    listings = []

    class SaveAfterStep4(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                self.model.save_weights(str(tmp_path / "w.weights.h5"))
                listings.append(snapshot_steps(directory))

    model = make_model()
    model.fit(
        *make_data(48),
        batch_size=8,
        verbose=0,
        callbacks=[SaveAfterStep4(), callback],
    )
    assert listings == [[4]]
    assert snapshot_steps(directory) == [4, 6]


def test_no_end_of_fit_snapshot_when_the_last_step_has_one(tmp_path):
    model = make_model()
    callback = keras_ema.PostHocEMA(tmp_path, snapshot_every=6, verbose=0)
    x, y = make_data(48)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    assert snapshot_steps(tmp_path) == [6, 12]
    assert callback.snapshot() == 12
    assert snapshot_steps(tmp_path) == [6, 12]


def test_the_run_id_travels_with_the_state_file(tmp_path):
    model = make_model()
    callback = keras_ema.PostHocEMA(tmp_path / "s", snapshot_every=3, verbose=0)
    x, y = make_data(48)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    path = str(tmp_path / "ema.npz")
    callback.save_state(path)
    header, _ = npz_state.read(path)
    assert npz_state.extra(header) == {"posthoc_run_id": callback.run_id}
    other = keras_ema.PostHocEMA(tmp_path / "s", snapshot_every=3, verbose=0)
    other.set_model(model)
    other.load_state(path)
    assert other.run_id == callback.run_id and other.step == 6
    # A state file without the run id (as an older one) keeps the callback's.
    npz_state.save(path, other._state, other.get_config())
    third = keras_ema.PostHocEMA(tmp_path / "s", snapshot_every=3, verbose=0)
    third.set_model(model)
    own = third.run_id
    third.load_state(path)
    assert third.run_id == own and third.step == 6


# ----------------------------------------------------------------------------
# Refusals


def first_run(directory):
    model = make_model()
    callback = keras_ema.PostHocEMA(directory, snapshot_every=3, verbose=0)
    x, y = make_data(48)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    return model, callback


def assert_refused_before_any_step(model, callback, directory, match):
    files = {
        name: os.stat(directory / name).st_mtime_ns for name in os.listdir(directory)
    }
    before = numpy_weights(model)
    x, y = make_data(16)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert_bit_equal(before, numpy_weights(model))
    assert {
        name: os.stat(directory / name).st_mtime_ns for name in os.listdir(directory)
    } == files
    # The model is left as it was: Keras' own training and evaluation.
    assert "evaluate" not in model.__dict__
    model.evaluate(x, y, verbose=0)


@pytest.mark.parametrize(
    "other", ["run", "sigma_rels", "model"], ids=["run", "sigma_rels", "model"]
)
def test_a_directory_of_another_run_is_refused(tmp_path, other):
    first_run(tmp_path)
    keras.backend.clear_session()
    model = make_model(batch_norm=other != "model")
    sigma_rels = (0.05, 0.2) if other == "sigma_rels" else TRACKED
    callback = keras_ema.PostHocEMA(tmp_path, sigma_rels, snapshot_every=3, verbose=0)
    match = {"run": "run id", "sigma_rels": "sigma_rels", "model": "fingerprint"}
    assert_refused_before_any_step(
        model,
        callback,
        tmp_path,
        f"{re.escape(str(tmp_path))}.*another run.*{match[other]}",
    )


@pytest.mark.parametrize("damage", ["truncated", "pickled", "foreign"])
def test_unusable_files_in_the_directory_are_refused(tmp_path, damage):
    model, callback = first_run(tmp_path)
    state = str(tmp_path / "ema.npz")
    callback.save_state(state)
    target = tmp_path / posthoc.snapshot_filename(3)
    if damage == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif damage == "pickled":
        target.write_bytes(pickle.dumps({"header": np.zeros(3)}))
    else:
        np.savez(target, header=np.frombuffer(b'{"format": "other"}', np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(target))):
        keras_ema.PostHocRun(tmp_path)
    # The run resumes from its state, but not into a folder it cannot read.
    keras.backend.clear_session()
    resumed_model = make_model()
    resumed = keras_ema.PostHocEMA(tmp_path, snapshot_every=3, verbose=0)
    resumed.set_model(resumed_model)
    resumed.load_state(state)
    assert resumed.run_id == callback.run_id
    assert_refused_before_any_step(
        resumed_model, resumed, tmp_path, re.escape(str(target))
    )


BAD_ARGUMENTS = [
    (dict(sigma_rels=()), "`sigma_rels` must be distinct and not empty"),
    (dict(sigma_rels=(0.05, 0.05)), "`sigma_rels` must be distinct"),
    (dict(sigma_rels=(0.05, 0.3)), r"`sigma_rels\[1\]` must be a number"),
    (dict(sigma_rels=(0.0,)), r"`sigma_rels\[0\]`"),
    (dict(sigma_rels=0.05), "`sigma_rels` must be a sequence"),
    (dict(sigma_rels="0.05"), "`sigma_rels` must be a sequence"),
    (dict(snapshot_every=0), "`snapshot_every` must be an integer >= 1"),
    (dict(snapshot_every=2.0), "`snapshot_every` must be an integer"),
    (dict(update_every=0), "`update_every` must be an integer >= 1"),
    (
        dict(snapshot_every=10, update_every=4),
        r"`snapshot_every` must be a multiple of `update_every`.*"
        r"Received: snapshot_every=10, update_every=4",
    ),
    (dict(snapshot_dtype="float64"), "`snapshot_dtype` must be one of"),
    (dict(max_snapshots=2), "`max_snapshots` must be an integer >= 3"),
    (dict(max_snapshots=8.0), "`max_snapshots` must be an integer"),
    (dict(max_snapshots=True), "`max_snapshots` must be an integer"),
    (dict(directory=""), "`directory` must be a non-empty path"),
    (dict(verbose=2), "`verbose` must be 0 or 1"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_naming_them(tmp_path, overrides, message):
    arguments = dict(directory=tmp_path, snapshot_every=4, verbose=0)
    arguments.update(overrides)
    with pytest.raises(ValueError, match=message):
        keras_ema.PostHocEMA(**arguments)


def test_a_directory_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    model = make_model()
    callback = keras_ema.PostHocEMA(path, snapshot_every=4, verbose=0)
    with pytest.raises(ValueError, match="`directory` must be a folder"):
        model.fit(*make_data(16), batch_size=8, verbose=0, callbacks=[callback])


# ----------------------------------------------------------------------------
# The online weights, the profiles and the rest of the surface


def test_online_weights_never_change(tmp_path):
    model = make_model()
    callback = keras_ema.PostHocEMA(tmp_path, snapshot_every=3, verbose=0)
    last_step = {}

    class Capture(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            last_step.update(numpy_weights(self.model))

    x, y = make_data(88)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        validation_data=make_data(16, seed=1),
        verbose=0,
        callbacks=[callback, Capture()],
    )
    assert_bit_equal(last_step, numpy_weights(model))
    callback.snapshot()
    callback.wait()
    other = make_model()
    keras_ema.PostHocRun(tmp_path).synthesize_into(other, 0.07)
    assert_bit_equal(last_step, numpy_weights(model))
    synthesized = keras_ema.PostHocRun(tmp_path).synthesize(0.07)
    assert_bit_equal(synthesized, numpy_weights(other))


def test_profiles_logs_and_trainable_only_tracking(tmp_path, capsys):
    model = make_model()
    callback = keras_ema.PostHocEMA(tmp_path, TRACKED, snapshot_every=4)
    callback.set_model(model)
    # 81 trainable parameters x 2 profiles x 4 bytes, 250 snapshots per 1,000
    # steps; 16 BatchNormalization statistics are buffers.
    printed = capsys.readouterr().out
    assert "81 parameters x 2 sigma_rels in float32 (648 B" in printed
    assert "16 buffer values" in printed and "162.0 kB per 1,000 steps" in printed
    callback.set_model(model)
    assert capsys.readouterr().out == ""
    assert callback.profile_names == ["sigma_0_05", "sigma_0_1"]
    assert callback.tracked_paths == [w.path for w in model.weights if w.trainable]
    x, y = make_data(32)
    history = model.fit(
        x,
        y,
        batch_size=8,
        validation_data=make_data(16, seed=1),
        verbose=0,
        callbacks=[callback],
    )
    assert {
        "ema_sigma_0_05_decay",
        "ema_sigma_0_1_decay",
        "val_ema_sigma_0_05_loss",
        "val_ema_sigma_0_1_loss",
    } <= history.history.keys()
    clone = keras_ema.PostHocEMA.from_config(callback.get_config())
    assert clone.get_config() == callback.get_config()


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on JAX only.")
def test_snapshots_under_a_jax_model_parallel_distribution(tmp_path):
    from test_distribution import jax_only
    from test_distribution import model_parallel

    if jax_only.args[0]:
        pytest.skip(jax_only.kwargs["reason"])
    distribution = model_parallel()
    with distribution.scope():
        model = make_model()
        callback = keras_ema.PostHocEMA(tmp_path, snapshot_every=3, verbose=0)
        x, y = make_data(32)
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    snapshot = read(tmp_path, 8)
    assert snapshot_steps(tmp_path) == [3, 6, 8]
    weights = {w.path: w for w in model.weights}
    assert any(
        len(weights[path].value.sharding.device_set) > 1 for path in snapshot.averaged
    )
    for profile, name in enumerate(callback.profile_names):
        values = by_path(model, callback.get_weights(name))
        for path, stored in snapshot.averaged.items():
            np.testing.assert_array_equal(stored[profile], values[path])
    assert_bit_equal(buffer_weights(model), snapshot.buffers)
