"""The EMA across JAX processes (multi-host), on one machine.

Two processes of two virtual CPU devices each (tests/multiprocess_harness.py)
train the conftest model under `keras.distribution`; every process writes the
shards it holds, and the test puts them together here and compares them with
the same training in this process, on one device, within 1e-5:

- `DataParallel` and `ModelParallel` (kernels sharded over the devices of
  both processes) equal one process, every profile;
- across processes, `get_weights` and `save_state` of sharded shadows raise a
  `ValueError` naming the alternatives (never JAX's `RuntimeError`);
  `load_state` keeps each shard on its process;
- a run resumed in new processes from an `OrbaxCheckpoint` (the EMA state
  rides along) equals the uninterrupted one, and the EMA weights exported
  by `EMAOrbaxCheckpoint` or by an Orbax save inside `swap_weights()` load
  in one process.

Both phases together start four processes; each phase has a time limit, and
the processes' output is shown when one fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import keras
import multiprocess_harness as harness
import numpy as np
import pytest
from conftest import BACKEND
from conftest import make_data
from conftest import make_model

import keras_ema
from keras_ema.saving import npz_state

HARNESS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "multiprocess_harness.py"
)

TOLERANCE = 1e-5
PHASE_TIMEOUT = 300


def _orbax_installed() -> bool:
    try:
        return importlib.util.find_spec("orbax.checkpoint") is not None
    except ModuleNotFoundError:
        return False


pytestmark = [
    pytest.mark.skipif(
        BACKEND != "jax", reason="Several JAX processes: the JAX backend only."
    ),
    pytest.mark.skipif(
        not hasattr(keras.callbacks, "OrbaxCheckpoint"),
        reason=f"keras.callbacks.OrbaxCheckpoint needs Keras 3.14+ "
        f"(installed: {keras.__version__}).",
    ),
    pytest.mark.skipif(
        not _orbax_installed(),
        reason="orbax-checkpoint is not installed (pip install 'keras-ema[orbax]').",
    ),
]


# --------------------------------------------------------------------------
# Launching the processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(phase: str, out: str) -> float:
    """Runs `phase` in two processes; fails with their output if either
    fails or outlives `PHASE_TIMEOUT`. Returns the wall time."""
    port = free_port()
    logs = [os.path.join(out, f"{phase}.process{i}.log") for i in range(2)]
    start = time.monotonic()
    processes = []
    for process_id, log in enumerate(logs):
        with open(log, "w") as file:
            processes.append(
                subprocess.Popen(
                    [sys.executable, HARNESS, phase, str(process_id), str(port), out],
                    stdout=file,
                    stderr=subprocess.STDOUT,
                )
            )
    failures = []
    for process_id, process in enumerate(processes):
        left = max(1.0, PHASE_TIMEOUT - (time.monotonic() - start))
        try:
            code = process.wait(timeout=left)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
                other.wait()
            failures.append(f"process {process_id} ran over {PHASE_TIMEOUT} s")
            break
        if code != 0:
            failures.append(f"process {process_id} exited with {code}")
            # Its partner may wait forever for a collective.
            for other in processes:
                if other.poll() is None:
                    other.kill()
                    other.wait()
            break
    if failures:
        output = "\n".join(
            f"----- {phase}, process {i} -----\n{_tail(log)}"
            for i, log in enumerate(logs)
        )
        pytest.fail(f"The {phase!r} phase failed: {'; '.join(failures)}\n{output}")
    return time.monotonic() - start


def _tail(path: str, lines: int = 60) -> str:
    with open(path, errors="replace") as file:
        return "".join(file.readlines()[-lines:])


def results(out: str, phase: str) -> list[dict]:
    processes = range(harness.PROCESSES)
    names = [os.path.join(out, f"{phase}.process{i}.json") for i in processes]
    loaded = []
    for name in names:
        with open(name) as file:
            loaded.append(json.load(file))
    return loaded


def assembled(out: str, name: str) -> list[list[np.ndarray]]:
    """Each profile's shadows, put together from the shards that each
    process wrote; every element must come from some shard."""
    archives = [
        np.load(os.path.join(out, f"{name}.process{i}.npz"), allow_pickle=False)
        for i in range(harness.PROCESSES)
    ]
    profiles = []
    for p in range(len(harness.profiles())):
        values = []
        i = 0
        while f"p{p}_v{i}_shape" in archives[0]:
            whole = np.full(tuple(archives[0][f"p{p}_v{i}_shape"]), np.nan, np.float32)
            for archive in archives:
                k = 0
                while f"p{p}_v{i}_s{k}" in archive:
                    bounds = archive[f"p{p}_v{i}_s{k}_at"]
                    where = tuple(slice(int(a), int(b)) for a, b in bounds)
                    whole[where] = archive[f"p{p}_v{i}_s{k}"]
                    k += 1
            assert not np.isnan(whole).any(), f"profile {p}, variable {i}: gaps"
            values.append(whole)
            i += 1
        profiles.append(values)
    return profiles


# --------------------------------------------------------------------------
# The runs


def shadow_values(ema) -> list[list[np.ndarray]]:
    return [
        [np.asarray(keras.ops.convert_to_numpy(s.value)).copy() for s in p.shadows]
        for p in ema._state.profiles
    ]


class AtEpochEnd(keras.callbacks.Callback):
    """After epoch `epoch`: records the EMA and saves its state file."""

    def __init__(self, ema, epoch: int, path: str):
        super().__init__()
        self.ema, self.epoch, self.path = ema, epoch, path
        self.values = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.values = shadow_values(self.ema)
            self.step = self.ema.step
            self.ema.save_state(self.path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference and both phases of the two-process runs."""
    out = str(tmp_path_factory.mktemp("multiprocess"))
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    x, y = make_data(harness.SAMPLES)
    x_val, y_val = make_data(32, seed=1)
    model = make_model()
    ema = keras_ema.EMA(profiles=harness.profiles())
    first = AtEpochEnd(
        ema, harness.FIRST_EPOCHS - 1, os.path.join(out, "reference_state.npz")
    )
    history = model.fit(
        x,
        y,
        batch_size=harness.BATCH_SIZE,
        epochs=harness.EPOCHS,
        shuffle=False,
        verbose=0,
        validation_data=(x_val, y_val),
        callbacks=[ema, first],
    )
    reference = {
        "first": first.values,
        "first_step": first.step,
        "final": shadow_values(ema),
        "final_step": ema.step,
        "history": history.history,
        "paths": ema.tracked_paths,
    }
    keras.backend.clear_session()
    seconds = {phase: launch(phase, out) for phase in ("first", "resume")}
    print(f"two-process phases, wall seconds: {seconds}")
    return out, reference


def assert_profiles_close(expected, actual) -> None:
    assert len(expected) == len(actual)
    for p, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert len(want) == len(got)
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            np.testing.assert_allclose(
                b, a, rtol=0, atol=TOLERANCE, err_msg=f"profile {p}, variable {i}"
            )


# --------------------------------------------------------------------------
# Tests


def test_data_parallel_across_processes_equals_one_process(runs):
    out, reference = runs
    assert_profiles_close(reference["first"], assembled(out, "data"))
    first = results(out, "first")
    assert [r["data_step"] for r in first] == [reference["first_step"]] * 2

    # Replicated shadows are whole on every process: `get_weights` and
    # `save_state` work there, gathering nothing.
    slow = reference["first"][1]
    for i in range(harness.PROCESSES):
        with np.load(os.path.join(out, f"data_weights.process{i}.npz")) as weights:
            got = [weights[f"arr_{k}"] for k in range(len(weights.files))]
        assert_profiles_close([slow], [got])
        path = os.path.join(out, f"data_state.process{i}.npz")
        header, arrays = npz_state.read(path)
        assert header["step"] == reference["first_step"]
        assert [v["path"] for v in header["variables"]] == reference["paths"]
        assert_profiles_close(reference["first"], arrays)


def test_model_parallel_across_processes_equals_one_process(runs):
    out, reference = runs
    assert_profiles_close(reference["first"], assembled(out, "model"))
    first = results(out, "first")
    assert [r["model_step"] for r in first] == [reference["first_step"]] * 2
    for key in ("loss", "val_loss", "val_ema_fast_loss", "val_ema_slow_loss"):
        for process in first:
            np.testing.assert_allclose(
                process["model_history"][key],
                reference["history"][key][: harness.FIRST_EPOCHS],
                rtol=TOLERANCE,
                atol=TOLERANCE,
                err_msg=key,
            )


def test_sharded_get_weights_and_save_state_raise_value_errors(runs):
    out, _ = runs
    for process in results(out, "first"):
        for action in ("get_weights", "save_state"):
            error = process[f"{action}_error"]
            assert error is not None, action
            assert error["type"] == "ValueError", error
            message = error["message"]
            assert f"`{action}()`" in message
            assert "'net/d1/kernel'" in message
            assert "keras.callbacks.OrbaxCheckpoint" in message
            assert "`ema.swap_weights()`" in message
            assert "keras_ema.EMAOrbaxCheckpoint" in message
        assert not process["refused_file_written"]


def test_load_state_across_processes_keeps_each_shard_on_its_process(runs):
    out, reference = runs
    _, saved = npz_state.read(os.path.join(out, "reference_state.npz"))
    loaded = assembled(out, "loaded")
    for want, got in zip(saved, loaded, strict=True):
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(b, a)
    for process in results(out, "first"):
        assert process["loaded_step"] == reference["first_step"]
        assert process["loaded_laid_out_like_weights"]


def test_resume_through_orbax_checkpoint_equals_uninterrupted(runs):
    out, reference = runs
    for process in results(out, "resume"):
        assert process["resumed_epoch"] == harness.FIRST_EPOCHS
        assert process["resumed_step"] == reference["first_step"]
        assert process["resumed_laid_out_like_weights"]
        assert process["final_step"] == reference["final_step"]
    assert_profiles_close(reference["final"], assembled(out, "resumed"))


@pytest.mark.parametrize("export", ["export", "final"])
def test_ema_weights_exported_across_processes_load_in_one_process(runs, export):
    """`EMAOrbaxCheckpoint` during the first run, and an Orbax save inside
    `swap_weights()` after the resumed one."""
    out, reference = runs
    slow = reference["first" if export == "export" else "final"][1]
    # Read onto this process's devices: Keras restores each array with the
    # sharding of the weight it loads into, under a distribution.
    devices = keras.distribution.list_devices()
    with keras.distribution.DataParallel(devices=devices).scope():
        model = make_model()
        model.load_weights(os.path.join(out, export))
    got = [keras.ops.convert_to_numpy(w.value) for w in model.weights]
    assert [w.path for w in model.weights] == reference["paths"]
    assert_profiles_close([slow], [got])
