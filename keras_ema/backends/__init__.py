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
