"""This backend's EMA code, chosen once at import, as Keras chooses its
trainers.

Each backend module provides the same names: `make_placement(offload)` and
`make_engine(state)` (see `base.py`), and the buffer operations the callback
needs for swaps: `fresh_copy`, `copy_for_weight`, `online_backup`,
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
elif BACKEND == "tensorflow":
    from keras_ema.backends import tensorflow as _backend
elif BACKEND == "torch":
    from keras_ema.backends import torch as _backend
else:
    raise ImportError(
        "keras_ema runs on the TensorFlow, JAX and torch backends of Keras. "
        f"Received: backend={BACKEND!r}"
    )

make_placement = _backend.make_placement
make_engine = _backend.make_engine
fresh_copy = _backend.fresh_copy
copy_for_weight = _backend.copy_for_weight
online_backup = _backend.online_backup
restore_backup = _backend.restore_backup
start_when_built = _backend.start_when_built
held_here = _backend.held_here
require_orbax_support = _backend.require_orbax_support
orbax_target = _backend.orbax_target
