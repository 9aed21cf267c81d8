"""This backend's EMA code, chosen once at import, as Keras chooses its
trainers.

Each backend has two modules: `<backend>.py` with the `Placement` and the
`Engine` of shadows beside the weights, and `<backend>_offload.py` with the
`HostPlacement` and `HostEngine` of shadows in host memory (see `base.py`).
`<backend>.py` also provides the buffer operations the callback needs for
swaps: `fresh_copy`, `copy_for_weight`, `online_backup`,
`restore_backup`, and `start_when_built` for models built by `fit` itself;
`held_here` says whether a value can be read on this process without
gathering it from others, `require_orbax_support` and `orbax_target` serve
Orbax checkpoints (`keras_ema/orbax_io.py`).
"""

from __future__ import annotations

import keras

BACKEND = keras.backend.backend()

if BACKEND == "jax":
    from keras_ema.backends import jax as _backend
    from keras_ema.backends import jax_offload as _offload
elif BACKEND == "tensorflow":
    from keras_ema.backends import tensorflow as _backend
    from keras_ema.backends import tensorflow_offload as _offload
elif BACKEND == "torch":
    from keras_ema.backends import torch as _backend
    from keras_ema.backends import torch_offload as _offload
else:
    raise ImportError(
        "keras_ema runs on the TensorFlow, JAX and torch backends of Keras. "
        f"Received: backend={BACKEND!r}"
    )


def make_placement(offload: bool):
    """Where the EMA's variables live: beside the weights, or on the host."""
    return _offload.HostPlacement() if offload else _backend.Placement()


def make_engine(state):
    """The engine that runs `state`'s updates."""
    return (_offload.HostEngine if state.offload else _backend.Engine)(state)


fresh_copy = _backend.fresh_copy
copy_for_weight = _backend.copy_for_weight
online_backup = _backend.online_backup
restore_backup = _backend.restore_backup
start_when_built = _backend.start_when_built
held_here = _backend.held_here
require_orbax_support = _backend.require_orbax_support
orbax_target = _backend.orbax_target


def update_timer(ema):
    """A function of no arguments that runs one update of `ema`'s shadows
    from its model's current weights, as a step of `fit` runs it after
    Keras' train step, and returns nothing.

    It exists for measurement: the benchmark (`benchmarks/overhead`) times
    the update alone with it. It is not part of the public API. On JAX the
    function waits for the update to finish; on TensorFlow and torch a GPU's
    queued work is the caller's to wait for. `ema`'s variables are current
    again after its next read (`ema.variables`, the end of a `fit`).

    Example:

    >>> from keras_ema.backends import update_timer
    >>> ema = keras_ema.EMA(update_after_step=0)
    >>> ema.set_model(model)
    >>> run_update = update_timer(ema)
    >>> run_update()
    >>> ema.step
    1

    Args:
        ema: A `keras_ema.EMA` whose model is built, its shadows beside the
            weights (not `offload_to_host`).
    """
    engine = getattr(ema, "_engine", None)
    if engine is None:
        raise ValueError(
            "update_timer needs an EMA callback set on a built model "
            f"(`ema.set_model(model)`). Received: ema={ema!r}"
        )
    return engine.update_timer()
