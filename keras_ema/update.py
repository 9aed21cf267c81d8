"""The EMA update as pure `keras.ops` functions of tensors.

Each backend's engine composes these inside its compiled train step (or
eagerly): the counter advances (`advance`) when the optimizer really moved
the weights (`optimizer_stepped`); each profile's schedule gives its flags
for that step (`profile_flags`); the NaN/Inf guard is one device scalar for
all weights (`all_finite`); and each profile's shadows are blended from the
weights, read once for all profiles (`blend_elementwise`, or
`blend_by_branches` where elementwise selects cost a pass over memory each).
`update_all` and `update_when_due` put the pieces together for all profiles.
No function branches in Python on a tensor's value.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import NamedTuple

import keras
from keras import ops

from keras_ema.schedule import Schedule
from keras_ema.sizes import GROUP_ELEMENTS
from keras_ema.state import Kind


class Flags(NamedTuple):
    """One profile's schedule at one step, as device scalars."""

    due: object  # bool: this step updates the profile
    copies_all: object  # bool: the update copies every weight, ignored ones too
    weight: object  # float32: the interpolation weight of an average


def optimizer_stepped(before, after, accumulation_steps):
    """Whether a train step moved the weights, from the optimizer's own
    iteration counter before and after it: the counter advanced (a
    LossScaleOptimizer's skipped step does not advance it) and, under
    gradient accumulation, reached a multiple of the accumulation steps."""
    moved = ops.greater(after, before)
    if accumulation_steps:
        moved = ops.logical_and(moved, ops.equal(ops.mod(after, accumulation_steps), 0))
    return moved


def advance(step, stepped=None):
    """The step counter after this step: `t`, the steps taken so far."""
    if stepped is None:
        return step + ops.ones_like(step)
    return step + ops.cast(stepped, step.dtype)


def profile_flags(schedule: Schedule, t, stepped=None) -> Flags:
    due = schedule.compiled_is_due(t)
    if stepped is not None:
        due = ops.logical_and(due, stepped)
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


class Guard(enum.Enum):
    """The form of the NaN/Inf guard's reductions (`all_finite`): the same
    answer from each, each the fastest where it is named for."""

    # Each op its own pass over memory (no XLA): a matrix with a last axis of
    # some length is multiplied by a zero vector, one vectorised (and, on
    # CPU, multithreaded) pass, where `all(isfinite(x))` first writes a
    # boolean array and then reduces it.
    EAGER = "eager"
    # Inside an XLA computation: `sum(x * 0)`, which XLA fuses into one pass
    # and which needs no branch (XLA on CPU compiles each matrix-vector
    # product into a loop nest of its own, which lengthens every compile).
    XLA = "xla"
    # Inside an XLA computation on a CPU: the large values are summed as
    # they are, the one reduction XLA on CPU vectorises, and checked as
    # with `XLA` only where a sum is not finite. The branch costs nothing to
    # run on a CPU (on a GPU it would wait for the device to read its
    # predicate), but some compile time, which the small values, read
    # faster than a branch is compiled, do not repay.
    XLA_CPU = "xla_cpu"


def all_finite(values, guard: Guard = Guard.EAGER):
    """Whether every element of every value is finite, as one device scalar.

    Small values of one dtype are concatenated, in order, into groups of up
    to `GROUP_ELEMENTS` elements, one reduction each: the update cannot
    start before this flag is known, and on XLA a reduction per small weight
    costs more than the EMA itself on a model of many small weights. Large
    values are checked alone: concatenating them would copy them, and under
    a `keras.distribution` would gather their shards. `guard`: the form of
    the reductions.
    """
    alone, grouped = _grouped_for_check(values)
    if guard == Guard.XLA_CPU and alone:
        checks = [_sums_then_elements_finite(alone)]
    else:
        checks = [is_finite(value, guard) for value in alone]
    checks += [is_finite(value, guard) for value in grouped]
    return ops.all(ops.stack(checks)) if checks else ops.convert_to_tensor(True)


def _grouped_for_check(values) -> tuple[list, list]:
    """The values over `GROUP_ELEMENTS` elements, and the others grouped."""
    alone, groups, open_group = [], [], {}
    for value in values:
        size = math.prod(value.shape)
        if size > GROUP_ELEMENTS:
            alone.append(value)
            continue
        dtype = keras.backend.standardize_dtype(value.dtype)
        group = open_group.get(dtype)
        if group is None or group[0] + size > GROUP_ELEMENTS:
            group = open_group[dtype] = [0, []]
            groups.append(group[1])
        group[0] += size
        group[1].append(ops.reshape(value, (-1,)))
    grouped = [
        group[0] if len(group) == 1 else ops.concatenate(group) for group in groups
    ]
    return alone, grouped


def _sums_then_elements_finite(values):
    """An Inf or NaN anywhere makes a sum Inf or NaN, so finite sums decide;
    a sum that is not finite may also be an overflow of huge finite values,
    and only then is every element checked."""
    sums = [ops.isfinite(ops.sum(value)) for value in values]
    return ops.cond(
        ops.all(ops.stack(sums)),
        lambda: ops.convert_to_tensor(True),
        lambda: ops.all(ops.stack([is_finite(value, Guard.XLA) for value in values])),
    )


def is_finite(value, guard: Guard = Guard.EAGER):
    """Whether every element of one value is finite, as a device scalar.

    `0 * x` is 0 for a finite `x` and NaN for NaN or Inf, so a sum of such
    products is finite exactly when every element is, and it never
    overflows. Inside an XLA computation (`Guard.XLA` or `Guard.XLA_CPU`),
    the products and their sum fuse into one pass over the value; elsewhere
    (`Guard.EAGER`) a matrix is multiplied by a zero vector.
    """
    if guard != Guard.EAGER and math.prod(value.shape) > 0:
        # A zero made from the data, not a constant a compiler could fold
        # the products with; a NaN or Inf there makes the sum NaN anyway.
        # Indexed, not flattened: flattening a sharded weight gathers it.
        zero = value[(0,) * len(value.shape)] * 0
        return ops.isfinite(ops.sum(value * zero))
    if len(value.shape) < 2 or value.shape[-1] < 8:
        return ops.all(ops.isfinite(value))
    matrix = ops.reshape(value, (-1, value.shape[-1]))
    # Zeros made from the data, not a constant a compiler could fold the
    # product with; a NaN or Inf in that row makes the product NaN anyway.
    zeros = matrix[0] * 0
    return ops.isfinite(ops.sum(ops.matmul(matrix, zeros)))


def _averaged(shadow, value, weight):
    return shadow + ops.cast(weight, shadow.dtype) * (value - shadow)


def blend_elementwise(kinds, shadows, values, flags: Flags, finite) -> list:
    """One profile's new shadows, chosen with elementwise selects on scalar
    flags: XLA fuses them into the one loop that reads each value once."""
    take = ops.logical_and(finite, flags.due)
    copy = ops.logical_and(finite, flags.copies_all)
    new = []
    for kind, shadow, value in zip(kinds, shadows, values, strict=True):
        value = ops.cast(value, shadow.dtype)
        if kind == Kind.AVERAGE:
            moved = ops.where(
                flags.copies_all, value, _averaged(shadow, value, flags.weight)
            )
            new.append(ops.where(take, moved, shadow))
        elif kind == Kind.COPY:
            new.append(ops.where(take, value, shadow))
        else:
            new.append(ops.where(copy, value, shadow))
    return new


def blend_by_branches(kinds, shadows, values, flags: Flags, finite) -> list:
    """`blend_elementwise` with the choice made by `cond` on the scalar
    flags: right where every op is its own pass over memory (TensorFlow
    without XLA), since a branch not taken costs nothing."""
    values = [ops.cast(v, s.dtype) for v, s in zip(values, shadows, strict=True)]

    def averaged():
        new = []
        for kind, shadow, value in zip(kinds, shadows, values, strict=True):
            if kind == Kind.AVERAGE:
                shadow = _averaged(shadow, value, flags.weight)
            elif kind == Kind.COPY:
                shadow = value
            new.append(shadow)
        return new

    def updated():
        return ops.cond(flags.copies_all, lambda: list(values), averaged)

    take = ops.logical_and(finite, flags.due)
    return ops.cond(take, updated, lambda: list(shadows))


Blend = Callable[..., list]


def update_all(
    schedules: Sequence[Schedule],
    kinds,
    counters,
    shadows,
    read_values: Callable[[], list],
    stepped=None,
    blend: Blend = blend_elementwise,
    guard: Guard = Guard.EAGER,
):
    """One step of every profile, the weights read (and checked) every step.

    For steps known to be due: each profile still applies its own flags.

    Args:
        schedules: One schedule per profile.
        kinds: One `Kind` per shadow (or packed group).
        counters: `(step, skipped)` int32 scalars.
        shadows: One list of shadow values per profile.
        read_values: Returns the online values aligned with each profile's
            shadows, cast as they are stored.
        stepped: Optional boolean scalar, `False` when the optimizer did not
            move the weights this step (nothing happens then, the counter
            included); `None` when every step moves them.
        blend: `blend_elementwise` or `blend_by_branches`.
        guard: The form of the NaN/Inf guard's reductions, for where the
            update runs (`Guard`).

    Returns:
        `((step, skipped), shadows, decays)`: the new counters, the new
        shadows per profile, and each profile's decay at the new step.
    """
    step, skipped = counters
    t = advance(step, stepped)
    flags = [profile_flags(schedule, t, stepped) for schedule in schedules]
    new_shadows, skipped = _blend_profiles(
        kinds, shadows, read_values(), flags, skipped, blend, guard
    )
    return (t, skipped), new_shadows, _decays(flags)


def update_when_due(
    schedules: Sequence[Schedule],
    kinds,
    counters,
    shadows,
    read_values: Callable[[], list],
    stepped=None,
    blend: Blend = blend_elementwise,
    guard: Guard = Guard.EAGER,
):
    """`update_all` inside a `cond` on any profile being due: a step that
    updates no profile reads no weight and writes no shadow."""
    step, skipped = counters
    t = advance(step, stepped)
    flags = [profile_flags(schedule, t, stepped) for schedule in schedules]

    def due():
        values = read_values()
        return _blend_profiles(kinds, shadows, values, flags, skipped, blend, guard)

    def not_due():
        return [list(s) for s in shadows], skipped

    new_shadows, skipped = ops.cond(any_due(flags), due, not_due)
    return (t, skipped), new_shadows, _decays(flags)


def _blend_profiles(kinds, shadows, values, flags, skipped, blend, guard):
    finite = all_finite(values, guard)
    new = [
        blend(kinds, profile_shadows, values, profile_flags_, finite)
        for profile_shadows, profile_flags_ in zip(shadows, flags, strict=True)
    ]
    return new, skipped + ops.cast(ops.logical_not(finite), skipped.dtype)


def _decays(flags: Sequence[Flags]) -> list:
    return [1.0 - f.weight for f in flags]
