"""Which steps get a `PostHocEMA` snapshot: the spacing (doubled to keep at
most `max_snapshots` files) and the files it no longer keeps.

When to snapshot is decided on the host, from the EMA's step counter during
`fit` (`keras_ema.steps.FitSteps`). The EMA's step counter advances
once per optimizer step, so it is the counter at the start of the `fit`
(read once) plus the optimizer steps since: each batch with a plain
optimizer, every `gradient_accumulation_steps`-th batch under gradient
accumulation, and with a `LossScaleOptimizer` (whose skipped steps only the
device knows) what its inner optimizer's counter says, read back at every
batch. The count is made in `on_train_batch_begin`, which Keras calls in its
training thread before the next step; `on_train_batch_end` is not used: Keras
would either run it in a worker thread while the next step already changes
the values to copy, or, for a callback that is not async-safe, convert every
batch's logs to Python numbers first, a device sync per step. The last step
of an epoch is seen in `on_epoch_end`, where the optimizer's counter is read.
"""

from __future__ import annotations


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
