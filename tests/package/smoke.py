"""Smoke test of an installed keras-ema, run from outside the source tree.

Imports the installed package (and fails if `keras_ema` comes from anywhere
but site-packages), trains a tiny model with `keras_ema.EMA`, evaluates it
with the EMA weights, and checks that the model keeps its online weights.
Run by `tests/package/check.py` under each backend.
"""

from __future__ import annotations

import pathlib
import sys

import keras
import numpy as np

import keras_ema


def check_installed() -> pathlib.Path:
    where = pathlib.Path(keras_ema.__file__).resolve().parent
    if "site-packages" not in where.parts:
        sys.exit(f"keras_ema was imported from {where}, not from site-packages")
    return where


def tiny_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def main() -> None:
    where = check_installed()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = tiny_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=2, update_every=1)

    history = model.fit(
        x,
        y,
        validation_data=(x, y),
        epochs=2,
        batch_size=16,
        callbacks=[ema],
        verbose=2,
    )
    assert "val_ema_loss" in history.history, sorted(history.history)
    assert ema.step == 8, ema.step

    online = model.get_weights()
    ema_weights = ema.get_weights()
    assert any(
        not np.array_equal(a, b) for a, b in zip(online, ema_weights, strict=True)
    ), "the EMA weights equal the online ones after training"

    swapped_loss = model.evaluate(x, y, callbacks=[ema], verbose=0)
    twin = keras.models.clone_model(model)
    twin.compile(loss="mse")
    twin.set_weights(ema_weights)
    ema_loss = twin.evaluate(x, y, verbose=0)
    np.testing.assert_allclose(swapped_loss, ema_loss, rtol=1e-5)

    for before, after in zip(online, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    online_loss = model.evaluate(x, y, verbose=0)
    print(
        f"keras_ema {keras_ema.__version__} from {where}, keras {keras.__version__} "
        f"on {keras.backend.backend()}: loss {online_loss:.4f} online, "
        f"{swapped_loss:.4f} with the EMA weights"
    )


if __name__ == "__main__":
    main()
