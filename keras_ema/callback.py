"""The `EMA` callback."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from collections.abc import Iterator

import keras
from keras import ops

from keras_ema import _internals
from keras_ema import advice
from keras_ema import backends
from keras_ema import backup
from keras_ema import state_io
from keras_ema.schedule import WarmupSchedule
from keras_ema.state import Filters
from keras_ema.state import ShadowState
from keras_ema.state import check_names
from keras_ema.swaps import Swaps

# Options that change no shadow value: a state file saved with others loads
# without a warning.
_PLACEMENT_OPTIONS = ("offload_to_host", "validate")
_VALIDATE_OPTIONS = ("both", "ema")


class EMA(keras.callbacks.Callback):
    """Keeps an exponential moving average (EMA) of a model's weights.

    The average uses the inverse-gamma warm-up of ema-pytorch: for the first
    `update_after_step` steps the EMA copies the online weights; afterwards
    each update moves it towards them with the decay
    `1 - (1 + e / inv_gamma) ** -power`, clamped to `[min_value, beta]`, where
    `e` counts the steps since the warm-up. With `inv_gamma=1, power=1` it is
    a plain running average; `power=2/3` reaches 0.999 after about 31.6k
    steps and 0.9999 after about 1M, `power=3/4` after about 10k and 215k.

    Every floating-point weight of the model is averaged, trainable or not
    (BatchNormalization statistics included), in a float32 shadow (float64
    for float64 weights). During `fit` the update runs inside the compiled
    train step, once per optimizer step (so under gradient accumulation it
    counts real weight updates). An update is skipped, and counted in the
    `ema_skipped` log, if any online weight is NaN or infinite.

    In `fit` the callback logs `ema_decay` and `ema_skipped`, and with
    validation data a `val_ema_<name>` beside every `val_<name>`, computed on
    the same validation data with the EMA weights. These keys reach every
    other callback. Monitor them with an explicit `mode="min"` or
    `mode="max"`: `EarlyStopping` cannot infer the direction from the name.

    Passed to `evaluate` or `predict`, the callback runs them with the EMA
    weights. The model always gets its online weights back, bit for bit,
    after `fit`, `evaluate`, `predict` or `swap_weights()`, also after an
    exception.

    Example:

    >>> ema = keras_ema.EMA(beta=0.999, update_after_step=100, update_every=1)
    >>> early_stopping = keras.callbacks.EarlyStopping(
    ...     monitor="val_ema_loss", mode="min", patience=20
    ... )
    >>> model.fit(x, y, validation_data=(x_val, y_val), epochs=100,
    ...           callbacks=[ema, early_stopping])
    >>> model.evaluate(x_val, y_val, callbacks=[ema])  # EMA weights
    >>> with ema.swap_weights():
    ...     model.save("ema_model.keras")

    Args:
        beta: The largest decay, in `[0, 1]`. Defaults to `0.9999`.
        update_after_step: Number of steps during which the EMA only copies
            the online weights. Defaults to `100`.
        update_every: Update on every `update_every`-th optimizer step.
            Defaults to `10`.
        inv_gamma: Inverse multiplicative factor of the warm-up, `> 0`.
            Defaults to `1.0`.
        power: Exponent of the warm-up, `> 0`. Defaults to `2/3`.
        min_value: The smallest decay, in `[0, beta]`. Defaults to `0.0`.
        param_or_buffer_names_no_ema: Weight paths (as `variable.path`, e.g.
            `"sequential/dense/kernel"`) copied at every update instead of
            averaged. Defaults to `()`.
        ignore_names: Weight paths left alone once the warm-up is over.
            Defaults to `()`.
        ignore_startswith_names: Weight path prefixes left alone once the
            warm-up is over. Defaults to `()`.
        offload_to_host: Whether to keep the shadows in host memory, for
            models whose EMA does not fit beside the weights on the
            accelerator. Only due steps (every `update_every`-th) copy the
            weights to the host, where the update runs; on JAX and torch the
            copy does not hold up the train step. Swaps and state files work
            the same. Defaults to `False`.
        validate: Which weights `fit`'s validation evaluates: `"both"`
            logs `val_<name>` (online weights) and `val_ema_<name>` (EMA
            weights); `"ema"` evaluates only the EMA weights and logs only
            `val_ema_<name>`, for validation too costly to run twice.
            Defaults to `"both"`.

    References:
        - Karras et al., 2024, "Analyzing and Improving the Training Dynamics
          of Diffusion Models" (post-hoc EMA and the decay schedule's role).
        - lucidrains/ema-pytorch, `EMA` (the warm-up schedule and filters).
    """

    def __init__(
        self,
        beta: float = 0.9999,
        update_after_step: int = 100,
        update_every: int = 10,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_value: float = 0.0,
        param_or_buffer_names_no_ema: Iterable[str] = (),
        ignore_names: Iterable[str] = (),
        ignore_startswith_names: Iterable[str] = (),
        offload_to_host: bool = False,
        validate: str = "both",
    ) -> None:
        super().__init__()
        self.schedule = WarmupSchedule(
            beta=beta,
            update_after_step=update_after_step,
            update_every=update_every,
            inv_gamma=inv_gamma,
            power=power,
            min_value=min_value,
        )
        self.param_or_buffer_names_no_ema = check_names(
            "param_or_buffer_names_no_ema", param_or_buffer_names_no_ema
        )
        self.ignore_names = check_names("ignore_names", ignore_names)
        self.ignore_startswith_names = check_names(
            "ignore_startswith_names", ignore_startswith_names
        )
        if not isinstance(offload_to_host, bool):
            raise ValueError(
                "`offload_to_host` must be a boolean. "
                f"Received: offload_to_host={offload_to_host!r}"
            )
        self.offload_to_host = offload_to_host
        if validate not in _VALIDATE_OPTIONS:
            raise ValueError(
                f"`validate` must be one of {_VALIDATE_OPTIONS}. "
                f"Received: validate={validate!r}"
            )
        self.validate = validate
        self._state = None
        self._engine = None
        self._swaps = Swaps()
        self._undo_deferral = None
        self._in_fit = False
        self._unwrap_evaluate = None
        self._warned_skipped = 0

    # ------------------------------------------------------------------
    # Public surface

    @property
    def step(self) -> int:
        """The update counter of the article's `EMA` class."""
        state = self._flushed_state()
        return int(ops.convert_to_numpy(state.step))

    @property
    def skipped_updates(self) -> int:
        """How many updates were skipped because a weight was NaN or Inf."""
        state = self._flushed_state()
        return int(ops.convert_to_numpy(state.skipped))

    @property
    def variables(self) -> list:
        """The shadow `keras.Variable`s, one per tracked weight, in
        `model.weights` order."""
        return list(self._flushed_state().shadows)

    @property
    def tracked_paths(self) -> list[str]:
        """The paths of the averaged weights, aligned with `variables`."""
        return list(self._require_state().paths)

    def get_current_decay(self) -> float:
        """The decay that the article's `get_current_decay()` returns now."""
        return self.schedule.decay(self.step)

    def update(self) -> None:
        """One step of the article's `update()`, for use outside `fit`."""
        state = self._require_state()
        self._require_online_weights("update()")
        state.check_model_unchanged()
        self._engine.update()

    def get_weights(self) -> list:
        """NumPy arrays aligned with `model.get_weights()`.

        The EMA value (cast to the weight's dtype) where a weight is tracked,
        the model's own value elsewhere, so that
        `other_model.set_weights(ema.get_weights())` works.
        """
        state = self._flushed_state()
        shadows = {id(w): s for w, s in zip(state.weights, state.shadows, strict=True)}
        result = []
        for weight in self.model.weights:
            shadow = shadows.get(id(weight))
            value = weight.value if shadow is None else shadow.value
            result.append(
                ops.convert_to_numpy(value).astype(
                    keras.backend.standardize_dtype(weight.dtype)
                )
            )
        return result

    @contextlib.contextmanager
    def swap_weights(self) -> Iterator[keras.Model]:
        """A context with the EMA weights in the model.

        On exit, also through an exception, the model gets its online weights
        back, bit for bit. Blocks nest: an inner block changes nothing, and
        the model keeps the EMA weights until the outermost block exits.
        Inside a block, what needs the online weights (`fit`, `update()`,
        `copy_to_model()`) raises a `ValueError`.
        """
        with self._swaps.block(self.model, self._swap_in):
            yield self.model

    def copy_to_model(self) -> None:
        """Writes the EMA weights into the model for good (e.g. before
        `model.save`). The online weights are overwritten."""
        self._require_online_weights("copy_to_model()")
        state = self._flushed_state()
        for weight, shadow in zip(state.weights, state.shadows, strict=True):
            weight.assign(backends.copy_for_weight(shadow.value, weight))

    def save_state(self, path: str) -> None:
        """Writes the counters, hyperparameters and shadows to `path`.

        The file is a NumPy `.npz` archive with a JSON header (no pickle),
        written atomically: a crash mid-save leaves any previous file intact.
        If `path`'s folder does not exist, a `FileNotFoundError` (also a
        `ValueError`) names `path`.
        """
        self._write_state(path)

    def load_state(self, path: str) -> None:
        """Restores what `save_state` wrote, after checking all of it.

        The file must describe the same floating-point weights, in the same
        order, with the same shapes and dtypes; otherwise a `ValueError`
        names the variable and nothing changes. As with Keras' `.weights.h5`
        files, a model built again from the same code fits: the paths may
        differ in Keras' automatic numbering (`dense_4` vs `dense_6`) and by
        a leading model name (as they do across `keras.models.load_model`).
        The callback keeps its own hyperparameters: where the file's differ,
        a warning names them. A file that does not exist raises a
        `FileNotFoundError`, as Keras' `model.load_weights` does, which is
        also a `ValueError`.
        """
        self._apply_state(*self._read_state(path))

    def get_config(self) -> dict:
        return {
            **self.schedule.get_config(),
            "param_or_buffer_names_no_ema": list(self.param_or_buffer_names_no_ema),
            "ignore_names": list(self.ignore_names),
            "ignore_startswith_names": list(self.ignore_startswith_names),
            "offload_to_host": self.offload_to_host,
            "validate": self.validate,
        }

    @classmethod
    def from_config(cls, config: dict) -> EMA:
        return cls(**config)

    # ------------------------------------------------------------------
    # State files (also through `model.save_weights`/`load_weights`)

    def _write_state(self, path) -> None:
        # The model may hold the EMA weights: a checkpoint may be written
        # inside `swap_weights()` (EMAModelCheckpoint), which must stay swapped.
        state_io.save(path, self._flushed_state(), self.get_config())

    def _read_state(self, path) -> tuple:
        """Reads and checks a state file against the model; changes nothing."""
        state = self._require_state()
        header, arrays = state_io.read(path)
        arrays = state_io.match(header, arrays, state, path)
        return header, arrays, path

    def _apply_state(self, header: dict, arrays: list, path) -> None:
        state = self._require_state()
        self._warn_if_hyperparameters_differ(header["hyperparameters"], path)
        self._swaps.repair(self.model)
        for shadow, array in zip(state.shadows, arrays, strict=True):
            shadow.assign(array)
        state.step.assign(header["step"])
        state.skipped.assign(header["skipped"])
        self._engine.reload()

    def _follow_loaded_weights(self) -> None:
        """After `model.load_weights` without an EMA file: an EMA that has not
        updated yet is a copy of the weights, so it takes the loaded ones."""
        if self._state is None or self.step != 0:
            return
        self._swaps.repair(self.model)
        state = self._state
        for profile in state.profiles:
            for shadow, weight in zip(profile.shadows, state.weights, strict=True):
                shadow.assign(backends.fresh_copy(weight.value, shadow.dtype))
        self._engine.reload()

    def _warn_if_hyperparameters_differ(self, saved: dict, path: str) -> None:
        differing = {
            name: {"file": saved.get(name), "callback": value}
            for name, value in self.get_config().items()
            if saved.get(name) != value and name not in _PLACEMENT_OPTIONS
        }
        if differing:
            warnings.warn(
                f"The EMA state in {path!r} was saved with other hyperparameters; "
                f"the callback keeps its own. Differences: {differing}",
                stacklevel=3,
            )

    # ------------------------------------------------------------------
    # Keras hooks

    def set_model(self, model) -> None:
        # Inside `swap_weights()` an `evaluate(callbacks=[ema])` sets the
        # model again: the swapped-in EMA weights must stay.
        if not self._swaps.in_block and self._state is not None:
            self._swaps.repair(self._state.model)
        if self._state is not None and self._state.model is not model:
            raise ValueError(
                "This `EMA` callback already tracks model "
                f"{self._state.model.name!r}; create a new one for model "
                f"{model.name!r}."
            )
        self._finish_training()
        super().set_model(model)
        backup.attach(model, self)
        if self._state is None and model.built:
            self._create_state()

    def on_train_begin(self, logs=None) -> None:
        self._require_online_weights("fit")
        if self._state is None and not self.model.built:
            # TensorFlow builds a model that was never called in its first
            # train step, after `on_train_begin`.
            self._undo_deferral = backends.start_when_built(
                self.model, self._start_training
            )
        else:
            self._start_training()
        self._unwrap_evaluate = _internals.wrap_evaluate(
            self.model, self._evaluate_online_and_ema
        )
        self._in_fit = True
        advice.warn_about_setup(self, self.model)

    def on_epoch_begin(self, epoch, logs=None) -> None:
        if self._in_fit and self._state is not None:
            self._engine.start_epoch()

    def on_epoch_end(self, epoch, logs=None) -> None:
        if logs is not None and "ema_skipped" in logs and self._state.offload:
            # Host shadows are blended one due step late: the last batch's
            # log does not count that step yet.
            logs["ema_skipped"] = self.skipped_updates
        skipped = int((logs or {}).get("ema_skipped", 0))
        if skipped > self._warned_skipped == 0:
            warnings.warn(
                "keras_ema.EMA skipped an update because a model weight was "
                "NaN or infinite; the shadows were left unchanged. Skipped "
                "updates are counted in the `ema_skipped` log.",
                stacklevel=2,
            )
        self._warned_skipped = max(self._warned_skipped, skipped)

    def on_train_end(self, logs=None) -> None:
        self._finish_training()
        if self._state is not None:
            advice.warn_if_never_averaged(self.step, self._state.schedules)

    def on_test_begin(self, logs=None) -> None:
        if not self._in_fit:
            self._swaps.hook_begin(self._swap_in)

    def on_test_end(self, logs=None) -> None:
        self._swaps.hook_end(self.model)

    def on_predict_begin(self, logs=None) -> None:
        self._swaps.hook_begin(self._swap_in)

    def on_predict_end(self, logs=None) -> None:
        self._swaps.hook_end(self.model)

    # ------------------------------------------------------------------
    # Internals

    def _create_state(self) -> None:
        self._state = ShadowState(
            self.model,
            [("", self.schedule)],
            Filters(
                self.param_or_buffer_names_no_ema,
                self.ignore_names,
                self.ignore_startswith_names,
            ),
            self.offload_to_host,
            backends.make_placement(self.offload_to_host),
        )
        self._engine = backends.make_engine(self._state)

    def _require_state(self) -> ShadowState:
        if self._state is None:
            if getattr(self, "_model", None) is None:
                raise ValueError(
                    "This `EMA` callback has no model yet. Pass it to "
                    "`model.fit(..., callbacks=[ema])` or call "
                    "`ema.set_model(model)` first."
                )
            self._create_state()
        return self._state

    def _flushed_state(self) -> ShadowState:
        """The state, its variables made current."""
        state = self._require_state()
        self._engine.flush()
        return state

    def _start_training(self) -> None:
        state = self._require_state()
        state.check_model_unchanged()
        # A distribution may be set after the EMA was created.
        state.placement.check(state.model, state.weights)
        self._engine.install()

    def _finish_training(self) -> None:
        """Takes the EMA out of the model's training (idempotent)."""
        self._in_fit = False
        if self._undo_deferral is not None:
            self._undo_deferral()
            self._undo_deferral = None
        if self._unwrap_evaluate is not None:
            self._unwrap_evaluate()
            self._unwrap_evaluate = None
        if self._engine is not None:
            # Kept (not dropped) so that the next `fit` reuses its compiled
            # train function.
            self._engine.uninstall()

    def _evaluate_online_and_ema(self, keras_evaluate, *args, **kwargs):
        """`fit`'s validation: online metrics, then the same with EMA weights
        (or, with `validate="ema"`, only the EMA's)."""
        if not _internals.is_fit_validation(kwargs):
            return keras_evaluate(*args, **kwargs)
        if self.validate == "ema":
            with self.swap_weights():
                return _prefixed_ema(keras_evaluate(*args, **kwargs))
        logs = keras_evaluate(*args, **kwargs)
        ema_kwargs = dict(kwargs, callbacks=None, verbose=0)
        with self.swap_weights():
            ema_logs = keras_evaluate(*args, **ema_kwargs)
        if isinstance(logs, dict):
            logs = {**logs, **_prefixed_ema(ema_logs)}
        return logs

    def _swap_in(self) -> None:
        state = self._require_state()
        self._swaps.repair(self.model)
        state.check_model_unchanged()
        self._engine.flush()
        self._swaps.swap_in(
            self.model, state.weights, [shadow.value for shadow in state.shadows]
        )

    def _require_online_weights(self, action: str) -> None:
        if self._swaps.in_block:
            raise ValueError(
                f"`{action}` needs the online weights in the model, but it was "
                "called inside `ema.swap_weights()`, which holds the EMA "
                "weights there. Call it after the block."
            )
        if self._state is not None:
            self._swaps.repair(self.model)


def _prefixed_ema(logs):
    """`evaluate` logs renamed `ema_<name>`; `fit` adds the `val_`."""
    if not isinstance(logs, dict):
        return logs
    return {f"ema_{name}": value for name, value in logs.items()}
