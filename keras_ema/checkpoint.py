"""`EMAModelCheckpoint`: `ModelCheckpoint` that saves the EMA weights."""

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
        # Outside a `fit` that Keras runs (a hand-built CallbackList) the
        # callbacks are unknown: then only the model is checked.
        callbacks = _internals.fit_callbacks(self.model)
        if self.ema.model is not self.model or (
            callbacks and self.ema not in callbacks
        ):
            raise ValueError(
                "`ema` must be a callback of the same `fit` call as this "
                "`EMAModelCheckpoint`, e.g. `model.fit(..., callbacks=[ema, "
                f"checkpoint])`. Received: ema={self.ema!r}"
            )
        super().on_train_begin(logs)

    def _save_model(self, epoch, batch, logs):
        with self.ema.swap_weights(self.profile):
            _internals.model_checkpoint_save(super(), epoch, batch, logs)
