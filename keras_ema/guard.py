"""The NaN/Inf guard: whether every element of every value of an update is
finite, in the form (`Guard`) an engine picks for where it runs.

Every form goes through `all_finite`, the one function the engines call:
replacing it (as the benchmark's guard-less mode does) removes the guard
from every engine. The `keras.ops` forms are written here; the torch
backend registers its own (`Guard.HOST`, `Guard.FLAT`) with
`register_form`, since they use torch directly.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import keras
from keras import ops

from keras_ema.sizes import GROUP_ELEMENTS


class Guard(enum.Enum):
    """The form of the NaN/Inf guard's reductions (`all_finite`): the same
    answer from each, each the fastest where it is named for. An engine
    names the form it uses."""

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
    # torch, where every value lives in host memory: read on the host (no
    # device sync there), a Python bool. Registered by the torch backend.
    HOST = "host"
    # torch on a device: `isfinite(x).all()` of each flat buffer, combined
    # on the device. Registered by the torch backend.
    FLAT = "flat"


def _ops_all_finite(values, guard: Guard):
    """Whether every element of every value is finite, as one device scalar
    (the `keras.ops` forms: `Guard.EAGER`, `XLA`, `XLA_CPU`).

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


_FORMS: dict[Guard, Callable] = {
    form: (lambda values, form=form: _ops_all_finite(values, form))
    for form in (Guard.EAGER, Guard.XLA, Guard.XLA_CPU)
}


def register_form(form: Guard, check: Callable) -> None:
    """Makes `check(values)` the implementation of `form` (a backend's own
    form)."""
    _FORMS[form] = check


def forms() -> list[Guard]:
    """The forms this backend runs."""
    return list(_FORMS)


def all_finite(values, form: Guard = Guard.EAGER):
    """Whether every element of every value is finite: a device scalar, or a
    Python bool for `Guard.HOST`.

    Args:
        values: The values an update reads.
        form: The form of the check, for where it runs. Defaults to
            `Guard.EAGER`.
    """
    return _FORMS[form](values)


def assumed_finite(form: Guard):
    """What `all_finite` returns for values known to be finite, in `form`'s
    type (for a replacement of `all_finite` that checks nothing)."""
    return True if form == Guard.HOST else ops.convert_to_tensor(True)
