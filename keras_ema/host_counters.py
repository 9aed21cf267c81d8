"""The EMA's step counter and the optimizer's, mirrored on the host.

Engines that decide the schedule in Python (torch, and every engine with
host shadows) keep the counter here, read from its variable once per `fit`
or loaded state, so that no step waits for the device to say whether it
updates. `OptimizerSteps` mirrors the optimizer's own counter the same way,
to tell whether a step moved the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import keras
from keras import ops

from keras_ema import _internals
from keras_ema.schedule import Schedule
from keras_ema.state import Kind


def optimizer_step_rule(optimizer) -> tuple:
    """How to tell whether a train step moved the weights.

    Returns `(iterations_variable, accumulation_steps)`: the weights moved in
    a step when the optimizer's own counter advanced and, under gradient
    accumulation, reached a multiple of the accumulation steps.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    accumulation = getattr(inner, "gradient_accumulation_steps", None)
    return _internals.raw_iterations(inner), accumulation


def optimizer_may_skip(optimizer) -> bool:
    """Whether a train step can leave the weights as they were: under
    gradient accumulation, or a LossScaleOptimizer's skipped step."""
    accumulation = optimizer_step_rule(optimizer)[1]
    return bool(accumulation) or isinstance(
        optimizer, keras.optimizers.LossScaleOptimizer
    )


class OptimizerSteps:
    """The optimizer's iteration counter mirrored on the host.

    Read once when training starts, then advanced per train step. A
    `LossScaleOptimizer` skips steps whose gradients overflow, which only the
    device knows: with one, every step reads the counter back (a device sync
    per step, the price of exact counting).
    """

    def __init__(self, optimizer):
        self.iterations, self.accumulation = optimizer_step_rule(optimizer)
        self.reads_device = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.sync()

    def sync(self) -> None:
        """Re-reads the counter (`train_on_batch` may have advanced it
        between two fits)."""
        self.count = int(ops.convert_to_numpy(self.iterations.value))

    def advance(self, iterations) -> bool:
        """Whether the step just run moved the weights, given the optimizer's
        counter after it (a device value, read only when it must be)."""
        if self.reads_device:
            before, self.count = self.count, int(iterations)
            if self.count == before:
                return False
        else:
            self.count += 1
        return not self.accumulation or self.count % self.accumulation == 0


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

    def advance(self, stepped: bool = True) -> list[HostFlags] | None:
        """Counts a step; returns each profile's flags if it updates any."""
        if not stepped:
            return None
        self.step += 1
        t = self.step
        flags = []
        for schedule in self.schedules:
            due = schedule.is_due(t)
            copies = due and schedule.copies_all(t)
            flags.append(HostFlags(due, copies, schedule.weight(t)))
        return flags if any(f.due for f in flags) else None

    def decays(self) -> list[float]:
        """Each profile's decay at the current step, for the logs."""
        return [schedule.decay(self.step) for schedule in self.schedules]
