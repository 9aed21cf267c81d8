"""Step accounting: whether a train step moved the weights, the EMA's step
counter, and each profile's flags at a step, in compiled code and on the
host.

The rule, in one place: the EMA's step counter `t` counts the optimizer
steps that moved the weights. A step moved them when the optimizer's own
iteration counter advanced (a `LossScaleOptimizer`'s skipped step does not
advance it) and, under gradient accumulation, reached a multiple of the
accumulation steps (`optimizer_step_rule`). Which optimizers, and whether
each step reads their counters, is `step_rule`: Keras' own `train_step`
applies the model's optimizer at every step; a model's own `train_step`
may apply it on some steps only, or apply optimizers of its own (a GAN's),
so their counters are read at every step, and a step counts when any of
them moved the weights; with no optimizer to read, every step counts.

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


class StepRule(NamedTuple):
    """Which optimizers tell whether a train step moved the weights.

    `optimizers`: the optimizers whose counters are followed (none: every
    train step moved the weights). `per_step`: whether a step may leave the
    weights as they were, so that compiled code compares the counters before
    and after each step. `host_reads`: whether only the device knows, so
    that the host reads the counters back after each step.
    """

    optimizers: tuple
    per_step: bool
    host_reads: bool


def step_rule(model, in_train_state_only: bool = False) -> StepRule:
    """The `StepRule` of `model`'s train step.

    With Keras' own `train_step`, the model's optimizer moves the weights at
    every step unless it may skip one (`optimizer_may_skip`). A `train_step`
    of the model's own may apply the model's optimizer on some steps only,
    or optimizers the model holds as attributes (a GAN's `d_optimizer` and
    `g_optimizer`): each step reads all their counters. With
    `in_train_state_only` (JAX, whose compiled step sees only the model's
    optimizer in Keras' train state), a model that holds other optimizers
    counts every step.
    """
    optimizer = getattr(model, "optimizer", None)
    if type(model).train_step is keras.Model.train_step:
        if optimizer is None:
            return StepRule((), False, False)
        may_skip = optimizer_may_skip(optimizer)
        return StepRule((optimizer,), may_skip, reads_device(optimizer))
    held = [optimizer] if optimizer is not None else []
    for value in vars(model).values():
        if isinstance(value, keras.optimizers.Optimizer) and not any(
            value is known for known in held
        ):
            if in_train_state_only:
                return StepRule((), False, False)
            held.append(value)
    return StepRule(tuple(held), bool(held), bool(held))


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


def counters_before(rule: StepRule, read) -> list | None:
    """The counters of `rule`'s optimizers before a train step (device
    scalars, each read with `read(variable)`), or `None` where every step
    moves the weights."""
    if not rule.per_step:
        return None
    return [read(optimizer_step_rule(o)[0]) for o in rule.optimizers]


def any_optimizer_moved(rule: StepRule, read, before):
    """Whether a train step moved the weights, in compiled code: any of
    `rule`'s optimizers moved them since its counters were `before`
    (`counters_before`); `None` where every step moves them."""
    if before is None:
        return None
    moved = None
    for optimizer, earlier in zip(rule.optimizers, before, strict=True):
        iterations, accumulation = optimizer_step_rule(optimizer)
        this = optimizer_moved(earlier, read(iterations), accumulation)
        moved = this if moved is None else ops.logical_or(moved, this)
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
    """The counters of a `StepRule`'s optimizers mirrored on the host.

    Read once when training starts, then followed per train step. Where a
    step may leave the weights as they were without the host knowing (a
    `LossScaleOptimizer` skips steps whose gradients overflow, a model's own
    `train_step` may apply an optimizer on some steps only), every step
    reads the counters back (a device sync per step, the price of exact
    counting).

    Args:
        rule: The model's `StepRule`.
    """

    def __init__(self, rule: StepRule):
        counters = [optimizer_step_rule(o) for o in rule.optimizers]
        self.iterations = [iterations for iterations, _ in counters]
        self.accumulations = [accumulation for _, accumulation in counters]
        self.reads_device = rule.host_reads
        self.sync()

    def sync(self) -> None:
        """Re-reads the counters (`train_on_batch` may have advanced them
        between two fits)."""
        self.counts = [int(ops.convert_to_numpy(i.value)) for i in self.iterations]

    def follow(self, iterations=None) -> bool:
        """Follows one train step; returns whether it moved the weights,
        given the counters after it (device values, read only when they
        must be)."""
        if not self.iterations:
            return True
        if not self.reads_device:
            self.counts = [count + 1 for count in self.counts]
            return any(
                _moved_at(c, a)
                for c, a in zip(self.counts, self.accumulations, strict=True)
            )
        before, self.counts = self.counts, [int(value) for value in iterations]
        return any(
            after > earlier and _moved_at(after, accumulation)
            for earlier, after, accumulation in zip(
                before, self.counts, self.accumulations, strict=True
            )
        )


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
        model: The model `fit` trains, with its optimizer.
        step: The EMA's step counter now.
    """

    def __init__(self, model, step: int):
        optimizer = model.optimizer
        self.accumulation = optimizer_step_rule(optimizer)[1]
        # A model's own `train_step` may skip the optimizer on some steps.
        self.reads_device = step_rule(model).host_reads
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

    def start(self, step: int, model=None) -> None:
        """Starts from `step`, the EMA's counter read now; with `model`, the
        model a `fit` trains, whose steps follow its optimizer's counter."""
        self.step = step
        self.fit = None if model is None else FitSteps(model, step)

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
