"""The values of one snapshot copied to the host: every profile's shadows
and the model's buffers, each in memory of its own."""

from __future__ import annotations

import numpy as np
from keras import ops


def snapshot_values(state, model) -> tuple[dict, dict]:
    """`(averaged, buffers)`: path -> one host copy per profile of each
    tracked weight's shadows, and path -> a host copy of each other
    weight of `model`, for `write_snapshot`."""
    # Variable by variable: under a JAX `keras.distribution` each copy
    # gathers one variable's shards to the host.
    averaged = {
        path: [_host_copy(p.shadows[index].value) for p in state.profiles]
        for index, path in enumerate(state.paths)
    }
    tracked = {id(weight) for weight in state.weights}
    buffers = {
        weight.path: _host_copy(weight.value)
        for weight in model.weights
        if id(weight) not in tracked
    }
    return averaged, buffers


def _host_copy(value) -> np.ndarray:
    """A NumPy copy of one variable's value that shares no memory with it
    (TensorFlow and torch hand out views of CPU buffers that later steps
    overwrite)."""
    array = ops.convert_to_numpy(value)
    if array.flags.owndata and array.base is None:
        return array
    return np.array(array, copy=True)
