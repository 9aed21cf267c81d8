"""JAX arrays for the EMA: fresh copies, where shadows and counters are
placed and sharded, the XLA forms of reading weights and of the guard, and
the JAX backend's buffer operations (`Backend`)."""

from __future__ import annotations

import jax
import keras
import numpy as np

from keras_ema.backends import base
from keras_ema.guard import Guard

# --------------------------------------------------------------------------
# Buffers and layouts


def fresh_copy(value, dtype):
    """A copy of `value` cast to `dtype` that shares no buffer with it.

    `device_put` copies without compiling anything; `jnp.array(copy=True)`
    would compile a copy for every new shape."""
    copy = jax.device_put(value, value.sharding, may_alias=False)
    return copy if copy.dtype == dtype else copy.astype(dtype)


def as_stored(values, dtypes) -> list:
    """`values` read as stored inside one XLA computation (see
    `base.as_stored`), with JAX's optimization barrier."""
    return base.as_stored(values, dtypes, jax.lax.optimization_barrier)


def _index_key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def xla_guard(weights) -> Guard:
    """The NaN/Inf guard's form for an update XLA compiles beside `weights`:
    `Guard.XLA_CPU` where they all live on CPUs."""
    on_cpu = all(
        device.platform == "cpu" for w in weights for device in w.value.devices()
    )
    return Guard.XLA_CPU if on_cpu else Guard.XLA


def _spans_devices(sharding) -> bool:
    return sharding is not None and len(sharding.device_set) > 1


class Placement(base.Placement):
    """Each shadow on its weight's devices, with its weight's sharding; the
    counters replicated over the weights' mesh.

    A layout passed to `keras.Variable` overrides the distribution's default
    (replicated, or the `LayoutMap` entry that matches the shadow's own
    path), so a sharded weight's shadow is never gathered, even briefly. The
    counters and the shadows enter one jitted update, which JAX refuses when
    its arguments are committed to different devices.
    """

    def initial_value(self, weight, dtype):
        return fresh_copy(weight.value, dtype)

    def shadow_layout(self, weight):
        return weight.value.sharding

    def counter_layout(self, weights):
        for weight in weights:
            sharding = weight.value.sharding
            if _spans_devices(sharding) and hasattr(sharding, "mesh"):
                return jax.sharding.NamedSharding(
                    sharding.mesh, jax.sharding.PartitionSpec()
                )
        return weights[0].value.sharding


def committed_copy(array):
    """A copy of a JAX array committed to the array's own devices.

    `jax.jit` compiles once per placement of its arguments, and the arrays it
    returns are committed. Feeding it an uncommitted copy at the start of a
    `fit` would make every `fit` compile the fused step again.
    """
    return jax.device_put(array, array.sharding, may_alias=False)


def on_host(array) -> np.ndarray:
    return np.asarray(jax.device_get(array))


def committed(tree):
    """`tree` with every uncommitted array committed to its device.

    Keras starts each epoch with some uncommitted arrays in its state (fresh
    variables, metrics just reset); the step's outputs are committed. Keras'
    own step takes either without compiling again, but a step that also
    takes the (committed) EMA arrays is compiled once per mix of the two, so
    a new epoch or `fit` would compile it again. Committing everything at an
    epoch's first step keeps one compiled step for all of them.
    """

    def commit(array):
        if getattr(array, "committed", True):
            return array
        return jax.device_put(array, array.sharding)

    return jax.tree.map(commit, tree)


def as_vector(sharding):
    """A fully replicated sharding for a rank-1 array on the same devices."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(None)
        )
    return sharding


def replicated(shadow):
    sharding = shadow.value.sharding
    return sharding if sharding.is_fully_replicated else None


class Backend(base.Backend):
    """The JAX backend's buffer operations (see `base.Backend`)."""

    def fresh_copy(self, value, dtype):
        return fresh_copy(value, dtype)

    def copy_for_weight(self, value, weight):
        """A fresh copy of a shadow value, cast to `weight`'s dtype and placed
        like it (host shadows go back to the accelerator on a swap)."""
        copy = fresh_copy(value, keras.backend.standardize_dtype(weight.dtype))
        sharding = getattr(weight.value, "sharding", None)
        if sharding is not None and not copy.sharding.is_equivalent_to(
            sharding, copy.ndim
        ):
            copy = jax.device_put(copy, sharding)
        return copy

    def online_backup(self, model, tracked) -> list:
        """What a swap must be able to put back, as `(variable, value)` pairs.

        The tracked weights' own arrays (never changed in place), and a copy of
        every other model variable: Keras' JAX `evaluate` and `predict` take all
        of them out of the model while they run and donate their arrays, so an
        interrupted one leaves them without a value (a Dropout layer's seed
        state, integer weights).
        """
        ids = {id(weight) for weight in tracked}
        pairs = [(weight, weight.value) for weight in tracked]
        pairs += [
            (variable, fresh_copy(variable.value, variable.value.dtype))
            for variable in model.variables
            if id(variable) not in ids and variable.value is not None
        ]
        return pairs

    def restore_backup(self, model, backup) -> None:
        """Puts `online_backup`'s values back, bit for bit.

        Keras' state of an interrupted `evaluate`/`predict` is synced into the
        model first (the public `jax_state_sync`): left pending, it would
        overwrite the restored values at the next read of `callback.model`.
        """
        model.jax_state_sync()
        for variable, value in backup:
            variable.assign(value)

    def held_here(self, value) -> bool:
        """Whether this process holds every distinct piece of `value`, so that
        reading it into NumPy gathers nothing from other processes (JAX refuses
        with a `RuntimeError` otherwise). A weight replicated over the processes
        (`DataParallel`) is held by each; one sharded over devices of several
        processes (`ModelParallel`) is not."""
        if not isinstance(value, jax.Array) or value.is_fully_addressable:
            return True
        sharding, shape = value.sharding, value.shape
        everywhere = {
            _index_key(i) for i in sharding.devices_indices_map(shape).values()
        }
        here = {
            _index_key(i)
            for i in sharding.addressable_devices_indices_map(shape).values()
        }
        return here == everywhere

    def orbax_value(self, variable):
        """What an Orbax checkpoint saves of `variable`'s value: the JAX
        array as it is sharded, each process writing its own shards."""
        return variable.value

    def orbax_target(self, variable):
        """What Orbax restores `variable`'s value as: its shape and dtype, laid
        out with its own sharding, so that each process reads only the shards
        it holds and nothing is gathered."""
        value = variable.value
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)
