"""What every timed ``fit`` shares: running it quietly, waiting for the
backend's queued work, the clock inside ``fit``, and the sizes measured on
its model."""

from __future__ import annotations

import time
from typing import Any

import keras
import numpy as np

from benchmarks.overhead.shapes import Shape

STARTUP_STEPS = 3  # steps of each timed fit left out of `steady_ms_per_step`


def fit_quietly(
    model: keras.Model,
    shape: Shape,
    data: tuple[np.ndarray, np.ndarray],
    callbacks: list[keras.callbacks.Callback],
    epochs: int = 1,
) -> None:
    """``epochs`` epochs over ``data``, no shuffling, no output."""
    x, y = data
    model.fit(
        x,
        y,
        batch_size=shape.batch,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )


def callback_arrays(callbacks: list[keras.callbacks.Callback]) -> list[Any]:
    """The EMA shadow variables of the callbacks (``keras_ema.EMA.variables``)."""
    return [v for c in callbacks for v in getattr(c, "variables", [])]


def _nbytes(array: Any) -> int:
    """Bytes of one Keras variable or backend array."""
    size = int(np.prod(array.shape)) if array.shape else 1
    return size * np.dtype(keras.backend.standardize_dtype(array.dtype)).itemsize


def state_bytes(model: keras.Model, callbacks: list[keras.callbacks.Callback]) -> int:
    """Bytes held by the optimizer's variables and the callbacks' arrays."""
    arrays = list(model.optimizer.variables) + callback_arrays(callbacks)
    return sum(_nbytes(a) for a in arrays)


def float_elements(model: keras.Model) -> int:
    """Elements of the model's floating-point weights, those the EMA averages."""
    return sum(
        int(np.prod(w.shape))
        for w in model.weights
        if keras.backend.is_float_dtype(w.dtype)
    )


def wait_for_device(
    model: keras.Model, callbacks: list[keras.callbacks.Callback]
) -> None:
    """Block until the backend has finished all work queued for the model's state."""
    if keras.backend.backend() != "jax":
        return  # TensorFlow and torch execute synchronously on CPU
    import jax

    arrays = list(model.variables) + list(model.optimizer.variables)
    arrays += callback_arrays(callbacks)
    values = [a.value if isinstance(a, keras.Variable) else a for a in arrays]
    jax.block_until_ready([v for v in values if isinstance(v, jax.Array)])


def wait_for_steps(model: keras.Model) -> float:
    """``time.perf_counter()`` once the steps dispatched so far have run.

    On JAX it blocks on the train state Keras keeps in the private
    ``model._jax_state`` (see `StepClock`).
    """
    if keras.backend.backend() == "jax":
        import jax

        state = getattr(model, "_jax_state", None) or {}
        jax.block_until_ready([a for group in state.values() for a in group])
    return time.perf_counter()


def unalias_builtin_ema(model: keras.Model) -> None:
    """Give the model's weights their own buffers after a built-in-EMA ``fit`` on JAX.

    ``finalize_variable_values`` at the end of ``fit`` assigns each EMA variable to
    its model variable; on JAX both then share one buffer, which the next train step
    donates, and a second ``fit`` fails. Copying the model's weights avoids that.
    """
    if keras.backend.backend() == "jax" and model.optimizer.use_ema:
        for variable in model.trainable_variables:
            variable.assign(keras.ops.copy(variable.value))


class StepClock(keras.callbacks.Callback):
    """Notes ``time.perf_counter()`` when batch ``STARTUP_STEPS`` begins.

    By then the first steps have run, with any tracing or compilation done
    inside that ``fit`` (on JAX, a function compiled for the first step can be
    compiled again for the second if its inputs' shardings changed). On JAX,
    whose steps are dispatched asynchronously, it first waits for the previous
    step to finish, reading the train state Keras keeps in the private
    ``model._jax_state`` (it does not sync it into the model). It overrides no
    ``*_batch_end`` hook and never reads ``self.model``, so Keras' async
    dispatch and JAX's deferred state sync stay as they are without it.
    """

    def __init__(self, model: keras.Model) -> None:
        super().__init__()
        self.fitted = model
        self.stamp = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if batch == STARTUP_STEPS:
            self.stamp = wait_for_steps(self.fitted)
