"""The benchmark's models, their synthetic data and their step counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

SEED = 0


@dataclass(frozen=True)
class Shape:
    """A benchmark model: how to build it, its data and its step counts."""

    name: str
    build: Callable[[], keras.Model]
    input_shape: tuple[int, ...]
    classes: int  # 0: regression with one output and MSE
    batch: int
    steps: int
    quick_steps: int

    @property
    def loss(self) -> str:
        """The loss the model is compiled with."""
        return "sparse_categorical_crossentropy" if self.classes else "mse"


def _mlp(
    inputs: int, widths: list[int], outputs: int, dropout: float = 0.0
) -> keras.Model:
    """A ReLU MLP with the given hidden widths and a linear head."""
    x = inp = keras.Input((inputs,))
    for width in widths:
        x = keras.layers.Dense(width, activation="relu")(x)
        if dropout:
            x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inp, keras.layers.Dense(outputs)(x))


def _article_mlp() -> keras.Model:
    """The article's regression MLP: 20-64-32-1 with dropout 0.2."""
    return _mlp(20, [64, 32], 1, dropout=0.2)


def _deep_mlp() -> keras.Model:
    """Many small variables: 40 Dense layers of 64 units (82 variables)."""
    return _mlp(64, [64] * 39, 1)


def _wide_mlp() -> keras.Model:
    """Few large variables: 4 Dense layers of 1024 units (~4.2M parameters)."""
    return _mlp(1024, [1024] * 3, 1024)


def _big_mlp() -> keras.Model:
    """Over 10M parameters in three large Dense layers."""
    return _mlp(256, [2048, 4096, 512], 10)


def _conv_bn() -> keras.Model:
    """A small conv net with BatchNormalization (non-trainable moving statistics)."""
    x = inp = keras.Input((32, 32, 3))
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax")(x))


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("article_mlp", _article_mlp, (20,), 0, 32, 300, 100),
        Shape("deep_mlp", _deep_mlp, (64,), 0, 32, 100, 40),
        Shape("wide_mlp", _wide_mlp, (1024,), 0, 32, 40, 15),
        Shape("conv_bn", _conv_bn, (32, 32, 3), 10, 32, 30, 12),
        Shape("big_mlp", _big_mlp, (256,), 10, 16, 20, 10),
    )
}


def make_data(shape: Shape, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic inputs and targets for exactly ``steps`` batches."""
    rng = np.random.default_rng(SEED)
    n = steps * shape.batch
    x = rng.standard_normal((n, *shape.input_shape), dtype=np.float32)
    if shape.classes:
        y = rng.integers(0, shape.classes, size=(n,)).astype(np.int32)
    else:
        y = rng.standard_normal((n, 1), dtype=np.float32)
    return x, y
