"""Synthesized weights in a Keras model, for `PostHocRun.synthesize_into`,
`PostHocRun.swap_weights` and `PostHocRun.sweep(model=...)`: the snapshot
variables paired with the model's by the rule `load_state` uses
(`keras_ema.saving.weight_paths`), and the model's own values put back
after a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import numpy as np

from keras_ema.posthoc.format import dtype_name
from keras_ema.saving.weight_paths import difference
from keras_ema.saving.weight_paths import unpaired
from keras_ema.state import tracked_weights

_PLACE = "the snapshots"


def pair_with_model(variables: list, model, directory: str) -> list:
    """Pairs each snapshot variable (`variables`: the header's specs) with a
    variable of `model`, by position, as Keras' `.weights.h5` files and
    `load_state` pair weights; raises a `ValueError` saying what differs.

    The averaged variables pair with the model's trainable floating-point
    variables (those `PostHocEMA` averages), the buffers with its other
    variables, each in `model.weights` order; non-floating-point variables
    of the model that the snapshots lack (seed-generator states) are left
    out. Each pair must name the same weight up to Keras' `_<n>` numbering
    and a leading model name (`weight_paths.same_weight`), with the same
    shape, and both floating-point or both not.

    Returns:
        `(path, variable)` pairs: the snapshot path and the model variable.
    """
    _check_built(model)
    averaged = [spec for spec in variables if spec["kind"] == "averaged"]
    buffers = [spec for spec in variables if spec["kind"] != "averaged"]
    trainable = tracked_weights(model, trainable_only=True)
    trainable_ids = {id(weight) for weight in trainable}
    others = [weight for weight in model.weights if id(weight) not in trainable_ids]
    return _pair_averaged(averaged, trainable, directory) + _pair_buffers(
        buffers, others, directory
    )


@contextlib.contextmanager
def holding(pairs: list, weights: dict) -> Iterator[None]:
    """A context in which each paired variable holds `weights[path]`; on
    exit, also through an exception, every one gets its own value back, bit
    for bit."""
    own = [np.array(keras.ops.convert_to_numpy(v.value)) for _, v in pairs]
    try:
        for path, variable in pairs:
            variable.assign(weights[path])
        yield
    finally:
        for (_, variable), value in zip(pairs, own, strict=True):
            variable.assign(value)


def _check_built(model) -> None:
    if not getattr(model, "built", False) or not model.weights:
        raise ValueError(
            "`model` has no variables yet to receive the synthesized weights: "
            "build the model first (call it on a batch of inputs, or "
            f"`model.build(input_shape)`). Received: model={model!r}"
        )


def _pair_averaged(specs: list, weights: list, directory: str) -> list:
    if len(specs) != len(weights):
        missing, extra = unpaired([s["path"] for s in specs], [w.path for w in weights])
        raise _unfit(
            directory,
            f"the snapshots average {len(specs)} variables but the model has "
            f"{len(weights)} trainable floating-point variables. Not in the "
            f"snapshots: {missing[:10]}; not in the model: {extra[:10]}",
        )
    for spec, weight in zip(specs, weights, strict=True):
        _check_pair(spec, weight, directory)
    return [(spec["path"], w) for spec, w in zip(specs, weights, strict=True)]


def _pair_buffers(specs: list, weights: list, directory: str) -> list:
    pairs, queue = [], list(specs)
    for weight in weights:
        if queue and _problem(queue[0], weight) is None:
            pairs.append((queue.pop(0)["path"], weight))
        elif not keras.backend.is_float_dtype(weight.dtype):
            continue  # Left as it is, like a weight `PostHocEMA` never saw.
        elif queue:
            _check_pair(queue[0], weight, directory)
        else:
            raise _unfit(
                directory, f"its variable {weight.path!r} is not in the snapshots"
            )
    if queue:
        raise _unfit(
            directory,
            "the snapshots hold variables that are not in the model: "
            f"{[spec['path'] for spec in queue][:10]}",
        )
    return pairs


def _check_pair(spec: dict, weight, directory: str) -> None:
    problem = _problem(spec, weight)
    if problem is not None:
        raise _unfit(directory, problem)


def _problem(spec: dict, weight) -> str | None:
    return difference(
        spec,
        weight.path,
        weight.shape,
        dtype_name(weight.dtype),
        _PLACE,
        same_dtype=_same_kind,
    )


def _same_kind(saved: str, current: str) -> bool:
    """Floating-point or not alike: averages come back as float32 whatever
    the model's float dtype, and integer states differ across backends."""
    is_float = keras.backend.is_float_dtype
    return is_float(saved) == is_float(current)


def _unfit(directory: str, problem: str) -> ValueError:
    return ValueError(
        f"`model` does not fit the snapshots in {directory!r}: {problem}."
    )
