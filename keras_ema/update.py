"""The EMA update as pure `keras.ops` functions of tensors.

Each backend's engine composes these inside its compiled train step (or
eagerly): the step counter and each profile's flags for that step come from
`keras_ema.steps` (`counted_step`, `profile_flags`); the NaN/Inf guard is
one device scalar for all weights (`keras_ema.guard.all_finite`); and each
profile's shadows are blended from the weights, read once for all profiles
(`blend_elementwise`, or `blend_by_branches` where elementwise selects cost
a pass over memory each).
`update_all` and `update_when_due` put the pieces together for all profiles.
No function branches in Python on a tensor's value.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

from keras import ops

from keras_ema import guard as guard_
from keras_ema.guard import Guard
from keras_ema.schedule import Schedule
from keras_ema.state import Kind
from keras_ema.steps import Flags
from keras_ema.steps import any_due
from keras_ema.steps import counted_step
from keras_ema.steps import profile_flags


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
    counted: bool = False,
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
        counted: Whether `counters` already count this step (an engine
            that counts steps on the host); otherwise the step is counted
            here.

    Returns:
        `((step, skipped), shadows, decays)`: the new counters, the new
        shadows per profile, and each profile's decay at the new step.
    """
    t, skipped = _this_step(counters, stepped, counted)
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
    counted: bool = False,
):
    """`update_all` inside a `cond` on any profile being due: a step that
    updates no profile reads no weight and writes no shadow."""
    t, skipped = _this_step(counters, stepped, counted)
    flags = [profile_flags(schedule, t, stepped) for schedule in schedules]

    def due():
        values = read_values()
        return _blend_profiles(kinds, shadows, values, flags, skipped, blend, guard)

    def not_due():
        return [list(s) for s in shadows], skipped

    new_shadows, skipped = ops.cond(any_due(flags), due, not_due)
    return (t, skipped), new_shadows, _decays(flags)


def _this_step(counters, stepped, counted: bool) -> tuple:
    """`(t, skipped)`: this step's counter, counted here unless `counted`."""
    step, skipped = counters
    return (step if counted else counted_step(step, stepped)), skipped


def _blend_profiles(kinds, shadows, values, flags, skipped, blend, guard):
    finite = guard_.all_finite(values, guard)
    new = [
        blend(kinds, profile_shadows, values, profile_flags_, finite)
        for profile_shadows, profile_flags_ in zip(shadows, flags, strict=True)
    ]
    return new, skipped + ops.cast(ops.logical_not(finite), skipped.dtype)


def _decays(flags: Sequence[Flags]) -> list:
    return [1.0 - f.weight for f in flags]
