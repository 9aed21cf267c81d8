"""The EMA on JAX with its shadows in host memory (`offload_to_host=True`).

Keras' own jitted step runs; on due steps the weights are copied to the CPU,
where a jitted update of the host shadows runs. Both are dispatched
asynchronously, so the train loop does not wait for the copy.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from keras_ema import _internals
from keras_ema import update
from keras_ema.backends import base
from keras_ema.guard import Guard
from keras_ema.steps import HostCounters
from keras_ema.steps import OptimizerSteps
from keras_ema.steps import step_rule


class HostPlacement(base.Placement):
    """Shadows and counters in host memory, each with a CPU sharding as its
    layout, so that every `assign` (from a state file too) lands there."""

    def __init__(self):
        self.cpu = jax.devices("cpu")[0]

    def initial_value(self, weight, dtype):
        # `may_alias=False`: a CPU weight is copied too, and the cast runs on
        # the host, so no full-size copy is made on the device.
        host = jax.device_put(weight.value, self.cpu, may_alias=False)
        return host.astype(dtype)

    def shadow_layout(self, weight):
        return jax.sharding.SingleDeviceSharding(self.cpu)

    def counter_layout(self, weights):
        return jax.sharding.SingleDeviceSharding(self.cpu)


def _host_update(schedules, kinds, t, skipped, shadows, weights):
    """The update of step `t`, counted on the host."""
    (_, skipped), shadows, _ = update.update_all(
        schedules,
        kinds,
        (t, skipped),
        shadows,
        lambda: weights,
        guard=Guard.XLA_CPU,
        counted=True,
    )
    return shadows, skipped


class HostEngine(base.Engine):
    """Keras' own jitted step, then, on due steps, the weights copied to the
    CPU and a jitted update of the host shadows there.

    The schedule is decided on the host (`HostCounters`, the optimizer's
    counter mirrored by `OptimizerSteps`). Both the copy and the update are
    dispatched asynchronously, so the loop does not wait for the copy. With
    a `LossScaleOptimizer`, whose skipped steps only the device knows, the
    optimizer's counter is read back every step.
    """

    def __init__(self, state):
        super().__init__(state)
        self._cpu = jax.devices("cpu")[0]
        # The old shadows are donated: their buffers hold the new ones.
        self._update = jax.jit(
            functools.partial(_host_update, state.schedules, state.kinds),
            donate_argnums=(1, 2),
        )
        self.counters = HostCounters(state.schedules)
        self.counters.read(state.step)
        self._steps = None

    def install(self) -> None:
        super().install()
        self._steps.sync()

    def flush(self) -> None:
        self.state.step.assign(self.counters.step)

    def reload(self) -> None:
        self.counters.read(self.state.step)

    def step(self, moved: bool = True, weights=None) -> list:
        """Counts one optimizer step, updates the shadows if it is due, and
        returns each profile's decay."""
        state = self.state
        if self.counters.count_step(moved) is not None:
            online = weights or [w.value for w in state.weights]
            # `may_alias=False`: a CPU weight is copied too, since the next
            # train step donates (deletes) the weight's buffer.
            online = jax.device_put(list(online), self._cpu, may_alias=False)
            shadows = [[s.value for s in p.shadows] for p in state.profiles]
            new_shadows, skipped = self._update(
                np.int32(self.counters.step),
                state.skipped.value,
                shadows,
                online,
            )
            for profile, values in zip(state.profiles, new_shadows, strict=True):
                for shadow, value in zip(profile.shadows, values, strict=True):
                    shadow.assign(value)
            state.skipped.assign(skipped)
        return self.counters.decays()

    def update(self) -> None:
        self.step()

    def build_train_function(self):
        state, model = self.state, self.model
        locate = _internals.jax_state_weights(model, state.weights)
        self._steps = steps = OptimizerSteps(step_rule(model, in_train_state_only=True))
        counters_of = [
            _internals.jax_state_optimizer_variable(model, iterations)
            for iterations in steps.iterations
        ]
        keras_train_step = _internals.jit_keras_train_step(model)
        steps_per_execution = model.steps_per_execution

        def train_function(keras_state, iterator):
            logs = decays = None
            for data in _internals.batches(iterator, steps_per_execution):
                logs, keras_state = keras_train_step(keras_state, data)
                moved = steps.follow([of(keras_state) for of in counters_of])
                decays = self.step(moved, locate(keras_state))
            logs = base.ema_logs(logs, state, decays, state.skipped.value)
            return logs, keras_state

        return train_function
