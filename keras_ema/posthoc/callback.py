"""`PostHocEMA`: the training side of post-hoc EMA (Karras et al. 2024).

The callback is an `EMA` whose profiles are power-function EMAs, one per
tracked `sigma_rel`, over the trainable weights only. Every `snapshot_every`
optimizer steps it copies every profile's shadows and the model's other
weights (its buffers) to the host and hands them to one background thread,
which writes them with `write_snapshot`; `PostHocRun` reads the folder
afterwards.

Taking and writing the snapshots is in `keras_ema.posthoc.snapshots`; the
step counter on the host is `keras_ema.steps.RunSteps`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

from keras_ema.callback import EMA
from keras_ema.posthoc.format import disk_usage
from keras_ema.posthoc.format import model_fingerprint
from keras_ema.posthoc.setup_checks import check_arguments
from keras_ema.posthoc.setup_checks import check_counted_by_model_optimizer
from keras_ema.posthoc.setup_checks import check_distinct_paths
from keras_ema.posthoc.setup_checks import check_start_step
from keras_ema.posthoc.setup_checks import check_steps_per_execution
from keras_ema.posthoc.snapshots import Snapshots
from keras_ema.saving import npz_state
from keras_ema.saving.store import StateStore
from keras_ema.schedule import PowerFunctionSchedule
from keras_ema.steps import RunSteps

# The key of the run id in the state file's `extra` header object.
_RUN_ID_KEY = "posthoc_run_id"


def profile_name(sigma_rel: float) -> str:
    """The profile (and log) name of a tracked `sigma_rel`: `sigma_0_05` for
    0.05, `sigma_0_1` for 0.10 (its shortest decimal, `.` as `_`)."""
    decimal = np.format_float_positional(float(sigma_rel), unique=True, trim="-")
    return "sigma_" + decimal.replace(".", "_")


class _RunStateStore(StateStore):
    """The state of a `PostHocEMA`: its run id rides in the header, and a
    state is written only after the snapshots up to its step."""

    def extra(self) -> dict:
        return {_RUN_ID_KEY: self._ema.run_id}

    def write(self, path) -> None:
        self._ema._snapshot_before_checkpoint()
        super().write(path)

    def apply(self, header: dict, arrays: list, path) -> None:
        super().apply(header, arrays, path)
        self._ema._take_restored_run_id(header)


class PostHocEMA(EMA):
    """Tracks power-function EMAs during training and saves snapshots of them,
    from which `keras_ema.PostHocRun` synthesizes an EMA of any length.

    Post-hoc EMA (Karras et al. 2024, EDM2) chooses the EMA length after
    training: a few power-function EMAs of relative widths `sigma_rels`
    (EDM2 tracks 0.05 and 0.10) are saved together every `snapshot_every`
    optimizer steps, one `snapshot-<step>.npz` file per step in `directory`;
    afterwards `keras_ema.PostHocRun(directory).synthesize(sigma_rel)` mixes
    them into the EMA of any other `sigma_rel`, at any snapshot step. The
    more snapshots, evenly spaced over training, the more accurate the
    synthesis: aim for 32 or more.

    It is an `EMA` whose profiles are
    `keras_ema.PowerFunctionSchedule(sigma_rel=s, update_every=update_every)`,
    one per `s` in `sigma_rels`, named `sigma_0_05`, `sigma_0_1`, ... (the
    shortest decimal of `s`, `.` written `_`): in `fit` it logs
    `ema_sigma_0_05_decay` and, with validation data,
    `val_ema_sigma_0_05_<metric>` for each; `get_weights(profile)`,
    `swap_weights(profile)`, `update()` and `step` work as for `EMA`. Only
    the trainable floating-point weights are averaged. The other weights
    (BatchNormalization statistics, seeds) are buffers: each snapshot stores
    the model's own value, which synthesis returns as it was at the step
    synthesized, never mixed.

    A snapshot follows every optimizer step `t` (counted from 1, as `step`
    counts them) with `t % snapshot_every == 0`, and the end of every `fit`
    whose last step is not one; that last snapshot is dated by the step of
    the last update (its buffers are those at the end of the `fit`). Outside
    `fit`, `update()` snapshots on the same steps and `snapshot()` writes one
    at any time. Only the copy of the values to the host holds up training:
    the file is written by a background thread, atomically. `wait()` waits
    for it and raises any error it met; the end of `fit` waits too.

    With `max_snapshots`, the folder keeps at most `max_snapshots` files
    (once each write is done; the new file is written before old ones are
    deleted): whenever the regular snapshots would exceed
    `max_snapshots - 1` (one file is left for the snapshot at the end of a
    `fit`, which is kept until the next snapshot), every other one is
    deleted and the spacing doubles from then on, so the snapshots stay
    evenly spaced over all of training. The spacing is a function of the
    step, so a resumed run deletes the same files.

    A run resumes through `keras.callbacks.BackupAndRestore` (or
    `model.load_weights` with the EMA file beside the weights file, or
    `load_state`): the restored state holds the profiles, the step counter
    and the run id, and the snapshots after the restored step are deleted
    before the first step, so that the resumed run writes what an
    uninterrupted one would. A `directory` that holds the snapshots of
    another run (another run id, model or `sigma_rels`) is refused with a
    `ValueError` before the first step of `fit` (or the first `update()`).

    Which steps get a snapshot is counted on the host, with no device read
    per step, except with a `LossScaleOptimizer`: only the device knows which
    of its steps were skipped (not counted), so its counter is read back at
    every step, a sync per step.

    Creating the callback's shadows (once the model is built) prints the
    disk space that snapshots take (with `verbose=1`). Under a JAX
    `keras.distribution` a snapshot copies one variable at a time to the
    host. With `steps_per_execution > 1` (TensorFlow and JAX), it must
    divide `snapshot_every` and each epoch's number of steps, the optimizer
    must move the weights at every step, and every `fit` must start at a
    step counter that is a multiple of it; otherwise `fit` raises a
    `ValueError` before the first step.

    Example:

    >>> posthoc = keras_ema.PostHocEMA(
    ...     "my_run", sigma_rels=(0.05, 0.10), snapshot_every=4
    ... )
    >>> backup = keras.callbacks.BackupAndRestore("backup")
    >>> model.fit(x, y, epochs=5, callbacks=[posthoc, backup], verbose=0)
    >>> run = keras_ema.PostHocRun("my_run")
    >>> run.steps
    [4, 8, 10]
    >>> run.synthesize_into(model, sigma_rel=0.07)

    Args:
        directory: The folder of the snapshot files, created if needed.
            It must be new, empty, or hold the snapshots of this run.
        sigma_rels: The tracked relative widths, distinct, each in
            `(0, 12**-0.5)`. Defaults to `(0.05, 0.10)`.
        snapshot_every: The number of optimizer steps between snapshots, a
            multiple of `update_every` (so that every snapshot follows an
            update). Required, keyword-only: the right spacing depends on
            the length of training.
        update_every: Update the EMAs after every `update_every`-th optimizer
            step. Defaults to `1`.
        snapshot_dtype: How snapshots store the averages: `"float32"`,
            `"float16"` or `"bfloat16"` (half the space, with a relative
            error of up to `2**-11` or `2**-8` per value). The shadows
            themselves stay float32. Defaults to `"float32"`.
        max_snapshots: The most snapshot files to keep, at least 3, or
            `None` to keep every one. Defaults to `None`.
        offload_to_host: Whether to keep the shadows in host memory, as for
            `EMA`. Defaults to `False`.
        validate: As for `EMA`: `"both"` validates the online weights and
            every tracked profile in `fit`, `"ema"` the profiles only.
            Defaults to `"both"`.
        verbose: `1` prints the disk space the snapshots take when the
            callback starts tracking a model; `0` is silent. Defaults to
            `1`.

    References:
        - Karras et al., 2024, "Analyzing and Improving the Training Dynamics
          of Diffusion Models", section 3 and appendix C.
    """

    _trainable_only = True
    # Arguments that change no shadow value: a state file saved with other
    # ones loads without a warning.
    _UNCOMPARED_OPTIONS = (
        "offload_to_host",
        "validate",
        "directory",
        "snapshot_every",
        "snapshot_dtype",
        "max_snapshots",
        "verbose",
    )

    def __init__(
        self,
        directory: str | os.PathLike,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        *,
        snapshot_every: int,
        update_every: int = 1,
        snapshot_dtype: str = "float32",
        max_snapshots: int | None = None,
        offload_to_host: bool = False,
        validate: str = "both",
        verbose: int = 1,
    ) -> None:
        sigma_rels = check_arguments(
            directory,
            sigma_rels,
            snapshot_every,
            update_every,
            snapshot_dtype,
            max_snapshots,
            verbose,
        )
        super().__init__(
            profiles={
                profile_name(s): PowerFunctionSchedule(
                    sigma_rel=s, update_every=update_every
                )
                for s in sigma_rels
            },
            offload_to_host=offload_to_host,
            validate=validate,
        )
        self.directory = os.fspath(directory)
        self.sigma_rels = sigma_rels
        self.snapshot_every = snapshot_every
        self.update_every = update_every
        self.snapshot_dtype = snapshot_dtype
        self.max_snapshots = max_snapshots
        self.verbose = verbose
        self.run_id = secrets.token_hex(16)
        self._fingerprint = None
        self._snapshots = Snapshots(self)
        # The step counter on the host, once the run is checked.
        self._steps = RunSteps()
        self.state_store = _RunStateStore(self, self._UNCOMPARED_OPTIONS)

    # ------------------------------------------------------------------
    # Public surface

    def update(self) -> None:
        """One update of every profile, for use outside `fit`; writes a
        snapshot if the step is a snapshot step."""
        self._require_state()
        self._require_online_weights("update()")
        snapshots = self._snapshots
        if not self._steps.started or snapshots.last is None:
            step = self.step
            snapshots.start(step)
            self._steps.start(step)
        super().update()
        snapshots.if_due(self._steps.count_update())

    def snapshot(self) -> int | None:
        """Writes a snapshot of the averages now, dated by the step of the
        latest update (as at the end of `fit`), unless one of that step
        exists.

        Returns:
            The step of the snapshot, or `None` if no update happened yet.
        """
        step = self.step
        if self._snapshots.last is None:
            self._snapshots.start(step)
        return self._snapshots.latest_update(step)

    def wait(self) -> None:
        """Waits until every snapshot handed to the background writer is in
        its file (and old ones are deleted), and raises the first error a
        write met."""
        self._snapshots.wait()

    def get_config(self) -> dict:
        return {
            "directory": self.directory,
            "sigma_rels": list(self.sigma_rels),
            "snapshot_every": self.snapshot_every,
            "update_every": self.update_every,
            "snapshot_dtype": self.snapshot_dtype,
            "max_snapshots": self.max_snapshots,
            "offload_to_host": self.offload_to_host,
            "validate": self.validate,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config: dict) -> PostHocEMA:
        return cls(**config)

    # ------------------------------------------------------------------
    # Keras hooks

    def on_train_begin(self, logs=None) -> None:
        # Checked before `EMA` puts its update into the model's training, so
        # that a refusal leaves the model as it was.
        self._check_fit_setup()
        self._snapshots.last = None
        self._steps.stop()
        super().on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None) -> None:
        super().on_epoch_begin(epoch, logs)
        if self._training.in_fit and self._steps.fit is None:
            # After every `on_train_begin`: `BackupAndRestore` has restored
            # the state (and run id) there.
            with self._leaving_fit_on_error():
                self._start_fit_run()

    def on_train_batch_begin(self, batch, logs=None) -> None:
        fit = self._steps.fit
        if fit is None or batch == 0:
            return
        with self._leaving_fit_on_error():
            if fit.reads_device:
                # `self.model` syncs Keras' JAX train state into the model,
                # whose variables are empty during an epoch: only this case
                # and a snapshot touch it here.
                iterations = fit.read(self.model.optimizer)
            else:
                iterations = fit.epoch_iterations + batch  # Batches so far.
            self._snapshots.if_due(self._steps.follow(iterations))

    def on_epoch_end(self, epoch, logs=None) -> None:
        super().on_epoch_end(epoch, logs)
        fit = self._steps.fit
        if fit is not None:
            with self._leaving_fit_on_error():
                fit.epoch_iterations = fit.read(self.model.optimizer)
                self._snapshots.if_due(self._steps.follow(fit.epoch_iterations))

    def on_train_end(self, logs=None) -> None:
        started = self._steps.fit is not None
        self._steps.stop()
        super().on_train_end(logs)
        try:
            if started:
                step = self.step
                self._snapshots.if_due(step)
                self._snapshots.latest_update(step)
        finally:
            self.wait()

    @contextlib.contextmanager
    def _leaving_fit_on_error(self) -> Iterator[None]:
        """A hook that fails during `fit` (a refused folder, a failed
        write) takes the EMA out of the model's training, as the end of
        `fit` would: Keras calls no `on_train_end` after an error."""
        try:
            yield
        except BaseException:
            self._steps.stop()
            self._training.finish()
            raise

    # ------------------------------------------------------------------
    # Internals: state

    def _create_state(self) -> None:
        model = self.model
        check_distinct_paths(model)
        super()._create_state()
        self._fingerprint = model_fingerprint(model.weights)
        if self.verbose:
            print(
                disk_usage(
                    self._state,
                    self.sigma_rels,
                    self.snapshot_dtype,
                    self.snapshot_every,
                    self.max_snapshots,
                    self.directory,
                )
            )

    def _snapshot_before_checkpoint(self) -> None:
        # A checkpoint of step `t` must not be on disk before the snapshots
        # up to `t`: a run resumed from it would never write them again.
        if self._snapshots.last is not None and self._state is not None:
            self._snapshots.if_due(self.step)
        self.wait()

    def _take_restored_run_id(self, header: dict) -> None:
        run_id = npz_state.extra(header).get(_RUN_ID_KEY)
        if isinstance(run_id, str) and run_id:
            self.run_id = run_id
        self._snapshots.last = None
        self._steps.stop()

    # ------------------------------------------------------------------
    # Internals: the run and its folder

    def _check_fit_setup(self) -> None:
        model = self.model
        if self._state is None and not model.built:
            raise ValueError(
                "`PostHocEMA` needs a built model: its snapshots describe the "
                f"model's variables. Model {model.name!r} is not built; call it "
                "on data or `model.build(input_shape)` before `fit`."
            )
        check_counted_by_model_optimizer(model)
        check_steps_per_execution(model, self.snapshot_every, self.params)

    def _start_fit_run(self) -> None:
        step = self.step
        check_start_step(self.model, step)
        self._snapshots.start(step)
        self._steps.start(step, self.model)
