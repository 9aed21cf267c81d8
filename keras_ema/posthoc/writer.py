"""Writing post-hoc EMA snapshots: `write_snapshot`, one file, validated,
then written atomically (the layout is in `keras_ema.posthoc.format`); and
for `PostHocEMA`, the values a snapshot copies to the host and the
background thread that writes them, with the writes in flight per folder."""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np

from keras_ema.backends.base import host_copy
from keras_ema.checks import is_int
from keras_ema.posthoc.format import FORMAT
from keras_ema.posthoc.format import SNAPSHOT_DTYPES
from keras_ema.posthoc.format import VERSION
from keras_ema.posthoc.format import dtype_name
from keras_ema.posthoc.format import encode_averaged
from keras_ema.posthoc.format import encode_buffer
from keras_ema.posthoc.format import is_float
from keras_ema.posthoc.format import is_numeric
from keras_ema.posthoc.format import snapshot_filename
from keras_ema.saving.atomic import write_atomically
from keras_ema.schedule import checked_sigma_rels
from keras_ema.schedule import sigma_rel_to_gamma

# Snapshot writes not finished yet, by real path of their folder, across
# callbacks: a callback that takes over a folder (a run resumed in the same
# process) first waits for the writes of the one it replaces.
_IN_FLIGHT: dict[str, set] = {}
_IN_FLIGHT_LOCK = threading.Lock()


def write_snapshot(
    directory: str | os.PathLike,
    step: int,
    sigma_rels: Sequence[float],
    update_every: int,
    averaged: Mapping[str, Sequence[np.ndarray]],
    buffers: Mapping[str, np.ndarray],
    fingerprint: str,
    run_id: str,
    dtype: str = "float32",
) -> str:
    """Writes one post-hoc EMA snapshot, atomically.

    The snapshot holds, for every averaged variable, its value under each
    tracked profile, and for every buffer its online value. The file goes to
    `directory/snapshot_filename(step)` (replacing one of the same step): a
    temporary file in `directory` first, then `os.replace`. The directory is
    created if needed. Values are validated before anything is written.

    Example:

    >>> kernel = np.zeros((6, 8), "float32")
    >>> write_snapshot(
    ...     "my_snapshots", step=4096, sigma_rels=(0.05, 0.10), update_every=1,
    ...     averaged={"net/d1/kernel": [kernel, kernel + 1.0]},
    ...     buffers={"net/bn/moving_mean": np.zeros(8, "float32")},
    ...     fingerprint="my-model", run_id="run-1",
    ... )
    'my_snapshots/snapshot-000000004096.npz'

    Args:
        directory: The folder of the run's snapshots.
        step: The step of the snapshot (optimizer steps taken), >= 1: the
            time of every profile in it.
        sigma_rels: The tracked `sigma_rel`s, distinct, in `(0, 12**-0.5)`.
        update_every: How often the profiles were updated, in steps;
            recorded as metadata.
        averaged: Variable path -> one floating-point array per profile, in
            `sigma_rels` order, all of the variable's shape.
        buffers: Variable path -> its online value (numeric).
        fingerprint: A string identifying the model, e.g.
            `model_fingerprint(model.weights)`.
        run_id: A string identifying the training run.
        dtype: How averaged values are stored: `"float32"`, `"float16"` or
            `"bfloat16"`. Defaults to `"float32"`.

    Returns:
        The path of the file written.
    """
    header, arrays = _snapshot_contents(
        step, sigma_rels, update_every, averaged, buffers, fingerprint, run_id, dtype
    )
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, snapshot_filename(step))
    write_atomically(path, lambda file: np.savez(file, **arrays))
    return path


def _snapshot_contents(
    step, sigma_rels, update_every, averaged, buffers, fingerprint, run_id, dtype
):
    if not is_int(step) or step < 1:
        raise ValueError(f"`step` must be a positive integer. Received: step={step!r}")
    sigma_rels = tuple(float(s) for s in checked_sigma_rels(sigma_rels))
    if not is_int(update_every) or update_every < 1:
        raise ValueError(
            "`update_every` must be a positive integer. "
            f"Received: update_every={update_every!r}"
        )
    for name, value in (("fingerprint", fingerprint), ("run_id", run_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"`{name}` must be a non-empty string. Received: {name}={value!r}"
            )
    if dtype not in SNAPSHOT_DTYPES:
        raise ValueError(
            f"`dtype` must be one of {SNAPSHOT_DTYPES}. Received: dtype={dtype!r}"
        )
    shared = set(averaged) & set(buffers)
    if shared:
        raise ValueError(
            "`averaged` and `buffers` must not share a path. "
            f"Received: both hold {sorted(shared)[:10]}"
        )
    variables, arrays = [], {}
    for path, values in averaged.items():
        index = len(variables)
        values = _averaged_values(path, values, len(sigma_rels))
        variables.append(_spec(path, values[0], "averaged"))
        for profile, value in enumerate(values):
            arrays[f"averaged_{index}_{profile}"] = encode_averaged(path, value, dtype)
    for path, value in buffers.items():
        index = len(variables)
        value = np.asarray(value)
        if not is_numeric(value.dtype):
            raise ValueError(
                f"`buffers` must hold numeric arrays. Received: "
                f"buffers[{path!r}] of dtype {value.dtype}"
            )
        variables.append(_spec(path, value, "buffer"))
        arrays[f"buffer_{index}"] = encode_buffer(value)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "sigma_rels": list(sigma_rels),
        "gammas": [sigma_rel_to_gamma(s) for s in sigma_rels],
        "update_every": int(update_every),
        "snapshot_dtype": dtype,
        "fingerprint": fingerprint,
        "run_id": run_id,
        "variables": variables,
    }
    return header, arrays


def _averaged_values(path, values, profiles) -> list:
    if isinstance(values, np.ndarray) or not isinstance(values, Sequence):
        raise ValueError(
            "`averaged` must map each path to a list of arrays, one per profile. "
            f"Received: averaged[{path!r}] of type {type(values).__name__}"
        )
    values = [np.asarray(v) for v in values]
    if len(values) != profiles:
        raise ValueError(
            f"`averaged` must hold one array per profile ({profiles}). "
            f"Received: {len(values)} arrays for averaged[{path!r}]"
        )
    for value in values:
        if not is_float(value.dtype):
            raise ValueError(
                "`averaged` must hold floating-point arrays. "
                f"Received: averaged[{path!r}] of dtype {value.dtype}"
            )
        if value.shape != values[0].shape or value.dtype != values[0].dtype:
            raise ValueError(
                "`averaged` must hold arrays of one shape and dtype per path. "
                f"Received: averaged[{path!r}] with shapes "
                f"{[v.shape for v in values]} and dtypes "
                f"{[str(v.dtype) for v in values]}"
            )
    return values


def _spec(path, value, kind) -> dict:
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"Variable paths must be non-empty strings. Received: path={path!r}"
        )
    return {
        "path": path,
        "shape": list(value.shape),
        "dtype": dtype_name(value.dtype),
        "kind": kind,
    }


# ------------------------------------------------------------------
# PostHocEMA's writes


def snapshot_values(state, shadows: list[list], model) -> tuple[dict, dict]:
    """`(averaged, buffers)` for `write_snapshot`: path -> one host copy per
    profile of each tracked weight's shadow (`shadows`, per profile, from
    the engine's `host_shadows`), and path -> a host copy of each other
    weight of `model`."""
    averaged = {
        path: [profile[index] for profile in shadows]
        for index, path in enumerate(state.paths)
    }
    tracked = {id(weight) for weight in state.weights}
    # Variable by variable: under a JAX `keras.distribution` each copy
    # gathers one variable's shards to the host.
    buffers = {
        weight.path: host_copy(weight.value)
        for weight in model.weights
        if id(weight) not in tracked
    }
    return averaged, buffers


class WriterThread:
    """One thread that runs the writes handed to it, in order; the thread
    starts with the first write and ends with `close`."""

    def __init__(self) -> None:
        self._executor = None
        self._pending = []

    def submit(self, directory: str, write: Callable, *args) -> None:
        """Runs `write(*args)` in the thread, as a write to `directory`."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="keras_ema_snapshots"
            )
        future = self._executor.submit(write, *args)
        self._pending.append(future)
        _track(directory, future)

    def finish(self) -> None:
        """Waits for the writes handed over so far; raises the first error."""
        pending, self._pending = self._pending, []
        error = None
        for future in pending:
            try:
                future.result()
            except BaseException as exception:
                error = error or exception
        if error is not None:
            raise error

    def close(self) -> None:
        """`finish`, then ends the thread (a later `submit` starts another)."""
        try:
            self.finish()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def wait_for_folder(directory: str) -> None:
    """Waits for every write in flight to `directory` (their errors are
    their callbacks' to raise)."""
    with _IN_FLIGHT_LOCK:
        futures = list(_IN_FLIGHT.get(_folder_key(directory), ()))
    concurrent.futures.wait(futures)


def _folder_key(directory: str) -> str:
    return os.path.realpath(directory)


def _track(directory: str, future) -> None:
    key = _folder_key(directory)
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.setdefault(key, set()).add(future)

    def done(finished) -> None:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.get(key, set()).discard(finished)

    future.add_done_callback(done)
