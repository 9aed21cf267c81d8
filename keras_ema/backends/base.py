"""What every backend provides: a `Placement` for the EMA's variables and an
`Engine` that runs its updates.

An engine belongs to one `ShadowState`. Between two reads the EMA may live
outside its variables (JAX threads arrays through its train step, TensorFlow
updates packed flat variables, torch keeps the counter in Python): `flush()`
makes the variables current, `reload()` says they were written from outside
(a loaded state) and must be read again; `host_shadows()` copies the
averages to the host, straight from where they live (a snapshot of
`PostHocEMA` needs no variable made current). `install()`/`uninstall()` put the
update into the model's training around a `fit`; `update()` runs one update
outside `fit`.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from keras_ema import update
from keras_ema.host_counters import optimizer_may_skip


def copy_each_weight(tracked, fresh_copy) -> list:
    """A copy of each tracked weight in its own dtype, made by the backend's
    `fresh_copy`, as `(variable, value)` pairs."""
    return [
        (
            weight,
            fresh_copy(weight.value, keras.backend.standardize_dtype(weight.dtype)),
        )
        for weight in tracked
    ]


def host_copy(value) -> np.ndarray:
    """A NumPy copy of one value that shares no memory with it (TensorFlow,
    torch and JAX on CPU hand out views of buffers that later steps
    overwrite or donate)."""
    array = np.asarray(keras.ops.convert_to_numpy(value))
    if array.flags.owndata and array.base is None:
        return array
    return np.array(array, copy=True)


def assign_each(model, backup) -> None:
    """Puts the values of `copy_each_weight` back, by assignment."""
    for variable, value in backup:
        variable.assign(value)


class Placement:
    """Where the shadows and counters live, and how they are created.

    The default: beside the weights, in the variables Keras creates.
    """

    aggregation = "none"

    def check(self, model, weights) -> None:
        """Raises where the EMA cannot be laid out this way."""

    def scope(self, model):
        return contextlib.nullcontext()

    def initial_value(self, weight, dtype: str):
        """The shadow's first value: a copy of the weight, cast to `dtype`,
        sharing no buffer with it."""
        raise NotImplementedError

    def shadow_layout(self, weight):
        return None

    def counter_layout(self, weights):
        return None

    def place_like(self, shadow, weight) -> None:
        """Moves a new shadow where its weight lives, if it is not there."""


class Engine:
    """Runs the updates of one `ShadowState`; see the module docstring."""

    # Whether the EMA's train function may serve the next `fit` too. Tracing
    # (TF) or compiling (JAX) it again would cost every `fit` call far more
    # than the EMA itself; Keras keeps its own train function across fits.
    reusable = True

    def __init__(self, state):
        self.state = state
        self.model = state.model
        self._keras_train_function = None
        self._ema_train_function = None

    # -- around `fit` -------------------------------------------------------

    def install(self) -> None:
        current = self.model.train_function
        if current is self._ema_train_function and current is not None:
            return
        # `compile` resets the train function: then the EMA's is stale.
        stale = current is not self._keras_train_function
        if stale or self._ema_train_function is None or not self.reusable:
            self._keras_train_function = current
            self._ema_train_function = self.build_train_function()
        self.model.train_function = self._ema_train_function

    def uninstall(self) -> None:
        if (
            self._ema_train_function is not None
            and self.model.train_function is self._ema_train_function
        ):
            self.model.train_function = self._keras_train_function
        self.flush()
        self.reload()

    def start_epoch(self) -> None:
        """Called at each epoch's start, when Keras has reset its metrics."""

    def build_train_function(self):
        raise NotImplementedError

    # -- the EMA outside its variables ---------------------------------------

    def flush(self) -> None:
        """Makes the shadow and counter variables current."""

    def reload(self) -> None:
        """The variables were written from outside: read them again."""

    def host_shadows(self) -> list[list]:
        """Every profile's shadows as NumPy arrays of their own (nothing a
        later step writes), in `state.weights` order: one list per profile."""
        self.flush()
        return [
            [host_copy(shadow.value) for shadow in profile.shadows]
            for profile in self.state.profiles
        ]

    # -- outside `fit` -------------------------------------------------------

    def update(self) -> None:
        """One update outside `fit` (`EMA.update()`)."""
        raise NotImplementedError

    # -- for measurement -----------------------------------------------------

    def update_timer(self):
        """A function that runs one update of every profile from the current
        weights as a step of `fit` runs it; see `backends.update_timer`."""
        raise NotImplementedError(
            f"{type(self).__name__} offers no update timer; "
            "`backends.update_timer` times the engines of shadows beside "
            "the weights."
        )


def ema_logs(logs, state, decays, skipped) -> dict:
    """Keras' step logs with the EMA's: each profile's decay and
    `ema_skipped`."""
    logs = dict(logs)
    for profile, decay in zip(state.profiles, decays, strict=True):
        logs[profile.decay_key] = decay
    logs["ema_skipped"] = skipped
    return logs


def gated(state) -> bool:
    """Whether the compiled update must skip steps that update no profile:
    some profile updates only every few steps, or a step may not move the
    weights."""
    return not update.every_step_due(state.schedules) or optimizer_may_skip(
        state.model.optimizer
    )


def start_when_built(model, start):
    """Calls `start()` once `model` is built; every backend but TensorFlow
    builds the model before `on_train_begin`, so there it must be built."""
    raise ValueError(
        "The EMA needs a built model with floating-point weights. "
        f"Model {model.name!r} has none; build it (call it on data or "
        "`model.build(input_shape)`) before using the callback."
    )


def held_here(value) -> bool:
    """Whether this process holds all of `value`, so that reading it into
    NumPy gathers nothing from other processes. One process holds every
    weight on the TensorFlow and torch backends."""
    return True


def require_orbax_support() -> None:
    """Raises unless the EMA can ride along with Keras' `OrbaxCheckpoint`
    on this backend."""
    raise ValueError(
        "keras_ema.EMA saves its state in `keras.callbacks.OrbaxCheckpoint` "
        "checkpoints on the JAX backend only. On this backend, save it with "
        "`keras.callbacks.BackupAndRestore` (it rides along with "
        "`model.save_weights`) or `ema.save_state()`."
    )


def orbax_target(variable):
    """The abstract array Orbax restores `variable`'s value as."""
    require_orbax_support()
