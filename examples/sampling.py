"""Sampling from the EMA model during training: a tiny diffusion model.

A denoiser MLP learns to predict the noise added to 2-D points drawn from
eight Gaussians on a circle (a DDPM-style loss with a cosine noise schedule,
continuous time). At the end of every epoch a callback generates points with
deterministic DDIM sampling (Song et al., 2021) from the same fixed noise,
twice: with the denoiser being trained and with ``ema.averaged_model()``, a
Keras model whose weights are the EMA's shadows. No weights are swapped:
the averaged model is another model, current after each optimizer step, so
the callback calls it as it calls the online denoiser (keras-io's DDIM
example keeps an ``ema_network`` for this, cloned and blended by hand).

Sample quality is the sliced Wasserstein distance between the generated
points and points drawn from the data distribution (lower is better). The
script prints it per epoch for both models::

    KERAS_BACKEND=jax python examples/sampling.py

``--quick`` runs a few epochs, as CI does.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import keras
import numpy as np
from keras import layers
from keras import ops

import keras_ema

N_POINTS = 4096
MODES = 8
RADIUS = 2.0
MODE_STD = 0.1
EMBEDDING = 8
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
SAMPLING_STEPS = 25
N_SAMPLES = 1024
BETA = 0.99
MAX_TIME = 0.98  # alpha_bar(1) = 0: no signal left to invert at t = 1


def ring(n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` points from eight Gaussians evenly spaced on a circle."""
    angles = 2 * np.pi * rng.integers(0, MODES, size=n) / MODES
    centres = RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return (centres + MODE_STD * rng.normal(size=(n, 2))).astype("float32")


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int = 64) -> float:
    """The sliced Wasserstein-1 distance between two equal-size point sets,
    over fixed random directions."""
    angles = np.linspace(0, np.pi, projections, endpoint=False)
    directions = np.stack([np.cos(angles), np.sin(angles)])
    return float(
        np.mean(np.abs(np.sort(a @ directions, 0) - np.sort(b @ directions, 0)))
    )


def alpha_bar(t):
    """The cosine schedule's signal fraction at time `t` in [0, 1]."""
    return ops.square(ops.cos(0.5 * math.pi * t))


def features(points, t):
    """The denoiser's input: the noisy points and sinusoidal features of `t`."""
    frequencies = 2.0 ** ops.arange(EMBEDDING, dtype="float32")
    angles = t * frequencies
    return ops.concatenate([points, ops.sin(angles), ops.cos(angles)], axis=-1)


def build_denoiser() -> keras.Model:
    """(points, time features) -> 3 x 128 SiLU -> the predicted noise."""
    return keras.Sequential(
        [
            keras.Input(shape=(2 + 2 * EMBEDDING,)),
            layers.Dense(128, activation="silu"),
            layers.Dense(128, activation="silu"),
            layers.Dense(128, activation="silu"),
            layers.Dense(2),
        ],
        name="denoiser",
    )


class Diffusion(keras.Model):
    """Trains `denoiser` to predict the noise mixed into clean points at a
    random time."""

    def __init__(self, denoiser: keras.Model, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.denoiser = denoiser
        self.noise_seed = keras.random.SeedGenerator(seed)

    def call(self, points, training=False):
        n = ops.shape(points)[0]
        t = MAX_TIME * keras.random.uniform((n, 1), seed=self.noise_seed)
        noise = keras.random.normal(ops.shape(points), seed=self.noise_seed)
        signal = alpha_bar(t)
        noisy = ops.sqrt(signal) * points + ops.sqrt(1.0 - signal) * noise
        return noise, self.denoiser(features(noisy, t), training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        noise, predicted = y_pred
        return ops.mean(ops.square(noise - predicted))


def ddim_sample(denoiser: keras.Model, noise: np.ndarray) -> np.ndarray:
    """Deterministic DDIM sampling (eta = 0) from `noise` at `MAX_TIME` to
    time 0 in `SAMPLING_STEPS` steps."""
    times = np.linspace(MAX_TIME, 0.0, SAMPLING_STEPS + 1, dtype="float32")
    points = ops.convert_to_tensor(noise)
    for now, then in zip(times[:-1], times[1:], strict=True):
        t = ops.full((len(noise), 1), now)
        predicted = denoiser(features(points, t), training=False)
        signal_now, signal_then = alpha_bar(now), alpha_bar(then)
        clean = (points - ops.sqrt(1.0 - signal_now) * predicted) / ops.sqrt(signal_now)
        points = ops.sqrt(signal_then) * clean + ops.sqrt(1.0 - signal_then) * predicted
    return ops.convert_to_numpy(points)


class SampleQuality(keras.callbacks.Callback):
    """At each epoch's end, samples with the online and the averaged
    denoiser and logs their distances to the data, `online_swd` and
    `ema_swd`."""

    def __init__(
        self,
        online: keras.Model,
        averaged: keras.Model,
        reference: np.ndarray,
        noise: np.ndarray,
    ) -> None:
        super().__init__()
        self.online = online
        self.averaged = averaged
        self.reference = reference
        self.noise = noise

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        for name, denoiser in (("online", self.online), ("ema", self.averaged)):
            samples = ddim_sample(denoiser, self.noise)
            logs[f"{name}_swd"] = sliced_wasserstein(samples, self.reference)
        print(
            f"epoch {epoch + 1:>3}: loss {logs.get('loss', float('nan')):.4f}, "
            f"sliced W1 online {logs['online_swd']:.4f}, EMA {logs['ema_swd']:.4f}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="5 epochs (CI's size)")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 5
    return args


def main() -> None:
    args = parse_args()
    print(f"Keras {keras.version()}, backend {keras.backend.backend()}")
    rng = np.random.default_rng(args.seed)
    points = ring(N_POINTS, rng)
    reference = ring(N_SAMPLES, rng)
    noise = rng.normal(size=(N_SAMPLES, 2)).astype("float32")
    floor = sliced_wasserstein(ring(N_SAMPLES, rng), reference)
    print(f"sliced W1 between two samples of the data: {floor:.4f}")

    keras.utils.set_random_seed(args.seed)
    denoiser = build_denoiser()
    ema = keras_ema.EMA(schedule=keras_ema.ConstantSchedule(BETA))
    ema.set_model(denoiser)
    quality = SampleQuality(denoiser, ema.averaged_model(), reference, noise)
    diffusion = Diffusion(denoiser, args.seed)
    diffusion.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE))
    history = diffusion.fit(
        points,
        batch_size=BATCH_SIZE,
        epochs=args.epochs,
        shuffle=True,
        callbacks=[ema, quality],
        verbose=0,
    )
    last = slice(-max(1, args.epochs // 4), None)
    print(
        f"\nmean over the last {len(history.history['loss'][last])} epoch(s): "
        f"sliced W1 online {np.mean(history.history['online_swd'][last]):.4f}, "
        f"EMA {np.mean(history.history['ema_swd'][last]):.4f}"
    )


if __name__ == "__main__":
    main()
