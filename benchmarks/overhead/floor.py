"""The bandwidth floor: one in-place lerp over the model's float elements,
and the EMA's update timed alone beside it."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from benchmarks.overhead.environment import strategy_in_use
from benchmarks.overhead.modes import build_model
from benchmarks.overhead.shapes import Shape

FLOOR_PARAMS = 1_000_000  # models larger than this always get the floor
FLOOR_REPEATS = 100
FLOOR_WARMUP = 5
FLOOR_WEIGHT = 1e-3  # the lerp's weight, 1 - beta


def make_lerp(elements: int, jit_compile: bool) -> Callable[[], None]:
    """A function running ``a = a + w * (b - a)`` in place over ``elements``
    float32 values with the backend's own op, and waiting for it.

    JAX: a jitted function of one flat array, donated (XLA writes the result
    into its buffer), blocked on. TensorFlow: ``assign_add`` of the difference
    to a ``tf.Variable`` inside a ``tf.function``, compiled with XLA when the
    models are (``jit_compile``; Keras' default is no XLA on a CPU). torch:
    ``Tensor.lerp_``. Each on Keras' default device.
    """
    a = keras.ops.zeros((elements,), "float32")
    b = keras.ops.ones((elements,), "float32")
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        lerp = jax.jit(lambda a, b, w: a + w * (b - a), donate_argnums=0)
        weight = np.float32(FLOOR_WEIGHT)
        buffer = [a]

        def run() -> None:
            buffer[0] = lerp(buffer[0], b, weight)
            buffer[0].block_until_ready()

        return run
    if backend == "tensorflow":
        import tensorflow as tf

        variable = tf.Variable(a)
        weight = tf.constant(FLOOR_WEIGHT, tf.float32)

        @tf.function(jit_compile=jit_compile)
        def lerp() -> None:
            variable.assign_add(weight * (b - variable))

        return _then_synced(lerp)
    return _then_synced(lambda: a.lerp_(b, FLOOR_WEIGHT))


def make_update(model: keras.Model) -> Callable[[], None]:
    """A function running the EMA's update alone on ``model``'s weights, as a
    ``keras_ema`` step of ``fit`` runs it after Keras' train step (guard
    included), and waiting for it.

    The library provides it for measurement, `keras_ema.backends.update_timer`:
    TensorFlow, the train step's update in a ``tf.function`` of its own;
    torch, the engine's step; JAX, the update of a due step jitted on its own
    over the engine's packed shadows.
    """
    import keras_ema
    from keras_ema.backends import update_timer

    ema = keras_ema.EMA(update_every=1, update_after_step=0)
    ema.set_model(model)
    return _then_synced(update_timer(ema))


def _then_synced(function: Callable[[], Any]) -> Callable[[], None]:
    """``function``, then a wait for the device's queued work."""
    sync = _device_sync()

    def run() -> None:
        function()
        sync()

    return run


def _device_sync() -> Callable[[], None]:
    """Waits for a GPU's queued work (Keras puts the tensors on it when there
    is one); nothing to wait for on a CPU, where TensorFlow and torch run
    each op before returning, nor on JAX, whose functions here block."""
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.synchronize
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            return tf.test.experimental.sync_devices
    return lambda: None


def measure_floor(
    elements: int, jit_compile: bool, model: keras.Model | None = None
) -> tuple[float, float | None]:
    """Median ms of ``FLOOR_REPEATS`` lerps (`make_lerp`) and, given a model,
    of as many EMA updates on it (`make_update`), one of each in turn, after
    a warm-up."""
    gc.collect()
    runs = [make_lerp(elements, jit_compile)]
    if model is not None:
        runs.append(make_update(model))
    for _ in range(FLOOR_WARMUP):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(FLOOR_REPEATS):
        for run, spent in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            spent.append(1000.0 * (time.perf_counter() - start))
    medians = [statistics.median(spent) for spent in times]
    return medians[0], (medians[1] if model is not None else None)


def floor_round(shape: Shape, first: dict[str, Any]) -> tuple[float, float | None]:
    """One round of the floor: the lerp and, without a strategy, the update
    alone on a fresh model of the shape (`measure_floor`)."""
    model = None if strategy_in_use() else build_model(shape, "none")
    return measure_floor(first["float_elements"], first["jit_compile"], model)


def floor_result(
    floors: list[tuple[float, float | None]],
    elements: int,
    per_step: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """The floor's JSON: the lerp's best median, its bandwidth, the update
    alone's best median and its ratio to the lerp, and, for each per-step
    metric given, ``(keras_ema - none) / lerp``.

    The bandwidth counts 12 bytes an element: two arrays read, one written.
    """
    lerps = [lerp for lerp, _ in floors]
    updates = [update for _, update in floors if update is not None]
    lerp_ms = min(lerps)
    result: dict[str, Any] = {
        "elements": elements,
        "lerp_ms": lerp_ms,
        "lerp_ms_all": lerps,
        "lerp_gb_per_s": 12 * elements / lerp_ms / 1e6,
    }
    if updates:
        result["update_ms"] = min(updates)
        result["update_ms_all"] = updates
        result["update_over_lerp"] = min(updates) / lerp_ms
    for name, best in per_step.items():
        if "keras_ema" in best and "none" in best:
            added = best["keras_ema"] - best["none"]
            result[f"{name}_ema_over_lerp"] = added / lerp_ms
    return result


def print_floor(floor: dict[str, Any]) -> None:
    """One line for the floor of a shape's table."""
    ratios = [
        f"(keras_ema - none) / lerp {floor[key]:.3f} ({key.split('_ema')[0]})"
        for key in floor
        if key.endswith("_ema_over_lerp")
    ]
    print(
        f"  floor: one in-place lerp of {floor['elements']:,} float32, "
        f"{floor['lerp_ms']:.4f} ms ({floor['lerp_gb_per_s']:.1f} GB/s, median of "
        f"{FLOOR_REPEATS}, best of {len(floor['lerp_ms_all'])} rounds)"
        + (f"; {', '.join(ratios)}" if ratios else "")
    )
    if "update_ms" in floor:
        print(
            f"  the update alone: {floor['update_ms']:.4f} ms, "
            f"{floor['update_over_lerp']:.3f} lerps"
        )
