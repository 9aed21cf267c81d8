"""Putting an `EMA` into a `fit` and taking it out.

At the start of a `fit`, the engine's update goes into the model's training
(deferred to the first train step where TensorFlow builds the model there),
with each profile's schedule in this fit's steps, and `evaluate` is wrapped
so that validation also reports `val_ema_*`. At the end, or after an error,
both are undone.
"""

from __future__ import annotations

from keras_ema import _internals
from keras_ema import backends
from keras_ema import binding
from keras_ema import val_ema


class Training:
    """An `EMA`'s part in the model's `fit`: installed, deferred or out.

    Args:
        ema: The `EMA` callback whose engine goes into the training.
    """

    def __init__(self, ema) -> None:
        self._ema = ema
        self.in_fit = False
        self._fit_schedules = None
        self._undo_deferral = None
        self._unwrap_evaluate = None

    def start(self, model, fit) -> None:
        """Puts the EMA into the `fit` described by `fit` (Keras' fit
        context)."""
        ema = self._ema
        self._fit_schedules = [
            schedule.in_steps(
                (ema.params or {}).get("steps"),
                fit.batch_size,
                epochs=(ema.params or {}).get("epochs"),
            )
            for _, schedule in ema._profiles
        ]
        if ema._state is None and not model.built:
            # TensorFlow builds a model that was never called in its first
            # train step, after `on_train_begin`.
            self._undo_deferral = backends.BACKEND_OPS.start_when_built(
                model, self._install
            )
        else:
            self._install()
        self._unwrap_evaluate = _internals.wrap_evaluate(
            model, self._evaluate_online_and_ema
        )
        self.in_fit = True

    def finish(self) -> None:
        """Takes the EMA out of the model's training (idempotent)."""
        self.in_fit = False
        if self._undo_deferral is not None:
            self._undo_deferral()
            self._undo_deferral = None
        if self._unwrap_evaluate is not None:
            self._unwrap_evaluate()
            self._unwrap_evaluate = None
        if self._ema._engine is not None:
            # Kept (not dropped) so that the next `fit` reuses its compiled
            # train function.
            self._ema._engine.uninstall()

    def _install(self) -> None:
        ema = self._ema
        state = ema._require_state()
        state.check_model_unchanged()
        binding.require_contained(state.model, state.weights, state.fit_model)
        if ema._engine.model is not state.fit_model:
            ema._engine = self.remade_engine(ema._engine)
        # A distribution may be set after the EMA was created.
        state.placement.check(state.model, state.weights)
        if self._fit_schedules != state.schedules:
            # A half-life in epochs or samples, in this fit's steps. The
            # engine's compiled code holds the schedules: it is made again.
            ema._engine.flush()
            state.use_schedules(self._fit_schedules)
            ema._engine = backends.BACKEND_OPS.make_engine(state)
        ema._engine.install()

    def remade_engine(self, engine):
        """A new engine for the EMA's state, after `engine` (flushed and
        out of the training): for another model's `fit`, or shadows laid out
        for an averaged model. Put into the training if one runs."""
        installed = engine.installed()
        engine.uninstall()
        new = backends.BACKEND_OPS.make_engine(self._ema._state)
        if installed:
            new.install()
        return new

    def _evaluate_online_and_ema(self, keras_evaluate, *args, **kwargs):
        if _internals.is_fit_validation(kwargs):
            self._ema._engine.refresh_readers()
        return val_ema.evaluate_online_and_ema(self._ema, keras_evaluate, args, kwargs)
