"""The timed modes: how each one builds its model's optimizer and its
callbacks, and the patch of the no-guard mode."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import keras

from benchmarks.overhead.environment import strategy_scope
from benchmarks.overhead.shapes import SEED
from benchmarks.overhead.shapes import Shape
from benchmarks.overhead.teachers import TEACHER_MODES
from benchmarks.overhead.teachers import build_trainer
from benchmarks.overhead.teachers import teacher_callbacks

MODES: tuple[str, ...] = (
    "none",
    "builtin",
    "keras_ema",
    "keras_ema_every10",
    "keras_ema_offload",
    "keras_ema_offload_every10",
    "keras_ema_2profiles",
    "keras_ema_4profiles",
    "keras_ema_noguard",
    "keras_ema_posthoc",
    *TEACHER_MODES,
)
# Each keras_ema mode: (update_every, offload_to_host).
KERAS_EMA_MODES: dict[str, tuple[int, bool]] = {
    "keras_ema": (1, False),
    "keras_ema_every10": (10, False),
    "keras_ema_offload": (1, True),
    "keras_ema_offload_every10": (10, True),
    "keras_ema_noguard": (1, False),
}
# The post-hoc mode: `PostHocEMA` of these sigma_rels, a snapshot every
# POSTHOC_SNAPSHOT_EVERY steps, into a temporary folder removed at exit.
POSTHOC_SIGMA_RELS = (0.05, 0.10)
POSTHOC_SNAPSHOT_EVERY = 10
# Modes whose EMA runs without its NaN/Inf guard (`guard_removed`).
NOGUARD_MODES = ("keras_ema_noguard",)
# Each profiles mode: how many profiles, named p0, p1, ..., of these betas.
PROFILE_MODES: dict[str, int] = {"keras_ema_2profiles": 2, "keras_ema_4profiles": 4}
PROFILE_BETAS = (0.999, 0.9999, 0.99, 0.9995)
# The modes run under `--strategy mirrored` (TensorFlow only).
MIRRORED_MODES: tuple[str, ...] = ("none", "builtin", "keras_ema")
LEARNING_RATE = 1e-3
BUILTIN_MOMENTUM = 0.999


def build_model(shape: Shape, mode: str) -> keras.Model:
    """A freshly built and compiled model (same seed for every mode), under
    the strategy of `use_mirrored_strategy` if there is one.

    The previous measurement's model, optimizer and callbacks are freed
    first, so that no mode runs beside the memory of the ones before it.
    """
    keras.backend.clear_session()
    gc.collect()
    keras.utils.set_random_seed(SEED)
    with strategy_scope():
        model = shape.build()
        if mode in TEACHER_MODES:
            model = build_trainer(model, mode)
        if mode == "builtin":
            optimizer = keras.optimizers.Adam(
                LEARNING_RATE, use_ema=True, ema_momentum=BUILTIN_MOMENTUM
            )
        else:
            optimizer = keras.optimizers.Adam(LEARNING_RATE)
        model.compile(optimizer=optimizer, loss=shape.loss)
    return model


def make_callbacks(mode: str, model: keras.Model) -> list[keras.callbacks.Callback]:
    """The callbacks a mode passes to ``fit`` of `model` (the EMA callback,
    if any)."""
    if mode in TEACHER_MODES:
        return teacher_callbacks(model)
    if mode == "keras_ema_posthoc":
        import keras_ema

        return [
            keras_ema.PostHocEMA(
                _temporary_folder(),
                sigma_rels=POSTHOC_SIGMA_RELS,
                snapshot_every=POSTHOC_SNAPSHOT_EVERY,
                verbose=0,
            )
        ]
    if mode in PROFILE_MODES:
        import keras_ema

        schedules = {
            f"p{i}": keras_ema.WarmupSchedule(
                beta=beta, update_after_step=0, update_every=1
            )
            for i, beta in enumerate(PROFILE_BETAS[: PROFILE_MODES[mode]])
        }
        return [keras_ema.EMA(profiles=schedules)]
    if mode not in KERAS_EMA_MODES:
        return []
    import keras_ema

    update_every, offload = KERAS_EMA_MODES[mode]
    return [
        keras_ema.EMA(
            update_every=update_every, update_after_step=0, offload_to_host=offload
        )
    ]


def _temporary_folder() -> str:
    """A new folder for one callback's snapshots, removed when the process
    exits."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="overhead-posthoc-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return os.path.join(folder, "snapshots")


@contextlib.contextmanager
def guard_removed(mode: str) -> Iterator[None]:
    """For the ``NOGUARD_MODES``: the EMA's NaN/Inf guard is replaced by a
    constant "finite" while the mode's models are built, traced and timed, so
    that the difference to ``keras_ema`` is what the guard costs. A patch of
    the benchmark only; the library has no switch for it."""
    if mode not in NOGUARD_MODES:
        yield
        return
    with contextlib.ExitStack() as stack:
        _patch_guard(stack)
        yield


def _patch_guard(stack: contextlib.ExitStack) -> None:
    """Replaces every form of the NaN/Inf guard by "all finite", for as long
    as `stack` is open: every engine checks through `keras_ema.guard.all_finite`,
    whatever its form."""
    from unittest import mock

    from keras_ema import guard

    def assumed_finite(values, form=guard.Guard.EAGER):
        return guard.assumed_finite(form)

    stack.enter_context(mock.patch.object(guard, "all_finite", assumed_finite))
