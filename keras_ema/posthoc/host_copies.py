"""The values of one snapshot copied to the host: every profile's shadows
and the model's buffers, each in memory of its own."""

from __future__ import annotations

from keras_ema.backends.base import host_copy


def snapshot_values(state, shadows: list[list], model) -> tuple[dict, dict]:
    """`(averaged, buffers)` for `write_snapshot`: path -> one host copy per
    profile of each tracked weight's shadow (`shadows`, per profile, from
    the engine's `host_shadows`), and path -> a host copy of each other
    weight of `model`."""
    averaged = {
        path: [profile[index] for profile in shadows]
        for index, path in enumerate(state.paths)
    }
    tracked = {id(weight) for weight in state.weights}
    # Variable by variable: under a JAX `keras.distribution` each copy
    # gathers one variable's shards to the host.
    buffers = {
        weight.path: host_copy(weight.value)
        for weight in model.weights
        if id(weight) not in tracked
    }
    return averaged, buffers
