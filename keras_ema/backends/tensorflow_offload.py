"""The EMA on TensorFlow with its shadows in host memory
(`offload_to_host=True`).

The update stays in the step's graph, its ops placed on the CPU; the weights
are read inside the due branch, on their own device, so a step that is not
due copies nothing to the host.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_ema import update
from keras_ema.backends import base
from keras_ema.backends.tensorflow import Placement
from keras_ema.backends.tensorflow import assign_update
from keras_ema.backends.tensorflow import fresh_copy
from keras_ema.backends.tensorflow import keras_train_function_around
from keras_ema.backends.tensorflow import read
from keras_ema.steps import any_optimizer_moved
from keras_ema.steps import counters_before
from keras_ema.steps import step_rule


class HostPlacement(Placement):
    """Shadows and counters in host memory (`/CPU:0`)."""

    def check(self, model, weights) -> None:
        strategy = getattr(model, "distribute_strategy", None)
        replicas = getattr(strategy, "num_replicas_in_sync", 1)
        if replicas > 1:
            raise ValueError(
                "`offload_to_host=True` does not support a `tf.distribute` "
                "strategy with several replicas: every replica would write the "
                f"same host shadows. Received: strategy={type(strategy).__name__} "
                f"with {replicas} replicas."
            )

    def scope(self, model):
        return keras.device("cpu:0")

    def initial_value(self, weight, dtype):
        # The cast runs on the host: no full-size copy on the device.
        with tf.device("/CPU:0"):
            return fresh_copy(weight.value, dtype)


def _host_assign_update(state, stepped):
    """`assign_update` with its ops on the CPU. The weights are read inside
    the due branch, on their own device, so a step that is not due copies
    nothing to the host."""

    def read_weights():
        with tf.device(None):
            return [read(w) for w in state.weights]

    with tf.device("/CPU:0"):
        return assign_update(
            state,
            update.update_when_due,
            read_weights,
            stepped,
            update.blend_by_branches,
        )


class HostEngine(base.Engine):
    """The update stays in the step's graph, its ops placed on the CPU.

    XLA compiles a function for one device, so with `jit_compile` only Keras'
    own step is XLA-compiled (a nested `tf.function`), and the host update
    runs in the surrounding graph, which TF schedules across devices.
    """

    def __init__(self, state):
        super().__init__(state)
        self._eager_update = None

    def build_train_function(self):
        state, model = self.state, self.model
        rule = step_rule(model)
        keras_train_step = model.train_step
        if model.jit_compile and not model.run_eagerly:
            keras_train_step = tf.function(
                keras_train_step, jit_compile=True, reduce_retracing=True
            )

        def train_step(data):
            before = counters_before(rule, read)
            logs = keras_train_step(data)
            stepped = any_optimizer_moved(rule, read, before)
            counters, decays = _host_assign_update(state, stepped)
            return base.ema_logs(logs, state, decays, counters[1])

        return keras_train_function_around(model, train_step, jit_compile=False)

    def update(self) -> None:
        if self._eager_update is None:
            self._eager_update = tf.function(
                lambda: _host_assign_update(self.state, None)[0], autograph=False
            )
        self._eager_update()
