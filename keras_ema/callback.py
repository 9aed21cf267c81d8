"""The `EMA` callback."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping

import keras
from keras import ops

from keras_ema import _internals
from keras_ema import advice
from keras_ema import backends
from keras_ema import binding
from keras_ema import profiles as profiles_
from keras_ema import val_ema
from keras_ema.ema_weights import EMAWeights
from keras_ema.saving import sidecars
from keras_ema.saving.store import StateStore
from keras_ema.schedule import Schedule
from keras_ema.state import Filters
from keras_ema.state import ShadowState
from keras_ema.state import check_names
from keras_ema.state import check_offload
from keras_ema.state import tracked_weights
from keras_ema.swaps import Swaps
from keras_ema.training import Training


class EMA(EMAWeights, keras.callbacks.Callback):
    """Keeps an exponential moving average (EMA) of a model's weights.

    The average uses the inverse-gamma warm-up of ema-pytorch: for the first
    `update_after_step` steps the EMA copies the online weights; afterwards
    each update moves it towards them with the decay
    `1 - (1 + e / inv_gamma) ** -power`, clamped to `[min_value, beta]`, where
    `e` counts the steps since the warm-up. With `inv_gamma=1, power=1` it is
    a plain running average; `power=2/3` reaches 0.999 after about 31.6k
    steps and 0.9999 after about 1M, `power=3/4` after about 10k and 215k.

    Another schedule can be given instead (`schedule=`): the bias-corrected
    EMA of the article "EMA in deep learning: principles, implementation and
    experiments" (`BiasCorrectedSchedule`), the power-function EMA of
    Karras et al. (`PowerFunctionSchedule`), a half-life in steps, epochs or
    samples (`HalfLifeSchedule`), a constant decay for target networks
    (`ConstantSchedule`), the BYOL/DINO teacher momentum (`CosineSchedule`).
    `averaged_model()` gives a Keras model computing with the EMA weights,
    for teachers and target networks that training calls. With
    `profiles={"fast": ..., "slow": ...}` the callback keeps several averages
    of the same weights, all updated in one fused update that reads each
    weight once; each is logged and validated under its name.

    Every floating-point weight of the model is averaged, trainable or not
    (BatchNormalization statistics included), in a float32 shadow (float64
    for float64 weights). During `fit` the update runs inside the compiled
    train step, once per optimizer step (so under gradient accumulation it
    counts real weight updates). An update is skipped, and counted in the
    `ema_skipped` log, if any online weight is NaN or infinite.

    In `fit` the callback logs `ema_decay` and `ema_skipped`, and with
    validation data a `val_ema_<metric>` beside every `val_<metric>`,
    computed on the same validation data with the EMA weights. With
    `profiles`, the keys are `ema_<profile>_decay` and
    `val_ema_<profile>_<metric>`. These keys reach every other callback.
    Monitor them with an explicit `mode="min"` or `mode="max"`:
    `EarlyStopping` cannot infer the direction from the name.

    Passed to `evaluate` or `predict`, the callback runs them with the EMA
    weights (the first profile's, with `profiles`). The model always gets
    its online weights back, bit for bit, after `fit`, `evaluate`,
    `predict` or `swap_weights()`, also after an exception.

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
        schedule: A schedule object (`keras_ema.WarmupSchedule`,
            `BiasCorrectedSchedule`, `PowerFunctionSchedule`,
            `HalfLifeSchedule`, `ConstantSchedule`, `CosineSchedule`) in
            place of the warm-up arguments above, which must then keep their
            defaults. Defaults to `None` (the
            warm-up schedule of those arguments).
        profiles: A dict of names (Python identifiers) to schedule objects:
            several averages of the same weights, named in logs, in
            `get_weights(profile=...)` and `swap_weights(profile=...)`.
            Excludes `schedule` and the warm-up arguments. Defaults to
            `None` (one unnamed average).

    References:
        - Karras et al., 2024, "Analyzing and Improving the Training Dynamics
          of Diffusion Models" (post-hoc EMA and the decay schedule's role).
        - lucidrains/ema-pytorch, `EMA` (the warm-up schedule and filters).
    """

    # Whether only the trainable weights are averaged (no shadows for
    # non-trainable ones); subclasses that treat those otherwise set it.
    _trainable_only = False
    # The `get_config()` entries a loaded state file may differ in without a
    # warning; subclasses add their own.
    _UNCOMPARED_OPTIONS: tuple = ("offload_to_host", "validate")

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
        schedule: Schedule | None = None,
        profiles: Mapping[str, Schedule] | None = None,
    ) -> None:
        super().__init__()
        warmup = dict(
            beta=beta,
            update_after_step=update_after_step,
            update_every=update_every,
            inv_gamma=inv_gamma,
            power=power,
            min_value=min_value,
        )
        self._profiles = profiles_.from_arguments(warmup, schedule, profiles)
        self.param_or_buffer_names_no_ema = check_names(
            "param_or_buffer_names_no_ema", param_or_buffer_names_no_ema
        )
        self.ignore_names = check_names("ignore_names", ignore_names)
        self.ignore_startswith_names = check_names(
            "ignore_startswith_names", ignore_startswith_names
        )
        self.offload_to_host = check_offload(offload_to_host)
        self.validate = val_ema.check_validate(validate)
        self._state = None
        self._engine = None
        self._tracked = None
        self._swaps = Swaps()
        self._training = Training(self)
        self._swapped_profile = 0
        self._warned_skipped = 0
        self.state_store = StateStore(self, self._UNCOMPARED_OPTIONS)

    # ------------------------------------------------------------------
    # Public surface

    @property
    def step(self) -> int:
        """The update counter of ema-pytorch's `EMA` class."""
        state = self._flushed_state()
        return int(ops.convert_to_numpy(state.step))

    @property
    def skipped_updates(self) -> int:
        """How many updates were skipped because a weight was NaN or Inf."""
        state = self._flushed_state()
        return int(ops.convert_to_numpy(state.skipped))

    @property
    def tracked_model(self) -> keras.Model | None:
        """The model whose weights are averaged: the first one given to
        `set_model` (by `ema.set_model(model)` or by `fit`), also when a
        later `fit` trains a model that contains it."""
        return self._tracked

    @property
    def variables(self) -> list:
        """The shadow `keras.Variable`s, one per tracked weight, in
        `model.weights` order."""
        return list(self._flushed_state().shadows)

    @property
    def tracked_paths(self) -> list[str]:
        """The paths of the averaged weights, aligned with `variables`."""
        return list(self._require_state().paths)

    @property
    def profile_names(self) -> list[str]:
        """The names of the averages, in the order given (`[""]` without
        `profiles`)."""
        return [name for name, _ in self._profiles]

    def get_current_decay(self, profile: str | None = None) -> float:
        """The decay of a profile's schedule now (for the warm-up schedule,
        what ema-pytorch's `EMA.get_current_decay()` returns).

        Args:
            profile: A name from `profiles`; `None` for the first profile.
                Defaults to `None`.
        """
        index = self._profile_index(profile)
        step = self.step
        return self._state.schedules[index].decay(step)

    def update(self) -> None:
        """One step of ema-pytorch's `EMA.update()`, for use outside `fit`."""
        state = self._require_state()
        self._require_online_weights("update()")
        state.check_model_unchanged()
        self._engine.update()

    def save_state(self, path: str) -> None:
        """Writes the counters, hyperparameters and shadows to `path`.

        The file is a NumPy `.npz` archive with a JSON header (no pickle),
        written atomically: a crash mid-save leaves any previous file intact.
        If `path`'s folder does not exist, a `FileNotFoundError` (also a
        `ValueError`) names `path`. Across JAX processes, a shadow sharded
        over devices of several processes is not gathered to one: a
        `ValueError` names `keras.callbacks.OrbaxCheckpoint`, which saves the
        EMA with each process writing its own shards.
        """
        self.state_store.write(path)

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
        also a `ValueError`. Across JAX processes, each process reads the
        whole file and keeps the shards it holds.
        """
        self.state_store.apply(*self.state_store.read(path))

    def get_config(self) -> dict:
        return {
            **profiles_.to_config(self._profiles),
            "param_or_buffer_names_no_ema": list(self.param_or_buffer_names_no_ema),
            "ignore_names": list(self.ignore_names),
            "ignore_startswith_names": list(self.ignore_startswith_names),
            "offload_to_host": self.offload_to_host,
            "validate": self.validate,
        }

    @classmethod
    def from_config(cls, config: dict) -> EMA:
        return cls(**profiles_.from_config(config))

    # ------------------------------------------------------------------
    # Keras hooks

    def set_model(self, model) -> None:
        """Binds the EMA to `model` (the first call), or gives it the model
        a `fit`, `evaluate` or `predict` runs: the tracked model or one that
        contains it. Called by Keras; call it yourself before `fit` to
        average a part of the model that `fit` trains.

        Args:
            model: A Keras model.
        """
        tracked = self._tracked
        if tracked is not None and tracked is not model:
            binding.require_contained(tracked, self._tracked_weights(), model)
        # Inside `swap_weights()` an `evaluate(callbacks=[ema])` sets the
        # model again: the swapped-in EMA weights must stay.
        if not self._swaps.in_block and self._state is not None:
            self._swaps.repair(self._state.model)
        self._training.finish()
        super().set_model(model)
        if tracked is None:
            self._tracked = model
        sidecars.attach(model, self)
        if self._state is not None:
            self._state.fit_model = model
        elif self._tracked.built:
            self._create_state()

    def on_train_begin(self, logs=None) -> None:
        self._require_online_weights("fit")
        fit = _internals.fit_context(self.model)
        advice.refuse_another_ema(self, fit, EMA)
        sidecars.ride_along_orbax(self.model, fit.callbacks)
        self._training.start(self.model, fit)
        advice.warn_about_setup(self, self.model, fit)

    def on_epoch_begin(self, epoch, logs=None) -> None:
        if self._training.in_fit and self._state is not None:
            self._engine.start_epoch()

    def on_epoch_end(self, epoch, logs=None) -> None:
        if logs is not None and self._state is not None:
            self._engine.end_epoch(logs)
        skipped = int((logs or {}).get("ema_skipped", 0))
        advice.warn_if_first_skipped(skipped, self._warned_skipped)
        self._warned_skipped = max(self._warned_skipped, skipped)

    def on_train_end(self, logs=None) -> None:
        self._training.finish()
        if self._state is not None:
            advice.warn_if_never_averaged(self.step, self._state.schedules)

    def on_test_begin(self, logs=None) -> None:
        if not self._training.in_fit:
            self._swaps.hook_begin(lambda: self._swap_in(0))

    def on_test_end(self, logs=None) -> None:
        self._swaps.hook_end(self._tracked)

    def on_predict_begin(self, logs=None) -> None:
        self._swaps.hook_begin(lambda: self._swap_in(0))

    def on_predict_end(self, logs=None) -> None:
        self._swaps.hook_end(self._tracked)

    # ------------------------------------------------------------------
    # Internals

    def _create_state(self) -> None:
        self._state = ShadowState(
            self._tracked,
            self._profiles,
            Filters(
                self.param_or_buffer_names_no_ema,
                self.ignore_names,
                self.ignore_startswith_names,
            ),
            self.offload_to_host,
            backends.BACKEND_OPS.make_placement(self.offload_to_host),
            trainable_only=self._trainable_only,
        )
        self._state.fit_model = self.model
        self._engine = backends.BACKEND_OPS.make_engine(self._state)

    def _tracked_weights(self) -> list:
        if self._state is not None:
            return self._state.weights
        return tracked_weights(self._tracked, self._trainable_only)

    def _require_state(self) -> ShadowState:
        if self._state is None:
            if self._tracked is None:
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

    def _profile_index(self, profile: str | None) -> int:
        return profiles_.profile_index(self.profile_names, profile)

    def _require_online_weights(self, action: str) -> None:
        if self._swaps.in_block:
            raise ValueError(
                f"`{action}` needs the online weights in the model, but it was "
                "called inside `ema.swap_weights()`, which holds the EMA "
                "weights there. Call it after the block."
            )
        if self._state is not None:
            self._swaps.repair(self._state.model)
