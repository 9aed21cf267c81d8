"""Using the EMA weights: as arrays, in the model, or as a model of their own.

`EMAWeights` is the part of the `EMA` callback that hands its weights out:
`get_weights()` (NumPy arrays), `swap_weights()` (in the tracked model for a
block, then the online weights back bit for bit), `copy_to_model()` (for
good) and `averaged_model()` (a Keras model computing with the shadows,
for teachers, target networks and sampling). It relies on the callback's
state (`_require_state`, `_flushed_state`, `_swaps`, `_training`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from keras_ema import averaged
from keras_ema import backends
from keras_ema import batchnorm
from keras_ema.saving.store import require_held_here
from keras_ema.swaps import as_model_arrays
from keras_ema.swaps import model_values


class EMAWeights:
    """The EMA weights handed out; mixed into `keras_ema.EMA`."""

    def get_weights(self, profile: str | None = None) -> list:
        """NumPy arrays aligned with `model.get_weights()`.

        The EMA value (cast to the weight's dtype) where a weight is tracked,
        the model's own value elsewhere, so that
        `other_model.set_weights(ema.get_weights())` works. Across JAX
        processes, an array sharded over devices of several processes is
        not gathered to one: a `ValueError` names the ways to save or export
        the EMA weights instead.

        Args:
            profile: A name from `profiles`; `None` for the first profile.
                Defaults to `None`.
        """
        averaged.refuse_in_compiled_step("get_weights()")
        index = self._profile_index(profile)
        state = self._flushed_state()
        shadows = state.profiles[index].shadows
        values = model_values(state.model, state.weights, shadows)
        require_held_here("get_weights()", values)
        return as_model_arrays(state.model, values)

    @contextlib.contextmanager
    def swap_weights(self, profile: str | None = None) -> Iterator[keras.Model]:
        """A context with the EMA weights in the model.

        On exit, also through an exception, the model gets its online weights
        back, bit for bit. Blocks nest: an inner block changes nothing, and
        the model keeps the EMA weights until the outermost block exits (an
        inner block of another profile is a `ValueError`). Inside a block,
        what needs the online weights (`fit`, `update()`, `copy_to_model()`)
        raises a `ValueError`.

        Args:
            profile: A name from `profiles`; `None` for the first profile.
                Defaults to `None`.
        """
        averaged.refuse_in_compiled_step("swap_weights()")
        index = self._profile_index(profile)
        if self._swaps.in_block and index != self._swapped_profile:
            raise ValueError(
                f"`swap_weights()` of profile {profile!r} inside a block of "
                f"profile {self.profile_names[self._swapped_profile]!r}: the "
                "model can hold one profile's weights at a time."
            )
        with self._swaps.block(self._tracked, lambda: self._swap_in(index)):
            yield self._tracked

    def averaged_model(self, profile: str | None = None) -> keras.Model:
        """A model of the tracked model's architecture that computes with the
        EMA weights, for a teacher, a target network or sampling.

        Its averaged weights are the EMA's shadow variables themselves: no
        copy, nothing to sync; each update of the EMA (in `fit`, after each
        due optimizer step, or `update()`) is what its next call computes
        with, also inside the compiled train step that calls it, on every
        backend. Its other weights (integer weights, weights the name
        filters copy or leave alone) are the tracked model's own variables.
        It is not trainable (`trainable_weights == []`; its
        BatchNormalization layers run in inference mode), the same object
        on every call for a profile, and a plain Keras model: it can be
        called anywhere, held by another model, and saved with `save()`.
        Its first values are the online weights when the EMA's state was
        created. Do not set it `trainable`: an optimizer would then move
        the shadows.

        Example:

        >>> ema = keras_ema.EMA(schedule=keras_ema.ConstantSchedule(0.999))
        >>> ema.set_model(model)  # the student
        >>> teacher = ema.averaged_model()
        >>> class Distilled(keras.Model):
        ...     def __init__(self, student, teacher):
        ...         super().__init__()
        ...         self.student, self.teacher = student, teacher
        ...     def call(self, x):
        ...         return self.student(x)
        ...     def compute_loss(self, x, y, y_pred, *args, **kwargs):
        ...         target = keras.ops.stop_gradient(self.teacher(x))
        ...         return keras.ops.mean((y_pred - y) ** 2) + keras.ops.mean(
        ...             (y_pred - target) ** 2
        ...         )
        >>> trainer = Distilled(model, teacher)
        >>> trainer.compile(optimizer="adam")
        >>> trainer.fit(x, y, epochs=2, callbacks=[ema], verbose=0)

        Args:
            profile: A name from `profiles`; `None` for the first profile.
                Defaults to `None`.
        """
        index = self._profile_index(profile)
        state = self._require_state()
        model = state.averaged_models.get(index)
        if model is None:
            model = averaged.averaged_model(state, index)
            self._engine.flush()
            state.averaged_models[index] = model
            # The engine lays the shadows out for the averaged model to read.
            self._engine = self._training.remade_engine(self._engine)
        return model

    def copy_to_model(self) -> None:
        """Writes the EMA weights into the model for good (e.g. before
        `model.save`). The online weights are overwritten."""
        self._require_online_weights("copy_to_model()")
        state = self._flushed_state()
        for weight, shadow in zip(state.weights, state.shadows, strict=True):
            weight.assign(backends.BACKEND_OPS.copy_for_weight(shadow.value, weight))

    def _swap_in(self, index: int) -> None:
        state = self._require_state()
        self._swaps.repair(state.model)
        state.check_model_unchanged()
        self._engine.flush()
        shadows = state.profiles[index].shadows
        self._swaps.swap_in(state.model, state.weights, [s.value for s in shadows])
        self._swapped_profile = index

    def recalibrate_batchnorm(
        self,
        x,
        batch_size: int | None = None,
        steps: int | None = None,
        profile: str | None = None,
    ) -> None:
        """Recomputes the BatchNormalization statistics for the EMA weights.

        Runs the EMA weights of a profile over `x` in training mode, without
        changing any variable, and stores in that profile's shadows each
        trainable `BatchNormalization` layer's `moving_mean` and
        `moving_variance`: the average over the batches of each batch's mean
        and variance, as the layer computes them in training (one batch
        gives that batch's statistics exactly), like PyTorch's `update_bn`.
        `evaluate`/`predict` with the callback, `swap_weights()`,
        `get_weights()`, `EMAModelCheckpoint` and the averaged model then
        use them. The online weights, their statistics and the other
        profiles do not change. Call it after training or before an
        evaluation: the next update of the EMA blends the statistics again.
        Dropout is active during the pass, as in training.

        Example:

        >>> ema = keras_ema.EMA(beta=0.99, update_after_step=0, update_every=1)
        >>> model.fit(x, y, epochs=2, callbacks=[ema], verbose=0)
        >>> ema.recalibrate_batchnorm(x, batch_size=32)
        >>> model.evaluate(x_val, y_val, callbacks=[ema], verbose=0)

        Args:
            x: Input data, as `model.predict` takes it: arrays, a
                `tf.data.Dataset`, a `keras.utils.PyDataset` or a generator.
            batch_size: Samples per batch for arrays. Defaults to `None`
                (32, as in `predict`).
            steps: How many batches to read. Defaults to `None` (all of
                them).
            profile: A name from `profiles`; `None` for the first profile.
                Defaults to `None`.
        """
        batchnorm.recalibrate(self, x, batch_size, steps, profile)
