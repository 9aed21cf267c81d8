"""This backend's EMA code, chosen once at import, as Keras chooses its
trainers: `BACKEND_OPS`, one `base.Backend`.

Each backend has two modules: `<backend>.py` with the `Placement` and the
`Engine` of shadows beside the weights and its `Backend` (the buffer
operations the callback needs for swaps, `start_when_built` for models built
by `fit` itself, `held_here`, and what Orbax checkpoints need, see
`keras_ema/saving/orbax_state.py`), and `<backend>_offload.py` with the
`HostPlacement` and `HostEngine` of shadows in host memory (see `base.py`).
"""

from __future__ import annotations

import keras

from keras_ema.backends.base import Backend

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

BACKEND_OPS: Backend = _backend.Backend(
    _backend.Placement, _backend.Engine, _offload.HostPlacement, _offload.HostEngine
)


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
