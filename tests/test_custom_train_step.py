"""The step counter with a model's own `train_step`: it counts the steps in
which an optimizer moved the weights, not the calls of `train_step`."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import assert_close
from conftest import ema_values
from conftest import float_weights
from keras import ops
from oracle import ArticleEMA

import keras_ema

HP = dict(beta=0.9, update_after_step=2, update_every=1)
FEATURES = 6
BATCH = 8


@pytest.fixture(params=[False, True], ids=["device", "host"])
def offload(request) -> bool:
    return request.param


def data(batches: int, applied_every: int = 2):
    """Inputs with one more column: 1 on the batches whose step applies the
    optimizer (every `applied_every`-th, the first included)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batches * BATCH, FEATURES + 1)).astype("float32")
    y = (x[:, :FEATURES] @ rng.normal(size=(FEATURES, 1))).astype("float32")
    x[:, FEATURES] = np.repeat(np.arange(batches) % applied_every == 0, BATCH)
    return x, y


class Net(keras.Model):
    """Two dense layers; its `train_step` applies `self.optimizers_to_apply`,
    each to the weights of its layers (an optimizer to all of them by
    default), where the batch's last input column is 1."""

    def __init__(self):
        super().__init__(name="net")
        self.first = keras.layers.Dense(4, activation="relu", name="first")
        self.second = keras.layers.Dense(1, name="second")
        self(np.zeros((1, FEATURES + 1), "float32"))

    def call(self, x):
        # The last column says whether to apply the optimizer, not an input.
        return self.second(self.first(x[:, :FEATURES]))

    def applied(self) -> list:
        """(optimizer, layer variables) pairs the step applies."""
        return [(self.optimizer, self.trainable_variables)]

    if BACKEND == "jax":

        def train_step(self, state, data):
            import jax

            trainable, non_trainable, optimizer_variables, metrics = state
            x, y = data

            def loss_of(values):
                prediction, _ = self.stateless_call(values, non_trainable, x)
                return ops.mean((prediction - y) ** 2)

            loss, grads = jax.value_and_grad(loss_of)(trainable)
            apply = x[0, FEATURES] > 0.5
            new_trainable, new_optimizer_variables = list(trainable), []
            positions = {id(v): i for i, v in enumerate(self.trainable_variables)}
            for optimizer, variables in self.applied():
                indices = [positions[id(v)] for v in variables]
                if optimizer is self.optimizer:
                    own = optimizer_variables
                else:  # Not in Keras' state: read as they are.
                    own = [v.value for v in optimizer.variables]
                values, own_new = optimizer.stateless_apply(
                    own, [grads[i] for i in indices], [trainable[i] for i in indices]
                )
                for i, value in zip(indices, values, strict=True):
                    new_trainable[i] = value
                if optimizer is self.optimizer:
                    new_optimizer_variables = own_new

            def pick(new, old):
                return [
                    jax.numpy.where(apply, n, o) for n, o in zip(new, old, strict=True)
                ]

            if new_optimizer_variables:
                optimizer_variables = pick(new_optimizer_variables, optimizer_variables)
            state = (pick(new_trainable, trainable), non_trainable)
            return {"loss": loss}, (*state, optimizer_variables, metrics)

    else:

        def train_step(self, data):
            x, y = data
            apply = x[0, FEATURES] > 0.5
            grads = gradients(self, x, y)
            for optimizer, variables in self.applied():
                chosen = [grads[id(v)] for v in variables]
                if BACKEND == "tensorflow":
                    import tensorflow as tf

                    tf.cond(
                        apply,
                        lambda o=optimizer, g=chosen, v=variables: _applied(o, g, v),
                        lambda: tf.constant(False),
                    )
                elif bool(apply):
                    optimizer.apply(chosen, variables)
            return {"loss": ops.mean((self(x) - y) ** 2)}


def _applied(optimizer, grads, variables):
    import tensorflow as tf

    optimizer.apply(grads, variables)
    return tf.constant(True)


def gradients(model, x, y) -> dict:
    """The gradient of the squared error for each trainable variable (by id)."""
    variables = model.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = ops.mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, variables)
    else:
        model.zero_grad()
        loss = ops.mean((model(x) - y) ** 2)
        loss.backward()
        grads = [v.value.grad for v in variables]
    return {id(v): g for v, g in zip(variables, grads, strict=True)}


class TwoOptimizers(Net):
    """A GAN-style step: each layer has an optimizer of its own, both
    applied at every step."""

    def compile(self, model_optimizer):
        self.first_optimizer = keras.optimizers.SGD(0.05)
        self.second_optimizer = keras.optimizers.SGD(0.1)
        self.first_optimizer.build(self.first.trainable_variables)
        self.second_optimizer.build(self.second.trainable_variables)
        if model_optimizer == "first":
            model_optimizer = self.first_optimizer
        if model_optimizer == "keras default":
            super().compile()
        else:
            super().compile(optimizer=model_optimizer)

    def applied(self) -> list:
        return [
            (self.first_optimizer, self.first.trainable_variables),
            (self.second_optimizer, self.second.trainable_variables),
        ]


class OnMovedSteps(keras.callbacks.Callback):
    """Replays into the oracle the weights after each batch that changed
    them."""

    def __init__(self, oracle, last):
        super().__init__()
        self.oracle, self.last = oracle, last
        self.moved = 0

    def on_train_batch_end(self, batch, logs=None):
        weights = float_weights(self.model)
        if any(not np.array_equal(weights[k], self.last[k]) for k in weights):
            self.oracle.update(weights)
            self.moved += 1
        self.last = weights


def fit_with_oracle(model, ema, x, y):
    oracle = ArticleEMA(float_weights(model), **HP)
    replay = OnMovedSteps(oracle, float_weights(model))
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[ema, replay],
    )
    return oracle, replay.moved


def test_a_step_that_does_not_apply_the_optimizer_is_not_counted(offload):
    model = Net()
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    ema = keras_ema.EMA(**HP, offload_to_host=offload)
    x, y = data(batches=10)
    oracle, moved = fit_with_oracle(model, ema, x, y)
    iterations = int(ops.convert_to_numpy(model.optimizer.iterations))
    assert moved == iterations == 5
    assert ema.step == oracle.step == 5
    assert_close(oracle.ema, ema_values(ema))
    # The next fit goes on counting optimizer steps.
    fit_with_oracle(model, ema, x, y)
    assert ema.step == int(ops.convert_to_numpy(model.optimizer.iterations)) == 10


@pytest.mark.parametrize("model_optimizer", [None, "first", "keras default"])
def test_a_step_applying_optimizers_of_its_own_is_counted(offload, model_optimizer):
    if BACKEND == "jax" and model_optimizer is None:
        pytest.skip("Keras' JAX trainer reads `model.optimizer.variables` in `fit`")
    model = TwoOptimizers()
    model.compile(model_optimizer)
    ema = keras_ema.EMA(**HP, offload_to_host=offload)
    x, y = data(batches=6, applied_every=1)
    oracle, moved = fit_with_oracle(model, ema, x, y)
    assert moved == 6
    assert ema.step == oracle.step == 6
    assert_close(oracle.ema, ema_values(ema))


def test_post_hoc_snapshots_follow_the_optimizer_steps_of_a_custom_step(tmp_path):
    model = Net()
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    callback = keras_ema.PostHocEMA(tmp_path, snapshot_every=2, verbose=0)
    x, y = data(batches=10)
    for _ in range(2):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[callback],
        )
    assert callback.step == int(ops.convert_to_numpy(model.optimizer.iterations))
    # Every second optimizer step, and the last one of each fit.
    assert keras_ema.PostHocRun(tmp_path).steps == [2, 4, 5, 6, 8, 10]


def test_post_hoc_refuses_a_step_applying_optimizers_of_its_own(tmp_path):
    model = TwoOptimizers()
    model.compile("keras default")
    callback = keras_ema.PostHocEMA(tmp_path, snapshot_every=2, verbose=0)
    x, y = data(batches=2, applied_every=1)
    with pytest.raises(ValueError, match="optimizers of its own"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])
