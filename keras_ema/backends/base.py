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
import dataclasses

import keras
import numpy as np

from keras_ema.steps import every_step_due
from keras_ema.steps import step_rule


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


def as_stored(values, dtypes, barrier) -> list:
    """`values` with each one narrower than its shadow's dtype read as stored.

    Inside one XLA computation, a bfloat16 or float16 weight that the
    optimizer has just computed in float32 and that the EMA casts back to
    float32 may skip its rounding (XLA allows excess precision), so the EMA
    would average values the model never held. The backend's optimization
    barrier (`barrier`, a function of a list of values returning them) makes
    the update read the stored weight.
    """
    narrow = [
        i
        for i, (value, dtype) in enumerate(zip(values, dtypes, strict=True))
        if keras.backend.standardize_dtype(value.dtype) != dtype
    ]
    if not narrow:
        return list(values)
    values = list(values)
    stored = barrier([values[i] for i in narrow])
    for i, value in zip(narrow, stored, strict=True):
        values[i] = value
    return values


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


class Engine:
    """Runs the updates of one `ShadowState`; see the module docstring."""

    # Whether the EMA's train function may serve the next `fit` too. Tracing
    # (TF) or compiling (JAX) it again would cost every `fit` call far more
    # than the EMA itself; Keras keeps its own train function across fits.
    reusable = True

    def __init__(self, state):
        self.state = state
        # The model whose `fit` runs the updates: the tracked one, or one
        # that contains it.
        self.model = state.fit_model
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

    def installed(self) -> bool:
        """Whether the model trains with this engine's train function."""
        train_function = self._ema_train_function
        return (
            train_function is not None and self.model.train_function is train_function
        )

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

    def refresh_readers(self) -> None:
        """Called after the EMA changed outside a compiled step of the
        model's (a `fit` ended, an `update()`, a validation begins): where a
        compiled step reads an averaged model as constants, it is made
        again."""

    def end_epoch(self, logs: dict) -> None:
        """Called at each epoch's end with its logs, before other callbacks
        read `ema_skipped` there (an engine that counts a step late corrects
        it)."""

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


def gated(state, rule=None) -> bool:
    """Whether the compiled update must skip steps that update no profile:
    some profile updates only every few steps, or a step may not move the
    weights (`rule`: the fitted model's `steps.StepRule`, by default
    `steps.step_rule(state.fit_model)`)."""
    rule = step_rule(state.fit_model) if rule is None else rule
    return not every_step_due(state.schedules) or rule.per_step


class Backend:
    """This backend's EMA code, one object chosen at import
    (`keras_ema.backends.BACKEND_OPS`), as Keras chooses one `Trainer`.

    The defaults here serve TensorFlow and torch; each backend's module
    subclasses it where it differs.

    Args:
        placement: The `Placement` class of shadows beside the weights.
        engine: The `Engine` class of shadows beside the weights.
        host_placement: The `Placement` class of shadows in host memory.
        host_engine: The `Engine` class of shadows in host memory.
    """

    def __init__(self, placement, engine, host_placement, host_engine):
        self._placements = {False: placement, True: host_placement}
        self._engines = {False: engine, True: host_engine}

    def make_placement(self, offload: bool) -> Placement:
        """Where the EMA's variables live: beside the weights, or on the host."""
        return self._placements[offload]()

    def make_engine(self, state) -> Engine:
        """The engine that runs `state`'s updates."""
        return self._engines[state.offload](state)

    def fresh_copy(self, value, dtype: str):
        """A copy of `value` cast to `dtype` that shares no buffer with it."""
        raise NotImplementedError

    def copy_for_weight(self, value, weight):
        """A fresh copy of a shadow value, cast to `weight`'s dtype (an
        assignment copies across devices itself)."""
        return self.fresh_copy(value, keras.backend.standardize_dtype(weight.dtype))

    def online_backup(self, model, tracked) -> list:
        """What a swap must be able to put back, as `(variable, value)`
        pairs: a copy of each tracked weight."""
        return copy_each_weight(tracked, self.fresh_copy)

    def restore_backup(self, model, backup) -> None:
        """Puts `online_backup`'s values back, by assignment."""
        assign_each(model, backup)

    def start_when_built(self, model, start):
        """Calls `start()` once `model` is built; every backend but
        TensorFlow builds the model before `on_train_begin`, so there it
        must be built."""
        raise ValueError(
            "The EMA needs a built model with floating-point weights. "
            f"Model {model.name!r} has none; build it (call it on data or "
            "`model.build(input_shape)`) before using the callback."
        )

    def held_here(self, value) -> bool:
        """Whether this process holds all of `value`, so that reading it
        into NumPy gathers nothing from other processes. One process holds
        every weight on the TensorFlow and torch backends."""
        return True

    def orbax_value(self, variable):
        """What an Orbax checkpoint saves of `variable`'s value: a NumPy
        copy, as Keras' `OrbaxCheckpoint` saves the weights on TensorFlow
        and torch (Orbax saves NumPy and JAX arrays); a copy, since a save
        in the background outlives the step."""
        return host_copy(variable.value)

    def orbax_target(self, variable):
        """What Orbax restores `variable`'s value as: a NumPy array of its
        shape and dtype, whichever backend saved it."""
        dtype = np.dtype(keras.backend.standardize_dtype(variable.dtype))
        return HostArrayTarget(tuple(variable.shape), dtype)


@dataclasses.dataclass(frozen=True)
class HostArrayTarget:
    """A NumPy array to restore, for Orbax: its shape and dtype (Orbax's
    `AbstractArray`; a `jax.ShapeDtypeStruct` restores a JAX array)."""

    shape: tuple
    dtype: np.dtype
