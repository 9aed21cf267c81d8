"""Shadow variables of a model and the fused EMA update over all of them.

`ShadowState` owns one shadow `keras.Variable` per tracked model weight (every
floating-point weight, trainable or not), plus the step counter, the
"initialised" flag and the count of updates skipped for non-finite weights.
`fused_update` is the article's `update()` written as one pure function of
tensors with `keras.ops`, so that it can be traced into a compiled train step.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from collections.abc import Sequence

import keras
from keras import ops

from keras_ema import _backend
from keras_ema.schedule import WarmupSchedule


class Kind(enum.IntEnum):
    """How a tracked weight is treated once the warm-up is over."""

    AVERAGE = 0
    COPY = 1  # `param_or_buffer_names_no_ema`: copied, never averaged.
    IGNORE = 2  # `ignore_names` / `ignore_startswith_names`: left as is.


def shadow_dtype(dtype: str) -> str:
    """float64 weights keep float64 shadows; every other float gets float32.

    A bfloat16 shadow with beta 0.999 would never move (its 8-bit mantissa
    rounds `(1 - beta) * delta` away), so low-precision weights are averaged
    in float32 and cast back on a swap.
    """
    return "float64" if dtype == "float64" else "float32"


def check_names(name: str, value) -> tuple[str, ...]:
    """Validates a name filter argument: a collection of strings."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(
            f"`{name}` must be a collection of strings (variable paths). "
            f"Received: {name}={value!r}"
        )
    names = tuple(value)
    for item in names:
        if not isinstance(item, str):
            raise ValueError(
                f"`{name}` must contain only strings. Received: {name}={value!r}"
            )
    return names


def tracked_weights(model) -> list:
    """The floating-point weights of `model`, in `model.weights` order."""
    return [w for w in model.weights if keras.backend.is_float_dtype(w.dtype)]


def classify(
    paths: Sequence[str],
    no_ema: Sequence[str],
    ignore: Sequence[str],
    ignore_prefixes: Sequence[str],
) -> list[Kind]:
    """Assigns a `Kind` to each path; a filter that matches nothing raises."""
    for arg, names, matches in (
        ("param_or_buffer_names_no_ema", no_ema, str.__eq__),
        ("ignore_names", ignore, str.__eq__),
        ("ignore_startswith_names", ignore_prefixes, str.startswith),
    ):
        for name in names:
            if not any(matches(path, name) for path in paths):
                raise ValueError(
                    f"`{arg}` contains {name!r}, which matches no "
                    "floating-point weight of the model. Weight paths are: "
                    f"{list(paths)}"
                )
    kinds = []
    for path in paths:
        if path in ignore or any(path.startswith(p) for p in ignore_prefixes):
            kinds.append(Kind.IGNORE)
        elif path in no_ema:
            kinds.append(Kind.COPY)
        else:
            kinds.append(Kind.AVERAGE)
    return kinds


# Values of up to this many elements are checked for NaN/Inf in groups (and,
# on JAX and TensorFlow, packed into shared arrays during `fit`); larger ones
# alone.
CHUNK = 1 << 15


def _all_finite(values):
    """Whether every element of every value is finite, as one device scalar.

    Small values of one dtype are concatenated, in order, into groups of up
    to `CHUNK` elements, one reduction each: the update cannot start before
    this flag is known, and on XLA a reduction per small weight costs more
    than the EMA itself on a model of many small weights (about 0.3 ms a step
    for 80 weights on 2 CPU cores). The groups stay small because XLA on CPU
    splits a larger reduction over threads, at a cost on a few cores. Large
    values are checked alone: concatenating them would copy them, and under
    a `keras.distribution` would gather their shards.
    """
    checks, groups, open_group = [], [], {}
    for value in values:
        size = math.prod(value.shape)
        if size > CHUNK:
            checks.append(_is_finite(value))
            continue
        dtype = keras.backend.standardize_dtype(value.dtype)
        group = open_group.get(dtype)
        if group is None or group[0] + size > CHUNK:
            group = open_group[dtype] = [0, []]
            groups.append(group[1])
        group[0] += size
        group[1].append(ops.reshape(value, (-1,)))
    for group in groups:
        flat = group[0] if len(group) == 1 else ops.concatenate(group)
        checks.append(_is_finite(flat))
    return ops.all(ops.stack(checks)) if checks else ops.convert_to_tensor(True)


def _is_finite(value):
    """Whether every element of one value is finite, as a device scalar.

    A matrix with a last axis of some length is multiplied by a zero vector:
    `0 * x` is 0 for a finite `x` and NaN for NaN or Inf, so the product is
    finite exactly when the matrix is, and it never overflows. That is one
    vectorised (and, on CPU, multithreaded) pass, where `all(isfinite(x))`
    first writes a boolean array and then reduces it: on a 1024x1024
    weight, 44 against 278 us on 2 CPU cores (XLA).
    """
    if len(value.shape) < 2 or value.shape[-1] < 8:
        return ops.all(ops.isfinite(value))
    matrix = ops.reshape(value, (-1, value.shape[-1]))
    # Zeros made from the data, not a constant a compiler could fold the
    # product with; a NaN or Inf in that row makes the product NaN anyway.
    zeros = matrix[0] * 0
    return ops.isfinite(ops.sum(ops.matmul(matrix, zeros)))


def fused_update(
    schedule: WarmupSchedule,
    kinds: Sequence[Kind],
    counters,
    shadows,
    weights,
    real_step=None,
    branch_on_scalars: bool = False,
    known_due: bool = False,
):
    """One step of the article's `update()` for every shadow, as pure tensors.

    Args:
        schedule: The hyperparameters.
        kinds: One `Kind` per shadow.
        counters: `(step, initialized, skipped)` int32 scalars.
        shadows: The current shadow values.
        weights: The current online weight values, aligned with `shadows`,
            or a function returning them, called only on a due step (so that
            a host update reads, and transfers, no weight otherwise).
        real_step: Optional boolean scalar; `False` when the optimizer did not
            change the weights this step (gradient accumulation, a skipped
            loss-scale step), in which case nothing happens, the counter
            included. `None` when every step changes them.
        branch_on_scalars: Whether to choose between whole results with
            `cond` on the scalar flags (copy or average, finite or not)
            rather than elementwise `where`s. Right for TF graphs run
            without XLA, where every op is a pass over memory and a branch
            not taken costs nothing; under XLA a `cond` copies its
            pass-through operands, and `where`s fuse into one loop.
        known_due: Whether the caller knows this step is due (it decided
            on the host), so the update needs no `cond` on the counter.

    Returns:
        `(counters, shadows, decay)`: the new counters and shadow values, and
        the decay for the advanced counter (the logged `ema_decay`).
    """
    step, initialized, skipped = counters
    due = ops.equal(ops.mod(step, schedule.update_every), 0)
    advance = ops.ones_like(step)
    if real_step is not None:
        due = ops.logical_and(due, real_step)
        advance = ops.cast(real_step, "int32")
    new_step = step + advance
    warm = ops.less_equal(step, schedule.update_after_step)
    copy_all = ops.logical_and(due, ops.logical_or(warm, ops.equal(initialized, 0)))
    weight = schedule.compiled_weight(new_step)

    def blend_by_branches(values, finite):
        values = [ops.cast(v, s.dtype) for v, s in zip(values, shadows, strict=True)]

        def averaged():
            new = []
            for kind, shadow, value in zip(kinds, shadows, values, strict=True):
                if kind == Kind.AVERAGE:
                    shadow = shadow + ops.cast(weight, shadow.dtype) * (value - shadow)
                elif kind == Kind.COPY:
                    shadow = value
                new.append(shadow)
            return new

        def updated():
            return ops.cond(copy_all, lambda: list(values), averaged)

        new = ops.cond(finite, updated, lambda: list(shadows))
        return new, skipped + ops.cast(ops.logical_not(finite), "int32")

    def blend():
        values = weights() if callable(weights) else weights
        finite = _all_finite(values)
        if branch_on_scalars:
            return blend_by_branches(values, finite)
        new = []
        for kind, shadow, value in zip(kinds, shadows, values, strict=True):
            value = ops.cast(value, shadow.dtype)
            if kind == Kind.AVERAGE:
                moved = shadow + ops.cast(weight, shadow.dtype) * (value - shadow)
                candidate = ops.where(copy_all, value, moved)
                take = finite
            elif kind == Kind.COPY:
                candidate, take = value, finite
            else:
                candidate = value
                take = ops.logical_and(finite, copy_all)
            new.append(ops.where(take, candidate, shadow))
        return new, skipped + ops.cast(ops.logical_not(finite), "int32")

    def keep():
        return list(shadows), skipped

    if known_due or (schedule.update_every == 1 and real_step is None):
        # Every step is due. A `cond` here would cost more than it saves:
        # XLA copies every shadow through its pass-through branch.
        new_shadows, new_skipped = blend()
    else:
        new_shadows, new_skipped = ops.cond(due, blend, keep)
    started = ops.logical_and(due, ops.logical_not(warm))
    new_initialized = ops.where(started, ops.ones_like(initialized), initialized)
    decay = 1.0 - weight
    return (new_step, new_initialized, new_skipped), new_shadows, decay


class ShadowState:
    """The shadow variables of one model and the counters of its EMA.

    Args:
        model: A built Keras model.
        schedule: The `WarmupSchedule`.
        no_ema: Paths copied, never averaged.
        ignore: Paths left alone after the warm-up.
        ignore_prefixes: Path prefixes left alone after the warm-up.
        offload: Whether the shadows and counters live in host memory.
    """

    def __init__(
        self,
        model,
        schedule,
        no_ema=(),
        ignore=(),
        ignore_prefixes=(),
        offload=False,
    ):
        self.model = model
        self.offload = offload
        self.schedule = schedule
        self.weights = tracked_weights(model)
        if not self.weights:
            raise ValueError(
                "The EMA needs a built model with floating-point weights. "
                f"Model {model.name!r} has none; build it (call it on data "
                "or `model.build(input_shape)`) before using the callback."
            )
        self.paths = [w.path for w in self.weights]
        self.kinds = classify(self.paths, no_ema, ignore, ignore_prefixes)
        self.signature = weights_signature(self.weights)
        _backend.check_placement(self.weights)
        counter_layout = _backend.counter_layout(self.weights)
        scope = _backend.variable_scope(model)
        if offload:
            _backend.check_offload(model)
            counter_layout = _backend.host_layout()
            scope = _backend.host_scope()
        with scope:
            self.shadows = [self._make_shadow(w, i) for i, w in enumerate(self.weights)]
            self.step = _counter("ema_step", counter_layout)
            self.initialized = _counter("ema_initialized", counter_layout)
            self.skipped = _counter("ema_skipped", counter_layout)
        self.live = _backend.live_values(self)

    def _make_shadow(self, weight, index: int):
        dtype = shadow_dtype(keras.backend.standardize_dtype(weight.dtype))
        copy = _backend.host_copy if self.offload else _backend.fresh_copy
        value = copy(weight.value, dtype)
        name = f"ema_{index}_" + weight.path.replace("/", "_")
        shadow = keras.Variable(
            value,
            dtype=dtype,
            trainable=False,
            name=name,
            autocast=False,
            aggregation=_backend.variable_aggregation(),
            layout=(
                _backend.host_layout()
                if self.offload
                else _backend.shadow_layout(weight)
            ),
        )
        if not self.offload:
            _backend.match_layout(shadow, weight)
        return shadow

    @property
    def counters(self) -> list:
        return [self.step, self.initialized, self.skipped]

    @property
    def state_variables(self) -> list:
        """Counters first, then shadows: the layout of every fused update."""
        return self.counters + self.shadows

    def check_model_unchanged(self) -> None:
        """Raises if the model's float weights differ from those shadowed."""
        current = tracked_weights(self.model)
        if weights_signature(current) == self.signature:
            return
        before = {p: s for p, s in zip(self.paths, self.signature, strict=True)}
        after = {
            w.path: s for w, s in zip(current, weights_signature(current), strict=True)
        }
        changes = sorted(set(before.items()) ^ set(after.items()))
        raise ValueError(
            f"The weights of model {self.model.name!r} changed after the EMA "
            "started tracking them (weights added, removed or reshaped). "
            f"Differences (path, (shape, dtype, id)): {changes[:10]}. Create "
            "a new `EMA` callback for the changed model."
        )

    def copy_weights_into_shadows(self) -> None:
        self.live.sync_to_variables()
        for shadow, weight in zip(self.shadows, self.weights, strict=True):
            shadow.assign(_backend.fresh_copy(weight.value, shadow.dtype))
        self.live.invalidate()


def weights_signature(weights) -> tuple:
    return tuple(
        (tuple(w.shape), keras.backend.standardize_dtype(w.dtype), id(w))
        for w in weights
    )


def _counter(name: str, layout=None):
    return keras.Variable(
        0,
        dtype="int32",
        trainable=False,
        name=name,
        aggregation=_backend.variable_aggregation(),
        layout=layout,
    )
