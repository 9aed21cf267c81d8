"""BatchNormalization statistics recalibrated for the EMA weights.

An average of weights is a model no step ever ran: the moving mean and
variance that its BatchNormalization layers hold (averaged like the other
weights, or copied from the online model) do not describe the activations
of the averaged weights, and such an EMA can score far below what it
should. `recalibrate` runs the EMA weights over data in training mode,
without changing any variable, and stores in the profile's shadows the
cumulative average over the batches of each batch's mean and variance, as
`torch.optim.swa_utils.update_bn` does with `momentum=None`.

Each layer's batch statistics are read through Keras' own update of the
moving statistics: with the layer's `momentum` set to 0 for the pass, the
value `stateless_call` returns for `moving_mean` is the batch mean exactly
(`moving * 0 + mean * 1`), computed as `BatchNormalization` computes it in
training. Nothing is assigned: the online weights, their statistics and
every other shadow stay as they were.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
from keras import ops

from keras_ema import _internals
from keras_ema import backends
from keras_ema.checks import is_int


def recalibrate(ema, x, batch_size, steps, profile) -> None:
    """See `EMA.recalibrate_batchnorm`."""
    _check_count("batch_size", batch_size)
    _check_count("steps", steps)
    index = ema._profile_index(profile)
    ema._require_online_weights("recalibrate_batchnorm()")
    state = ema._require_state()
    state.check_model_unchanged()
    layers = batchnorm_layers(state.model)
    statistics = _statistics_of(layers, state)
    ema._engine.flush()
    shadows = state.profiles[index].shadows
    by_weight = {id(w): s for w, s in zip(state.weights, shadows, strict=True)}
    model = state.model
    trainable = [_ema_value(v, by_weight) for v in model.trainable_variables]
    non_trainable = [_ema_value(v, by_weight) for v in model.non_trainable_variables]
    positions = _positions(model.non_trainable_variables, statistics)
    with _momentum_zero(layers):
        sums, batches = _batch_statistics(
            model, trainable, non_trainable, positions, x, batch_size, steps
        )
    for variable, total in zip(statistics, sums, strict=True):
        shadow = by_weight[id(variable)]
        shadow.assign(ops.cast(total / batches, shadow.dtype))
    ema._engine.reload()
    ema._engine.refresh_readers()


def batchnorm_layers(model) -> list:
    """The `BatchNormalization` layers of `model` that training updates
    (trainable ones; a frozen layer keeps its statistics in training too),
    nested models included; a `ValueError` where there is none."""
    layers = [
        layer
        for layer in _internals.all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
    if not layers:
        raise ValueError(
            f"`recalibrate_batchnorm()` found no trainable BatchNormalization "
            f"layer in model {model.name!r} (nested models included): there "
            "are no statistics to recalibrate."
        )
    for layer in layers:
        if layer.renorm:
            raise ValueError(
                "`recalibrate_batchnorm()` does not support batch "
                f"renormalization. Received: layer {layer.name!r} with renorm=True"
            )
    return layers


def _statistics_of(layers, state) -> list:
    tracked = {id(w) for w in state.weights}
    statistics = []
    for layer in layers:
        for variable in (layer.moving_mean, layer.moving_variance):
            if id(variable) not in tracked:
                raise ValueError(
                    "`recalibrate_batchnorm()` stores the statistics in the "
                    f"EMA's shadows, but {variable.path!r} has none (an EMA "
                    "of the trainable weights only)."
                )
            statistics.append(variable)
    return statistics


def _ema_value(variable, by_weight):
    shadow = by_weight.get(id(variable))
    if shadow is None:
        return variable.value
    return backends.BACKEND_OPS.copy_for_weight(shadow.value, variable)


def _positions(non_trainable, statistics) -> list[int]:
    index = {id(v): i for i, v in enumerate(non_trainable)}
    return [index[id(v)] for v in statistics]


def _batch_statistics(model, trainable, non_trainable, positions, x, batch_size, steps):
    """The sums over the batches of each statistic (float64, on the host)
    and the number of batches."""
    sums = None
    batches = 0
    for inputs in _internals.input_batches(x, batch_size, steps):
        _, updated = model.stateless_call(
            trainable, non_trainable, inputs, training=True
        )
        values = [
            np.asarray(ops.convert_to_numpy(updated[i]), np.float64) for i in positions
        ]
        if sums is None:
            sums = values
        else:
            sums = [total + value for total, value in zip(sums, values, strict=True)]
        # Seeds (dropout) move on from batch to batch; the statistics' own
        # inputs do not matter with momentum 0.
        non_trainable = list(updated)
        batches += 1
    if not batches:
        raise ValueError(
            "`recalibrate_batchnorm()` got no batch from `x`. Received: "
            f"x={type(x).__name__}, steps={steps}"
        )
    return sums, batches


@contextlib.contextmanager
def _momentum_zero(layers):
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        yield
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum


def _check_count(name: str, value) -> None:
    if value is not None and not (is_int(value) and value > 0):
        raise ValueError(
            f"`{name}` must be a positive integer or None. Received: {name}={value!r}"
        )
