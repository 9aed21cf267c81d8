"""Step accounting: whether a train step moved the weights, the EMA's step
counter, and each profile's flags at a step, in compiled code and on the
host.

The rule, in one place: the EMA's step counter `t` counts the optimizer
steps that moved the weights. A step moved them when the optimizer's own
iteration counter advanced (a `LossScaleOptimizer`'s skipped step does not
advance it) and, under gradient accumulation, reached a multiple of the
accumulation steps (`optimizer_step_rule`).

In compiled code (device scalars): `optimizer_moved` tells a step that moved
the weights, `counted_step` is the counter after a step, `profile_flags`
gives each profile's `Flags` at `t`.

On the host (Python values), for engines that decide the schedule in
Python and for `PostHocEMA`'s snapshot steps: `OptimizerSteps` mirrors the
optimizer's counter (`follow` a step), `HostCounters` mirrors the EMA's
counter with each profile's `HostFlags` (`count_step`), `FitSteps` gives
the EMA's counter in closed form from the optimizer's counter during one
`fit`, and `RunSteps` is `PostHocEMA`'s one mirror of the counter, inside
and outside `fit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import keras
from keras import ops

from keras_ema import _internals
from keras_ema.schedule import Schedule
from keras_ema.state import Kind

# --------------------------------------------------------------------------
# The rule


def optimizer_step_rule(optimizer) -> tuple:
    """How to tell whether a train step moved the weights.

    Returns `(iterations_variable, accumulation_steps)`: the weights moved in
    a step when the optimizer's own counter advanced and, under gradient
    accumulation, reached a multiple of the accumulation steps.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    accumulation = getattr(inner, "gradient_accumulation_steps", None)
    return _internals.raw_iterations(inner), accumulation


def reads_device(optimizer) -> bool:
    """Whether only the device knows if a step moved the weights: a
    `LossScaleOptimizer` skips the steps whose gradients overflow."""
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def optimizer_may_skip(optimizer) -> bool:
    """Whether a train step can leave the weights as they were: under
    gradient accumulation, or a LossScaleOptimizer's skipped step."""
    accumulation = optimizer_step_rule(optimizer)[1]
    return bool(accumulation) or reads_device(optimizer)


def _moved_at(count: int, accumulation) -> bool:
    """Whether the optimizer step that brought its counter to `count` moved
    the weights."""
    return not accumulation or count % accumulation == 0


def _moves_between(start: int, end: int, accumulation) -> int:
    """The optimizer steps that moved the weights while its counter went
    from `start` to `end`."""
    if accumulation:
        return end // accumulation - start // accumulation
    return end - start


# --------------------------------------------------------------------------
# In compiled code


class Flags(NamedTuple):
    """One profile's schedule at one step, as device scalars."""

    due: object  # bool: this step updates the profile
    copies_all: object  # bool: the update copies every weight, ignored ones too
    weight: object  # float32: the interpolation weight of an average


def optimizer_moved(before, after, accumulation_steps):
    """Whether a train step moved the weights, from the optimizer's own
    iteration counter before and after it (device scalars; see the module
    docstring for the rule)."""
    moved = ops.greater(after, before)
    if accumulation_steps:
        moved = ops.logical_and(moved, ops.equal(ops.mod(after, accumulation_steps), 0))
    return moved


def counted_step(step, moved=None):
    """The step counter after this step: `t`, the steps taken so far.
    `moved`: whether the optimizer moved the weights; `None` when every
    step moves them."""
    if moved is None:
        return step + ops.ones_like(step)
    return step + ops.cast(moved, step.dtype)


def profile_flags(schedule: Schedule, t, moved=None) -> Flags:
    """One profile's flags at step `t`; nothing is due where the optimizer
    did not move the weights."""
    due = schedule.compiled_is_due(t)
    if moved is not None:
        due = ops.logical_and(due, moved)
    copies_all = ops.logical_and(due, schedule.compiled_copies_all(t))
    return Flags(due, copies_all, schedule.compiled_weight(t))


def any_due(flags: Sequence[Flags]):
    due = flags[0].due
    for other in flags[1:]:
        due = ops.logical_or(due, other.due)
    return due


def every_step_due(schedules: Sequence[Schedule]) -> bool:
    """Whether every optimizer step updates every profile."""
    return all(schedule.update_every == 1 for schedule in schedules)


# --------------------------------------------------------------------------
# On the host


class OptimizerSteps:
    """The optimizer's iteration counter mirrored on the host.

    Read once when training starts, then followed per train step. A
    `LossScaleOptimizer` skips steps whose gradients overflow, which only the
    device knows: with one, every step reads the counter back (a device sync
    per step, the price of exact counting).
    """

    def __init__(self, optimizer):
        self.iterations, self.accumulation = optimizer_step_rule(optimizer)
        self.reads_device = reads_device(optimizer)
        self.sync()

    def sync(self) -> None:
        """Re-reads the counter (`train_on_batch` may have advanced it
        between two fits)."""
        self.count = int(ops.convert_to_numpy(self.iterations.value))

    def follow(self, iterations) -> bool:
        """Follows one train step; returns whether it moved the weights,
        given the optimizer's counter after it (a device value, read only
        when it must be)."""
        if self.reads_device:
            before, self.count = self.count, int(iterations)
            if self.count == before:
                return False
        else:
            self.count += 1
        return _moved_at(self.count, self.accumulation)


class HostFlags(NamedTuple):
    """One profile's schedule at one step, as Python values."""

    due: bool
    copies_all: bool
    weight: float

    def kind_weights(self) -> dict:
        """The interpolation weight of each `Kind` (0 leaves a shadow as it
        is, 1 copies the weight)."""
        if not self.due:
            return dict.fromkeys(Kind, 0.0)
        return {
            Kind.AVERAGE: 1.0 if self.copies_all else self.weight,
            Kind.COPY: 1.0,
            Kind.IGNORE: 1.0 if self.copies_all else 0.0,
        }


class HostCounters:
    """The EMA's step counter (`t`, the optimizer steps taken) on the host,
    with every profile's schedule.

    Args:
        schedules: One schedule per profile.
    """

    def __init__(self, schedules: Sequence[Schedule]):
        self.schedules = list(schedules)
        self.step = 0

    def read(self, step_variable) -> None:
        self.step = int(ops.convert_to_numpy(step_variable.value))

    def count_step(self, moved: bool = True) -> list[HostFlags] | None:
        """Counts one optimizer step if it moved the weights; returns each
        profile's flags if it updates any."""
        if not moved:
            return None
        t = self.step + 1
        flags = []
        for schedule in self.schedules:
            due = schedule.is_due(t)
            copies = due and schedule.copies_all(t)
            flags.append(HostFlags(due, copies, schedule.weight(t)))
        # Counted once the schedules gave their weights: one that cannot
        # (a length only a `fit` knows) leaves the counter as it was.
        self.step = t
        return flags if any(f.due for f in flags) else None

    def decays(self) -> list[float]:
        """Each profile's decay at the current step, for the logs."""
        return [schedule.decay(self.step) for schedule in self.schedules]


class FitSteps:
    """The EMA's step counter during one `fit`, in closed form from the
    counter at its start and the optimizer's own counter.

    Args:
        optimizer: The model's optimizer.
        step: The EMA's step counter now.
    """

    def __init__(self, optimizer, step: int):
        self.accumulation = optimizer_step_rule(optimizer)[1]
        self.reads_device = reads_device(optimizer)
        self.start_step = step
        self.start_iterations = self.epoch_iterations = self.read(optimizer)

    @staticmethod
    def read(optimizer) -> int:
        """The optimizer's own counter now (its inner optimizer's, for a
        `LossScaleOptimizer`), read from the device."""
        iterations, _ = optimizer_step_rule(optimizer)
        return int(ops.convert_to_numpy(iterations.value))

    def step_at(self, iterations: int) -> int:
        """The EMA's step counter once the optimizer's is at `iterations`:
        one step per optimizer step that moved the weights."""
        moved = _moves_between(self.start_iterations, iterations, self.accumulation)
        return self.start_step + moved


class RunSteps:
    """The EMA's step counter mirrored on the host from the start of a run,
    with no device read after it: counted once per `update()` outside `fit`,
    and during a `fit` followed from the optimizer's own counter
    (`FitSteps`).
    """

    def __init__(self) -> None:
        # `None` until the run starts: the counter is then read again.
        self.step = None
        # During a `fit`: the optimizer's counter at its start.
        self.fit = None

    @property
    def started(self) -> bool:
        return self.step is not None

    def start(self, step: int, optimizer=None) -> None:
        """Starts from `step`, the EMA's counter read now; with `optimizer`,
        for a `fit`, whose steps follow the optimizer's counter."""
        self.step = step
        self.fit = None if optimizer is None else FitSteps(optimizer, step)

    def stop(self) -> None:
        """Forgets the counter, to be read again at the next start."""
        self.step = None
        self.fit = None

    def count_update(self) -> int:
        """Counts one `update()` outside `fit`; returns the step after it."""
        self.step += 1
        return self.step

    def follow(self, iterations: int) -> int:
        """The step once the optimizer's counter is at `iterations`, during
        a `fit`."""
        self.step = self.fit.step_at(iterations)
        return self.step
