"""`EMAModelCheckpoint` and `EMAOrbaxCheckpoint`: Keras checkpoints that save
the EMA weights."""

from __future__ import annotations

import os

import keras

from keras_ema import _internals
from keras_ema.callback import EMA


class EMAModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Saves the model with its EMA weights, keeping the online ones in it.

    Everything `keras.callbacks.ModelCheckpoint` does (every epoch, every N
    batches, best only by any monitored key), but each file holds the EMA
    weights: the save runs inside `ema.swap_weights()`. Unlike
    `SwapEMAWeights` + `ModelCheckpoint`, the result does not depend on the
    order of the callbacks, and the training model keeps its online weights.
    The files are plain Keras files: `keras.models.load_model` opens them
    without `keras_ema`.

    Example:

    >>> ema = keras_ema.EMA(beta=0.999)
    >>> best = keras_ema.EMAModelCheckpoint(
    ...     ema, "best_ema.keras", monitor="val_ema_loss", mode="min",
    ...     save_best_only=True,
    ... )
    >>> model.fit(x, y, validation_data=(x_val, y_val),
    ...           callbacks=[best, ema])

    Args:
        ema: The `keras_ema.EMA` callback whose weights are saved. It must be
            in the same `fit` call; otherwise `fit` raises a `ValueError`
            before the first epoch.
        filepath: As for `ModelCheckpoint`.
        profile: Which of the EMA's `profiles` to save; `None` for the
            first. Defaults to `None`.
        **kwargs: Any other `ModelCheckpoint` argument (`monitor`, `mode`,
            `save_best_only`, `save_weights_only`, `save_freq`, ...).
    """

    def __init__(
        self,
        ema: EMA,
        filepath: str | os.PathLike,
        profile: str | None = None,
        **kwargs,
    ) -> None:
        if not isinstance(ema, EMA):
            raise ValueError(
                f"`ema` must be a `keras_ema.EMA` callback. Received: ema={ema!r}"
            )
        if not isinstance(filepath, (str, os.PathLike)):
            raise ValueError(
                "`filepath` must be a string or a path-like object. "
                f"Received: filepath={filepath!r}"
            )
        ema._profile_index(profile)
        super().__init__(filepath, **kwargs)
        self.ema = ema
        self.profile = profile

    def on_train_begin(self, logs=None) -> None:
        _require_same_fit(self, self.ema, "EMAModelCheckpoint")
        super().on_train_begin(logs)

    def _save_model(self, epoch, batch, logs):
        with self.ema.swap_weights(self.profile):
            _internals.model_checkpoint_save(super(), epoch, batch, logs)


# Keras before 3.14 has no `OrbaxCheckpoint`: there the class below still
# exists, and constructing it raises a `ValueError` naming the Keras version.
_OrbaxCheckpoint = (
    _internals.optional_orbax_checkpoint_class() or keras.callbacks.Callback
)


class EMAOrbaxCheckpoint(_OrbaxCheckpoint):
    """`keras.callbacks.OrbaxCheckpoint` that saves the EMA weights.

    Everything Keras' `OrbaxCheckpoint` does (every epoch or every N
    batches, best only, `max_to_keep`, saves in the background, every
    process writing its own shards under `keras.distribution`), but each
    checkpoint holds the EMA weights in place of the online ones: the save
    runs inside `ema.swap_weights()`. The training model keeps its online
    weights, whatever the order of the callbacks. The checkpoints are plain
    Keras Orbax checkpoints: `keras.models.load_model(directory)` and
    `model.load_weights(directory)` read them without `keras_ema`. The
    optimizer state they hold (without `save_weights_only=True`) is the
    online weights'. Like every `OrbaxCheckpoint` in a `fit` with an `EMA`,
    they also hold the EMA's own state, which `model.load_weights` restores
    into an EMA attached to the loading model.

    Needs Keras 3.14 or later and the `orbax-checkpoint` package
    (`pip install "keras-ema[orbax]"`).

    Example:

    >>> import os
    >>> directory = os.path.abspath("ema_weights")  # Orbax takes absolute paths
    >>> ema = keras_ema.EMA(beta=0.999)
    >>> export = keras_ema.EMAOrbaxCheckpoint(ema, directory)
    >>> model.fit(x, y, epochs=10, callbacks=[ema, export])
    >>> ema_model = keras.models.load_model(directory)

    Args:
        ema: The `keras_ema.EMA` callback whose weights are saved. It must be
            in the same `fit` call; otherwise `fit` raises a `ValueError`
            before the first epoch.
        directory: As for `OrbaxCheckpoint`: the folder of the checkpoints.
        profile: Which of the EMA's `profiles` to save; `None` for the
            first. Defaults to `None`.
        **kwargs: Any other `OrbaxCheckpoint` argument (`monitor`, `mode`,
            `save_best_only`, `save_freq`, `max_to_keep`,
            `save_on_background`, `save_weights_only`, ...).
    """

    def __init__(
        self,
        ema: EMA,
        directory: str | os.PathLike,
        profile: str | None = None,
        **kwargs,
    ) -> None:
        _internals.orbax_checkpoint_class()
        if not isinstance(ema, EMA):
            raise ValueError(
                f"`ema` must be a `keras_ema.EMA` callback. Received: ema={ema!r}"
            )
        if not isinstance(directory, (str, os.PathLike)):
            raise ValueError(
                "`directory` must be a string or a path-like object. "
                f"Received: directory={directory!r}"
            )
        ema._profile_index(profile)
        super().__init__(os.fspath(directory), **kwargs)
        self.ema = ema
        self.profile = profile

    def on_train_begin(self, logs=None) -> None:
        _require_same_fit(self, self.ema, "EMAOrbaxCheckpoint")
        super().on_train_begin(logs)

    def _save_checkpoint(self, step, logs=None):
        with self.ema.swap_weights(self.profile):
            _internals.orbax_checkpoint_save(super(), step, logs)


def _require_same_fit(checkpoint, ema, name: str) -> None:
    # Outside a `fit` that Keras runs (a hand-built CallbackList) the
    # callbacks are unknown: then only the model is checked.
    callbacks = _internals.fit_callbacks(checkpoint.model)
    if ema.model is not checkpoint.model or (callbacks and ema not in callbacks):
        raise ValueError(
            f"`ema` must be a callback of the same `fit` call as this `{name}`, "
            f"e.g. `model.fit(..., callbacks=[ema, checkpoint])`. "
            f"Received: ema={ema!r}"
        )
