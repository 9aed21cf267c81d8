"""EMA state files written beside the model's weights files.

`keras.callbacks.BackupAndRestore` checkpoints a run with
`model.save_weights(path)` and resumes it with `model.load_weights(path)`;
the EMA shadows are not model weights, so on their own they would be lost.
While an `EMA` callback is attached to a model, both methods of that model
instance also write and read the EMA state (`npz_state`'s format) at
`sidecar_path(path, index)`, `index` being the callback's position among the
EMA callbacks attached to the model. A restarted run with the same callbacks
therefore resumes the EMA, its counter included, with no extra code; so does
`ModelCheckpoint(save_weights_only=True)` followed by `load_weights`.

Orbax checkpoints (`keras.callbacks.OrbaxCheckpoint`, Keras 3.14+):
`ride_along_orbax` makes each save of the `OrbaxCheckpoint`s of a `fit`
hold the state of every EMA attached to the model (`orbax_state`'s format,
one checkpointable per EMA, named by `orbax_state.checkpointable_name`), and
`model.load_weights(<orbax directory>)` restores it from the step Keras
loads, checked against the model before Keras loads any weight.

Each EMA's state is written and read through its `ema.state_store`.
"""

from __future__ import annotations

import os
import weakref

from keras_ema import _internals
from keras_ema.saving import orbax_state

# model -> the EMA callbacks attached to it, in the order they were attached.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sidecar_path(weights_path, index: int = 0) -> str:
    """Where the EMA state that goes with a weights file is kept."""
    suffix = ".ema.npz" if index == 0 else f".ema{index}.npz"
    return os.fspath(weights_path) + suffix


def attach(model, ema) -> None:
    """Makes `model.save_weights`/`load_weights` carry `ema`'s state too."""
    callbacks = _ATTACHED.setdefault(model, [])
    if any(ref() is ema for ref in callbacks):
        return
    callbacks[:] = [ref for ref in callbacks if ref() is not None]
    callbacks.append(weakref.ref(ema))
    if "save_weights" not in model.__dict__:
        _wrap_weights_methods(model)


def attached(model) -> list:
    """The EMA callbacks attached to `model`, in the order they were."""
    return [ema for ema in (ref() for ref in _ATTACHED.get(model, [])) if ema]


def ride_along_orbax(model, callbacks) -> None:
    """Makes each `OrbaxCheckpoint` among `callbacks` also save the state of
    every EMA attached to `model`, in the same step."""
    checkpoints = orbax_state.orbax_checkpoints(callbacks)
    if not checkpoints:
        return
    model_ref = weakref.ref(model)

    def checkpointables() -> dict:
        return {
            orbax_state.checkpointable_name(index): ema.state_store.orbax_tree()
            for index, ema in enumerate(attached(model_ref()))
        }

    for checkpoint in checkpoints:
        _internals.add_orbax_checkpointables(checkpoint, checkpointables)


def _saved_states(emas, filepath) -> list:
    """Each EMA's saved state that goes with the weights at `filepath`, read
    and checked against the model (`None` where there is none)."""
    step_path = _internals.orbax_checkpoint_step(filepath)
    states = []
    for index, ema in enumerate(emas):
        if step_path is not None:
            name = orbax_state.checkpointable_name(index)
            states.append(ema.state_store.read_orbax(step_path, name))
            continue
        path = sidecar_path(filepath, index)
        states.append(ema.state_store.read(path) if os.path.exists(path) else None)
    return states


def _wrap_weights_methods(model) -> None:
    # The wrappers live in the model's own `__dict__`: they hold it weakly, so
    # that attaching an EMA creates no reference cycle and the model (and its
    # weights) is freed as soon as the user drops it.
    model_ref = weakref.ref(model)
    keras_save_weights = type(model).save_weights
    keras_load_weights = type(model).load_weights

    def save_weights(filepath, *args, **kwargs):
        model = model_ref()
        result = keras_save_weights(model, filepath, *args, **kwargs)
        for index, ema in enumerate(attached(model)):
            ema.state_store.write(sidecar_path(filepath, index))
        return result

    def load_weights(filepath, *args, **kwargs):
        model = model_ref()
        # The EMA states are checked first, so that a state that does not fit
        # the model is refused before any weight changes.
        emas = attached(model)
        states = _saved_states(emas, filepath)
        result = keras_load_weights(model, filepath, *args, **kwargs)
        for ema, state in zip(emas, states, strict=True):
            if state is not None:
                ema.state_store.apply(*state)
            else:
                ema.state_store.follow_loaded_weights()
        return result

    save_weights.__doc__ = keras_save_weights.__doc__
    load_weights.__doc__ = keras_load_weights.__doc__
    model.save_weights = save_weights
    model.load_weights = load_weights
