"""The snapshots of one `PostHocEMA` run: which steps get one, its folder
taken over, a snapshot taken on those steps, written by the background
thread and, with `max_snapshots`, the files the spacing no longer keeps
deleted (the host copies and the background thread are in
`keras_ema.posthoc.writer`).

Which steps get a snapshot: every `snapshot_every`-th step, the spacing
doubled as often as needed to keep at most `max_snapshots` files
(`spacing_at`), and the files it no longer keeps (`thinned`). When to
snapshot is decided on the host, from the EMA's step counter (`RunSteps`
in `keras_ema.steps`). During `fit` that counter is the counter at the
start of the `fit` (read once) plus the optimizer steps since: each batch
with a plain optimizer, every `gradient_accumulation_steps`-th batch under
gradient accumulation, and with a `LossScaleOptimizer` (whose skipped steps
only the device knows) what its inner optimizer's counter says, read back
at every batch. The count is made in `on_train_batch_begin`, which Keras
calls in its training thread before the next step; `on_train_batch_end` is
not used: Keras would either run it in a worker thread while the next step
already changes the values to copy, or, for a callback that is not
async-safe, convert every batch's logs to Python numbers first, a device
sync per step. The last step of an epoch is seen in `on_epoch_end`, where
the optimizer's counter is read.
"""

from __future__ import annotations

import contextlib
import os

from keras_ema.posthoc.folder import snapshot_paths
from keras_ema.posthoc.folder import take_over_folder
from keras_ema.posthoc.writer import WriterThread
from keras_ema.posthoc.writer import snapshot_values
from keras_ema.posthoc.writer import wait_for_folder
from keras_ema.posthoc.writer import write_snapshot


def spacing_at(step: int, snapshot_every: int, max_snapshots: int | None) -> int:
    """The steps between regular snapshots once the counter is at `step`:
    `snapshot_every`, doubled as often as `max_snapshots - 1` requires."""
    spacing = snapshot_every
    if max_snapshots is not None:
        while step // spacing > max_snapshots - 1:
            spacing *= 2
    return spacing


def thinned(files: list, step: int, spacing: int) -> list:
    """The paths of the snapshots before `step` that `spacing` no longer
    keeps, among `files`, `(step, path)` pairs."""
    return [
        path for file_step, path in files if file_step < step and file_step % spacing
    ]


class Snapshots:
    """The snapshot files a `PostHocEMA` writes into its `directory`.

    Args:
        ema: The `PostHocEMA`: its arguments, run id and model fingerprint
            describe the files, its shadows and model give the values.
    """

    def __init__(self, ema) -> None:
        self._ema = ema
        # The step of the newest snapshot of this run in `directory`; `None`
        # until the folder is checked for the current state.
        self.last = None
        self.verified = set()
        self.writer = WriterThread()

    def start(self, step: int) -> None:
        """Checks that `directory` holds only this run's snapshots and
        deletes those after `step`, the step the run goes on from."""
        ema = self._ema
        directory = ema.directory
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(
                "`directory` must be a folder of snapshots, but it is a file. "
                f"Received: directory={directory!r}"
            )
        self.wait()
        wait_for_folder(directory)
        self.last = take_over_folder(
            directory,
            step,
            self.verified,
            run_id=ema.run_id,
            fingerprint=ema._fingerprint,
            sigma_rels=ema.sigma_rels,
        )

    def wait(self) -> None:
        """Waits for the writes in flight; raises the first error one met."""
        self.writer.close()

    def spacing(self, step: int) -> int:
        return spacing_at(step, self._ema.snapshot_every, self._ema.max_snapshots)

    def if_due(self, step: int) -> None:
        """Takes a snapshot of `step` if the spacing keeps one there."""
        if step > self.last and step % self.spacing(step) == 0:
            self.take(step)

    def latest_update(self, step: int) -> int | None:
        """Takes a snapshot dated by the latest update at or before `step`,
        unless one of that step exists; returns its step (`None` before the
        first update)."""
        latest = step - step % self._ema.update_every
        if latest < 1:
            return None
        if latest > self.last:
            self.take(latest)
        return latest

    def take(self, step: int) -> None:
        """Copies the averages and buffers to the host, then leaves the file
        to the background writer."""
        ema = self._ema
        # One write at a time: the host copies of a snapshot are held until
        # it is written.
        self.writer.finish()
        model = ema.model  # On JAX, syncs Keras' train state into the model.
        state = ema._require_state()
        shadows = ema._engine.host_shadows()
        averaged, buffers = snapshot_values(state, shadows, model)
        self.writer.submit(ema.directory, self.write, step, averaged, buffers)
        self.last = step

    def write(self, step: int, averaged: dict, buffers: dict) -> None:
        """In the writer thread: the file, then (with `max_snapshots`) the
        deletion of the snapshots the spacing no longer keeps."""
        ema = self._ema
        path = write_snapshot(
            ema.directory,
            step,
            ema.sigma_rels,
            ema.update_every,
            averaged,
            buffers,
            ema._fingerprint,
            ema.run_id,
            ema.snapshot_dtype,
        )
        self.verified.add(path)
        if ema.max_snapshots is None:
            return
        files = snapshot_paths(ema.directory)
        for other in thinned(files, step, self.spacing(step)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(other)
            self.verified.discard(other)
