"""Per-step cost of weight EMA in ``keras.Model.fit``, for one Keras backend.

Ten modes are timed on synthetic data, for several model shapes:

* ``none``: plain ``fit`` with Adam, no EMA;
* ``builtin``: Keras' own optimizer flag, ``Adam(use_ema=True, ema_momentum=0.999)``;
* ``keras_ema``: ``keras_ema.EMA(update_every=1, update_after_step=0)`` as a callback;
* ``keras_ema_every10``: the same with ``update_every=10``;
* ``keras_ema_offload`` and ``keras_ema_offload_every10``: the two above with
  ``offload_to_host=True`` (shadows in host memory, updated on the CPU);
* ``keras_ema_2profiles`` and ``keras_ema_4profiles``: one callback keeping 2 (4)
  averages, ``keras_ema.EMA(profiles={"p0": ..., "p1": ...})`` of
  ``keras_ema.WarmupSchedule(update_after_step=0, update_every=1, beta=b)`` with
  ``b`` 0.999, 0.9999 (then 0.99, 0.9995);
* ``keras_ema_noguard``: ``keras_ema`` with its NaN/Inf guard replaced by a
  constant (a patch of this benchmark, ``guard_removed``): the difference to
  ``keras_ema`` is what the guard costs;
* ``keras_ema_posthoc``: ``keras_ema.PostHocEMA(sigma_rels=(0.05, 0.10),
  snapshot_every=10)`` into a temporary folder: against ``keras_ema_2profiles``
  (two averages, no snapshots), what its snapshots cost.

Warm mode (the default): each measurement builds and compiles a fresh model (same
seed), runs a short warm-up ``fit`` of 12 steps (so that the first tracing and
compilation are not timed), then times one ``fit`` of ``N`` steps (``epochs=1``,
data sized to exactly ``N`` batches, ``verbose=0``) with ``time.perf_counter``. The
clock stops after ``fit`` has returned and the backend's queued work is done (on
JAX, every array the model, its optimizer and the EMA callback hold is blocked on;
TensorFlow and torch run synchronously on CPU). Three numbers come out of that one
timed ``fit``:

* ``ms_per_step``: the whole ``fit`` over ``N``. It includes ``fit``'s fixed costs
  (data adapter, callbacks' ``on_train_begin/end``, Keras' ``finalize_variable_values``
  for the built-in EMA) and anything traced or compiled again in that ``fit``;
* ``steady_ms_per_step``: from the start of batch 3 to the end, over ``N - 3``;
* ``startup_ms``: ``fit``'s set-up plus its first 3 steps.

The modes are interleaved (none, builtin, keras_ema, keras_ema_every10, none, ...)
for ``--repeats`` rounds and the minimum of each number per mode is kept; the ratios
(``keras_ema_over_builtin``, ``keras_ema_over_none``, ``builtin_over_none``,
``every10_over_none``, ``offload_over_keras_ema``, ``offload_over_none``,
``offload_every10_over_none``, ``2profiles_over_builtin``, ``4profiles_over_builtin``)
are computed from those minima, for ``ms_per_step`` at the top level of the JSON and
for ``steady_ms_per_step`` under ``steady_ratios``. So is what each profile adds,
``{K}profiles_marginal`` = ``(kprofiles - none) / (K * (keras_ema - none))`` for
K = 2 and 4: 1 when K profiles cost K times the one of ``keras_ema``, less when they
share work (the weights are read once for all); ``null`` when ``keras_ema`` was not
slower than ``none``.

Memory: ``state_bytes`` is the bytes held in the optimizer's variables plus the
EMA callback's shadow variables (``keras_ema.EMA.variables``) after the timed ``fit``,
so ``state_bytes[mode] - state_bytes["none"]`` is exactly the EMA's shadow copy
(in host memory for the offload modes; 4 bytes per tracked float32 element; the
callback also tracks non-trainable floats such as BatchNormalization statistics,
the built-in EMA only trainable ones). ``EMA.variables`` holds the first profile's
shadows: for the profiles modes that is one profile's copy of K. With ``--rss``,
for each mode one child process builds the model, runs the warm-up and one timed
``fit``, and reports the growth of its peak resident set (``ru_maxrss`` at the end
minus the resident set just before the model was built). That includes compilation
memory, temporaries and allocator noise: read it for big differences only (the
``big_mlp`` shadow is 42 MiB).

Cold mode (``--cold``): what a user's first ``fit`` of a fresh model costs, tracing
and compiling included. Each measurement builds and compiles a fresh model and
creates a fresh callback (neither timed), then times the whole ``fit`` of
``--epochs`` epochs (default 4) of ``--steps`` steps (default 50) with
``time.perf_counter``, until the backend's queued work is done, as above. On JAX the
in-process compilation caches are cleared first (``jax.clear_caches()``), so that
every measurement compiles what a new process would, Keras' small eager ops
included. Before the first shape each mode runs one short untimed cold ``fit``, so
that what a process does only once (lazy imports, thread pools) falls on no mode.
The modes are interleaved for ``--repeats`` rounds and the minimum of each number
per mode is kept:

* ``fit_ms``: the whole ``fit``;
* ``first_step_ms``: up to the end of the first step (set-up, tracing, compiling);
* ``steady_ms_per_step``: from the start of the second epoch to the end of the last,
  per step (with one epoch: from batch 3), as `StepClock` waits for the steps;
* ``end_ms``: from the end of the last epoch to the end (Keras' and the callbacks'
  end of ``fit``, and what they compile there).

Its ratios: each keras_ema mode over ``builtin`` and over ``none``
(``keras_ema_over_builtin``, ``keras_ema_every10_over_none``, ...) and the profiles'
marginal costs, for ``fit_ms`` (``fit_ratios``) and ``steady_ms_per_step``
(``steady_ratios``). On JAX, ``compiles`` lists for each mode's fastest ``fit`` every
function traced, lowered to MLIR and compiled by XLA, with the phase of ``fit`` it
happened in (``setup`` before the first epoch, ``epoch N``, ``end`` after the last
epoch): Keras' ``train_step`` beside the EMA's ``fused_step``, Keras' eager ops, and
what the EMA compiles at the end of ``fit``. The times come from the duration events
of ``jax.monitoring``, the ones behind ``jax_log_compiles``' "Finished tracing /
jaxpr to MLIR module conversion / XLA compilation of ... in ... sec" messages.
``compile_ms`` is their total per mode.

The bandwidth floor (``--floor``, and always for models of over 1M parameters):
what one pass of an EMA update over the model's floating-point weights costs at
best. At the end of every round, in the same process, one in-place lerp
``a = a + w * (b - a)`` over as many float32 elements as the model's float weights
is timed with the backend's own op (JAX: a jitted function of one flat donated
array, blocked on; TensorFlow: ``tf.Variable.assign_add`` in a ``tf.function``,
with XLA when Keras compiles the models with it; torch: ``Tensor.lerp_``), median of
100 after a warm-up; the best round's median is kept. ``floor`` in the JSON holds it
(``lerp_ms``, and ``lerp_gb_per_s`` at 12 bytes an element) and
``(keras_ema - none) / lerp`` for ``ms_per_step`` and ``steady_ms_per_step``
(``steady`` only in the cold mode): how many such passes the EMA's cost per step
is worth. The EMA's update also reads the weights for its NaN/Inf guard: 16 bytes an
element against the lerp's 12, a ratio of 1.33 at the same bandwidth. Without a
strategy, each round also times the update alone on a fresh model of the shape, one
update after each lerp, median of as many (``update_ms``, ``update_over_lerp``):
``EMA.update()`` on TensorFlow, the engine's step on torch (what a step in ``fit``
runs after Keras' step), and on JAX the fused step's update jitted on its own
(`make_update`). The difference of two whole ``fit`` calls cannot resolve a
few ms in steps of 50-300 ms on a noisy machine; this can.

MirroredStrategy (``--strategy mirrored``, TensorFlow only, warm or cold): the CPU is
split into 2 logical devices at start-up, before TensorFlow initialises, and every
model is built and compiled under ``tf.distribute.MirroredStrategy`` over them; the
batch is the global batch (each replica gets half). Modes ``none``, ``builtin`` and
``keras_ema``. The floor, if asked for, is still one lerp on one device.

``other_cpu_s`` is the CPU time that other processes used during a shape's run: the
machine has 2 cores, and numbers taken while it is well above 0 are not comparable.

Usage (one backend per process)::

    KERAS_BACKEND=jax python benchmarks/overhead.py [--quick] [--shapes a,b]
        [--modes none,builtin,...] [--repeats 5] [--steps N] [--rss] [--floor]
        [--json-out results.jsonl]
    KERAS_BACKEND=jax python benchmarks/overhead.py --cold [--epochs 4] [--steps 50]
        [--shapes a,b] [--modes none,builtin,keras_ema] [--repeats 5] [--floor]
    KERAS_BACKEND=tensorflow python benchmarks/overhead.py --strategy mirrored
        [--cold] [--shapes a,b] [--repeats 5]

Every shape prints a table and one line ``JSON {...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # the environment must be set before this import

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
TF_LOGICAL_CPUS = 2
LEARNING_RATE = 1e-3
BUILTIN_MOMENTUM = 0.999
WARMUP_STEPS = 12  # covers a keras_ema_every10 averaging step (step 10) as well
STARTUP_STEPS = 3  # steps of each timed fit left out of `steady_ms_per_step`
SEED = 0


@dataclass(frozen=True)
class Shape:
    """A benchmark model: how to build it, its data and its step counts."""

    name: str
    build: Callable[[], keras.Model]
    input_shape: tuple[int, ...]
    classes: int  # 0: regression with one output and MSE
    batch: int
    steps: int
    quick_steps: int

    @property
    def loss(self) -> str:
        """The loss the model is compiled with."""
        return "sparse_categorical_crossentropy" if self.classes else "mse"


def _mlp(
    inputs: int, widths: list[int], outputs: int, dropout: float = 0.0
) -> keras.Model:
    """A ReLU MLP with the given hidden widths and a linear head."""
    x = inp = keras.Input((inputs,))
    for width in widths:
        x = keras.layers.Dense(width, activation="relu")(x)
        if dropout:
            x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inp, keras.layers.Dense(outputs)(x))


def _article_mlp() -> keras.Model:
    """The article's regression MLP: 20-64-32-1 with dropout 0.2."""
    return _mlp(20, [64, 32], 1, dropout=0.2)


def _deep_mlp() -> keras.Model:
    """Many small variables: 40 Dense layers of 64 units (82 variables)."""
    return _mlp(64, [64] * 39, 1)


def _wide_mlp() -> keras.Model:
    """Few large variables: 4 Dense layers of 1024 units (~4.2M parameters)."""
    return _mlp(1024, [1024] * 3, 1024)


def _big_mlp() -> keras.Model:
    """Over 10M parameters in three large Dense layers."""
    return _mlp(256, [2048, 4096, 512], 10)


def _conv_bn() -> keras.Model:
    """A small conv net with BatchNormalization (non-trainable moving statistics)."""
    x = inp = keras.Input((32, 32, 3))
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax")(x))


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("article_mlp", _article_mlp, (20,), 0, 32, 300, 100),
        Shape("deep_mlp", _deep_mlp, (64,), 0, 32, 100, 40),
        Shape("wide_mlp", _wide_mlp, (1024,), 0, 32, 40, 15),
        Shape("conv_bn", _conv_bn, (32, 32, 3), 10, 32, 30, 12),
        Shape("big_mlp", _big_mlp, (256,), 10, 16, 20, 10),
    )
}


def make_data(shape: Shape, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic inputs and targets for exactly ``steps`` batches."""
    rng = np.random.default_rng(SEED)
    n = steps * shape.batch
    x = rng.standard_normal((n, *shape.input_shape), dtype=np.float32)
    if shape.classes:
        y = rng.integers(0, shape.classes, size=(n,)).astype(np.int32)
    else:
        y = rng.standard_normal((n, 1), dtype=np.float32)
    return x, y


def make_callbacks(mode: str) -> list[keras.callbacks.Callback]:
    """The callbacks a mode passes to ``fit`` (the EMA callback, if any)."""
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


@contextlib.contextmanager
def guard_removed(mode: str):
    """For the ``NOGUARD_MODES``: the EMA's NaN/Inf guard is replaced by a
    constant "finite" while the mode's models are built, traced and timed, so
    that the difference to ``keras_ema`` is what the guard costs. A patch of
    the benchmark only; the library has no switch for it."""
    if mode not in NOGUARD_MODES:
        yield
        return
    from unittest import mock

    from keras_ema import guard

    def assumed_finite(values, form=guard.Guard.EAGER):
        return guard.assumed_finite(form)

    with mock.patch.object(guard, "all_finite", assumed_finite):
        yield


def _temporary_folder() -> str:
    """A new folder for one callback's snapshots, removed when the process
    exits."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="overhead-posthoc-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return os.path.join(folder, "snapshots")


# The `tf.distribute` strategy every model is built and compiled under, if any
# (`use_mirrored_strategy`).
_strategy: Any = None


def use_mirrored_strategy() -> None:
    """Builds every model under a ``tf.distribute.MirroredStrategy`` over
    ``TF_LOGICAL_CPUS`` logical CPUs, made from the machine's CPU here.

    TensorFlow configures logical devices only before it initialises its
    runtime: this runs before any TensorFlow op.
    """
    global _strategy
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * TF_LOGICAL_CPUS
        )
    except RuntimeError as error:
        raise SystemExit(
            f"--strategy mirrored: TensorFlow was initialised before its CPU "
            f"could be split into {TF_LOGICAL_CPUS} logical devices ({error})"
        ) from error
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    _strategy = tf.distribute.MirroredStrategy(devices)


def build_model(shape: Shape, mode: str) -> keras.Model:
    """A freshly built and compiled model (same seed for every mode), under
    the strategy of `use_mirrored_strategy` if there is one.

    The previous measurement's model, optimizer and callbacks are freed
    first, so that no mode runs beside the memory of the ones before it.
    """
    keras.backend.clear_session()
    gc.collect()
    keras.utils.set_random_seed(SEED)
    scope = _strategy.scope() if _strategy is not None else contextlib.nullcontext()
    with scope:
        model = shape.build()
        if mode == "builtin":
            optimizer = keras.optimizers.Adam(
                LEARNING_RATE, use_ema=True, ema_momentum=BUILTIN_MOMENTUM
            )
        else:
            optimizer = keras.optimizers.Adam(LEARNING_RATE)
        model.compile(optimizer=optimizer, loss=shape.loss)
    return model


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
        if batch != STARTUP_STEPS:
            return
        if keras.backend.backend() == "jax":
            import jax

            state = getattr(self.fitted, "_jax_state", None) or {}
            jax.block_until_ready([a for group in state.values() for a in group])
        self.stamp = time.perf_counter()


def _fit(
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


def measure(shape: Shape, mode: str, steps: int) -> dict[str, Any]:
    """Build, warm up, then time one ``fit`` of ``steps`` steps.

    See `_measure`."""
    with guard_removed(mode):
        return _measure(shape, mode, steps)


def _measure(shape: Shape, mode: str, steps: int) -> dict[str, Any]:
    """Build, warm up, then time one ``fit`` of ``steps`` steps.

    Returns ``ms_per_step`` (the whole ``fit`` over ``steps``),
    ``steady_ms_per_step`` (from the start of batch ``STARTUP_STEPS`` to the end,
    over the remaining steps: without ``fit``'s set-up and first steps),
    ``startup_ms`` (``fit``'s set-up plus its first ``STARTUP_STEPS`` steps, with
    any tracing or compiling that ``fit`` did again) and the model's sizes.
    """
    model = build_model(shape, mode)
    callbacks = make_callbacks(mode)
    _fit(model, shape, make_data(shape, WARMUP_STEPS), callbacks)
    wait_for_device(model, callbacks)
    unalias_builtin_ema(model)
    data = make_data(shape, steps)
    clock = StepClock(model)
    with SnapshotTimer(callbacks) as snapshots:
        start = time.perf_counter()
        _fit(model, shape, data, [*callbacks, clock])
        wait_for_device(model, callbacks)
        end = time.perf_counter()
    extra = {"snapshot_ms": snapshots.per_snapshot()} if snapshots.active else {}
    return {
        **extra,
        "ms_per_step": 1000.0 * (end - start) / steps,
        "steady_ms_per_step": 1000.0 * (end - clock.stamp) / (steps - STARTUP_STEPS),
        "startup_ms": 1000.0 * (clock.stamp - start),
        "params": model.count_params(),
        "trainable_params": sum(
            int(np.prod(v.shape)) for v in model.trainable_variables
        ),
        "variables": len(model.variables),
        "state_bytes": state_bytes(model, callbacks),
        "float_elements": float_elements(model),
        "jit_compile": bool(model.jit_compile),
    }


class SnapshotTimer:
    """Where a ``PostHocEMA``'s snapshots spend their time during the timed
    ``fit``: its blocking part on the training thread (``block``), of which
    waiting for the device to finish the steps queued so far (``device``:
    JAX dispatches ahead; TensorFlow and torch on CPU have nothing queued),
    waiting for the previous file (``wait``), bringing the model's variables
    up to date (``sync``: on JAX, Keras' train state written back into the
    model), copying the averages to the host (``averages``) and copying the
    other weights, the buffers (``buffers``); and writing the file, on the
    writer thread (``write``). A patch of the benchmark around the
    callback's own methods; inactive for the other modes."""

    PARTS = ("block", "device", "wait", "sync", "averages", "buffers", "write")
    # Parts that other hooks of the callback also run: counted only inside
    # a snapshot.
    INSIDE_ONLY = ("wait", "sync", "averages")

    def __init__(self, callbacks: list[keras.callbacks.Callback]) -> None:
        from keras_ema import PostHocEMA

        found = [c for c in callbacks if isinstance(c, PostHocEMA)]
        self.callback = found[0] if found else None
        self.active = self.callback is not None
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.count = 0
        self._inside = False
        self._stack = contextlib.ExitStack()

    def _timed(self, part: str, function: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            counted = part not in self.INSIDE_ONLY or self._inside
            if part == "block":
                self._inside = True
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if counted:
                    self.seconds[part] += time.perf_counter() - start
                if part == "block":
                    self.count += 1
                    self._inside = False

        return timed

    def __enter__(self) -> SnapshotTimer:
        if not self.active:
            return self
        from unittest import mock

        from keras_ema.posthoc import callback as posthoc_callback

        c = self.callback
        patch = self._stack.enter_context
        drain = self._timed("device", self._drain)
        take_snapshot = c._take_snapshot

        def drained_snapshot(step: int) -> None:
            drain()
            take_snapshot(step)

        patch(
            mock.patch.object(
                c, "_take_snapshot", self._timed("block", drained_snapshot)
            )
        )
        patch(mock.patch.object(c, "_write", self._timed("write", c._write)))
        engine = c._engine
        patch(
            mock.patch.object(
                engine, "host_shadows", self._timed("averages", engine.host_shadows)
            )
        )
        model = inspect.getattr_static(c, "model")
        patch(
            mock.patch.object(
                type(c),
                "model",
                property(self._timed("sync", model.fget), model.fset),
            )
        )
        patch(
            mock.patch.object(
                c._writer, "finish", self._timed("wait", c._writer.finish)
            )
        )
        patch(
            mock.patch.object(
                posthoc_callback,
                "snapshot_values",
                self._timed("buffers", posthoc_callback.snapshot_values),
            )
        )
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.active:
            # The last file is written before the counts are read.
            self.callback.wait()
        self._stack.close()

    def _drain(self) -> None:
        """Blocks until the steps queued on the device are done: the
        update's own arrays are the last thing each step writes."""
        if keras.backend.backend() != "jax":
            return
        import jax

        arrays = getattr(self.callback._engine, "_arrays", None)
        jax.block_until_ready(jax.tree_util.tree_leaves(arrays))

    def per_snapshot(self) -> dict[str, float]:
        """Milliseconds per snapshot of each part, and the count."""
        n = max(self.count, 1)
        timed = {part: 1000.0 * s / n for part, s in self.seconds.items()}
        return {**timed, "count": self.count}


def _current_rss_kib() -> int:
    """The process's resident set now, in KiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def rss_child(shape_name: str, mode: str, steps: int) -> None:
    """In a child process: peak-RSS growth (KiB) of one full measurement, as JSON."""
    before = _current_rss_kib()
    measure(SHAPES[shape_name], mode, steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"rss_growth_kib": peak - before}))


def measure_rss(shape: Shape, mode: str, steps: int) -> float:
    """Peak-RSS growth in MiB of one measurement, run in a fresh process."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--rss-child",
        f"{shape.name}:{mode}:{steps}",
    ]
    if _strategy is not None:
        cmd += ["--strategy", "mirrored"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    line = [s for s in out.splitlines() if s.startswith("{")][-1]
    return json.loads(line)["rss_growth_kib"] / 1024.0


METRICS = ("ms_per_step", "steady_ms_per_step", "startup_ms")


def run_shape(
    shape: Shape, modes: list[str], repeats: int, steps: int, rss: bool, floor: bool
) -> dict[str, Any]:
    """Interleave the modes ``repeats`` times; keep each metric's minimum per mode.

    With ``floor`` (or for models of over ``FLOOR_PARAMS`` parameters) each
    round ends with the bandwidth floor (`measure_floor`).
    """
    runs: dict[str, dict[str, list[float]]] = {
        k: {m: [] for m in modes} for k in METRICS
    }
    info: dict[str, dict[str, Any]] = {}
    floors: list[tuple[float, float | None]] = []
    snapshot_runs: list[dict[str, float]] = []
    for _ in range(repeats):
        for mode in modes:
            info[mode] = measure(shape, mode, steps)
            for key in METRICS:
                runs[key][mode].append(info[mode][key])
            if "snapshot_ms" in info[mode]:
                snapshot_runs.append(info[mode]["snapshot_ms"])
        first = info[modes[0]]
        if floor or first["params"] > FLOOR_PARAMS:
            floors.append(floor_round(shape, first))
    result: dict[str, Any] = {
        "backend": keras.backend.backend(),
        "shape": shape.name,
        "params": first["params"],
        "trainable_params": first["trainable_params"],
        "variables": first["variables"],
        "batch": shape.batch,
        "steps": steps,
        "repeats": repeats,
    }
    for key in METRICS:
        result[key] = {m: min(t) for m, t in runs[key].items()}
    result.update(_ratios(result["ms_per_step"]))
    result["steady_ratios"] = _ratios(result["steady_ms_per_step"])
    result["ms_per_step_all"] = runs["ms_per_step"]
    result["state_bytes"] = {m: info[m]["state_bytes"] for m in modes}
    if snapshot_runs:
        # Each part's minimum over the rounds, as for the step times.
        result["snapshot_ms"] = {
            k: min(r[k] for r in snapshot_runs) for k in snapshot_runs[0]
        }
    if floors:
        result["floor"] = floor_result(
            floors,
            first["float_elements"],
            {
                "ms_per_step": result["ms_per_step"],
                "steady": result["steady_ms_per_step"],
            },
        )
    if rss:
        result["rss_growth_mib"] = {m: measure_rss(shape, m, steps) for m in modes}
    return result


def _ratios(best: dict[str, float]) -> dict[str, float | None]:
    """The overhead ratios computable from the modes that were run."""
    pairs = {
        "keras_ema_over_builtin": ("keras_ema", "builtin"),
        "keras_ema_over_none": ("keras_ema", "none"),
        "builtin_over_none": ("builtin", "none"),
        "every10_over_none": ("keras_ema_every10", "none"),
        "offload_over_keras_ema": ("keras_ema_offload", "keras_ema"),
        "offload_over_none": ("keras_ema_offload", "none"),
        "offload_every10_over_none": ("keras_ema_offload_every10", "none"),
        "noguard_over_keras_ema": ("keras_ema_noguard", "keras_ema"),
        "noguard_over_builtin": ("keras_ema_noguard", "builtin"),
        "posthoc_over_2profiles": ("keras_ema_posthoc", "keras_ema_2profiles"),
        "posthoc_over_builtin": ("keras_ema_posthoc", "builtin"),
    }
    ratios = {
        k: best[a] / best[b] for k, (a, b) in pairs.items() if a in best and b in best
    }
    return ratios | _profile_ratios(best)


def _profile_ratios(best: dict[str, float]) -> dict[str, float | None]:
    """The profiles modes over ``builtin``, and what K profiles add.

    ``{K}profiles_marginal`` is ``(kprofiles - none) / (K * (keras_ema - none))``:
    1 when each profile costs what the one of ``keras_ema`` does, less when
    the profiles share work (they read the weights once). ``None`` when
    ``keras_ema`` was not slower than ``none``.
    """
    ratios: dict[str, float | None] = {}
    for mode, k in PROFILE_MODES.items():
        if mode not in best:
            continue
        if "builtin" in best:
            ratios[f"{k}profiles_over_builtin"] = best[mode] / best["builtin"]
        if "none" in best and "keras_ema" in best:
            one = best["keras_ema"] - best["none"]
            added = best[mode] - best["none"]
            ratios[f"{k}profiles_marginal"] = added / (k * one) if one > 0 else None
    return ratios


def format_ratios(ratios: dict[str, float | None]) -> str:
    """``name value, ...``; ``n/a`` for a ratio that could not be computed."""
    return ", ".join(
        f"{k} {'n/a' if v is None else format(v, '.4f')}" for k, v in ratios.items()
    )


def _strategy_label(result: dict[str, Any]) -> str:
    if not result.get("strategy"):
        return ""
    return f", MirroredStrategy on {TF_LOGICAL_CPUS} logical CPUs"


def print_table(result: dict[str, Any]) -> None:
    """A readable table of one shape's result."""
    print(
        f"\n[{result['backend']}{_strategy_label(result)}] {result['shape']}: "
        f"{result['params']:,} params, "
        f"{result['variables']} variables, batch {result['batch']}, "
        f"{result['steps']} steps x {result['repeats']} repeats (minima)"
    )
    rss = "rss_growth_mib" in result
    print(
        f"  {'mode':<26} {'ms/step':>9} {'steady':>9} {'startup':>9} "
        f"{'EMA MiB':>8}{' RSS+MiB' if rss else ''}  all ms/step"
    )
    none_bytes = result["state_bytes"].get("none", 0)
    for mode, best in result["ms_per_step"].items():
        extra = (result["state_bytes"][mode] - none_bytes) / 2**20
        line = (
            f"  {mode:<26} {best:>9.4f} {result['steady_ms_per_step'][mode]:>9.4f} "
            f"{result['startup_ms'][mode]:>9.1f} {extra:>8.2f}"
        )
        if rss:
            line += f" {result['rss_growth_mib'][mode]:>7.1f}"
        all_runs = " ".join(f"{t:.3f}" for t in result["ms_per_step_all"][mode])
        print(f"{line}  {all_runs}")
    for label, ratios in (
        ("ratios (ms/step)", _ratios(result["ms_per_step"])),
        ("ratios (steady) ", result["steady_ratios"]),
    ):
        print(f"  {label}: {format_ratios(ratios)}")
    if "floor" in result:
        print_floor(result["floor"])
    if "snapshot_ms" in result:
        parts = result["snapshot_ms"]
        print(
            f"  PostHocEMA snapshots ({parts['count']} per fit), ms each: "
            f"blocking {parts['block']:.2f} (queued steps {parts['device']:.2f}, "
            f"waiting for the previous file "
            f"{parts['wait']:.2f}, model sync {parts['sync']:.2f}, averages "
            f"{parts['averages']:.2f}, buffers {parts['buffers']:.2f}); "
            f"file written by the writer thread {parts['write']:.2f}"
        )
    if "other_cpu_s" in result:
        print(
            f"  wall {result['wall_s']} s; CPU used by other processes meanwhile: "
            f"{result['other_cpu_s']} s (should be near 0)"
        )


# --------------------------------------------------------------------------
# The bandwidth floor: one in-place lerp over the model's float elements

FLOOR_PARAMS = 1_000_000  # models larger than this always get the floor
FLOOR_REPEATS = 100
FLOOR_WARMUP = 5
FLOOR_WEIGHT = 1e-3  # the lerp's weight, 1 - beta


def float_elements(model: keras.Model) -> int:
    """Elements of the model's floating-point weights, those the EMA averages."""
    return sum(
        int(np.prod(w.shape))
        for w in model.weights
        if keras.backend.is_float_dtype(w.dtype)
    )


def make_lerp(elements: int, jit_compile: bool) -> Callable[[], None]:
    """A function running ``a = a + w * (b - a)`` in place over ``elements``
    float32 values with the backend's own op, and waiting for it.

    JAX: a jitted function of one flat array, donated (XLA writes the result
    into its buffer), blocked on. TensorFlow: ``assign_add`` of the difference
    to a ``tf.Variable`` inside a ``tf.function``, compiled with XLA when the
    models are (``jit_compile``; Keras' default is no XLA on a CPU). torch:
    ``Tensor.lerp_``. Each on Keras' default device.
    """
    a = keras.ops.zeros((elements,), "float32")
    b = keras.ops.ones((elements,), "float32")
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        lerp = jax.jit(lambda a, b, w: a + w * (b - a), donate_argnums=0)
        weight = np.float32(FLOOR_WEIGHT)
        buffer = [a]

        def run() -> None:
            buffer[0] = lerp(buffer[0], b, weight)
            buffer[0].block_until_ready()

        return run
    if backend == "tensorflow":
        import tensorflow as tf

        variable = tf.Variable(a)
        weight = tf.constant(FLOOR_WEIGHT, tf.float32)

        @tf.function(jit_compile=jit_compile)
        def lerp() -> None:
            variable.assign_add(weight * (b - variable))

        sync = _device_sync()

        def run() -> None:
            lerp()
            sync()

        return run
    sync = _device_sync()

    def run() -> None:
        a.lerp_(b, FLOOR_WEIGHT)
        sync()

    return run


def make_update(model: keras.Model) -> Callable[[], None]:
    """A function running the EMA's update alone on ``model``'s weights, as a
    ``keras_ema`` step does (guard included), and waiting for it.

    torch: the engine's ``step()``, which a step in ``fit`` runs after Keras'
    train step (``EMA.update()`` would add the callback's checks of the
    model, which ``fit`` does not run per step). TensorFlow:
    ``EMA.update()``, the same blend the step runs inside Keras' train step
    (without its packing). JAX: the fused step's update, unfused: one
    jitted, donated `update.update_all` over the packed shadows and weights
    (``EMA.update()`` there copies every shadow first, to keep the
    variables' own arrays).
    """
    import keras_ema

    if keras.backend.backend() == "jax":
        return _jax_update(model)
    ema = keras_ema.EMA(update_every=1, update_after_step=0)
    ema.set_model(model)
    ema.update()  # builds the shadows and the engine
    update = ema.update
    if keras.backend.backend() == "torch":
        update = ema._engine.step
    sync = _device_sync()

    def run() -> None:
        update()
        sync()

    return run


def _device_sync() -> Callable[[], None]:
    """Waits for a GPU's queued work (Keras puts the tensors on it when there
    is one); nothing to wait for on a CPU, where TensorFlow and torch run
    each op before returning."""
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.synchronize
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            return tf.test.experimental.sync_devices
    return lambda: None


def _jax_update(model: keras.Model) -> Callable[[], None]:
    import jax

    import keras_ema
    from keras_ema import update
    from keras_ema.backends.jax import xla_guard
    from keras_ema.packing import Packing
    from keras_ema.state import Kind

    weights = [
        w for w in model.trainable_weights if keras.backend.is_float_dtype(w.dtype)
    ]
    kinds = [Kind.AVERAGE] * len(weights)
    packing = Packing(weights, kinds, lambda w: w.value.sharding)
    schedules = [keras_ema.WarmupSchedule(update_after_step=0, update_every=1)]

    def step(counters, shadows, values):
        counters, shadows, _ = update.update_all(
            schedules,
            packing.kinds,
            counters,
            [shadows],
            lambda: packing.pack(values),
            guard=xla_guard(weights),
        )
        return list(counters), shadows[0]

    step = jax.jit(step, donate_argnums=(0, 1))
    values = [w.value for w in weights]
    counters = [jax.numpy.zeros((), "int32"), jax.numpy.zeros((), "int32")]
    buffers = [counters, jax.jit(packing.pack)(values)]

    def run() -> None:
        buffers[:] = step(*buffers, values)
        jax.block_until_ready(buffers)

    return run


def measure_floor(
    elements: int, jit_compile: bool, model: keras.Model | None = None
) -> tuple[float, float | None]:
    """Median ms of ``FLOOR_REPEATS`` lerps (`make_lerp`) and, given a model,
    of as many EMA updates on it (`make_update`), one of each in turn, after
    a warm-up."""
    gc.collect()
    runs = [make_lerp(elements, jit_compile)]
    if model is not None:
        runs.append(make_update(model))
    for _ in range(FLOOR_WARMUP):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(FLOOR_REPEATS):
        for run, spent in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            spent.append(1000.0 * (time.perf_counter() - start))
    medians = [statistics.median(spent) for spent in times]
    return medians[0], (medians[1] if model is not None else None)


def floor_round(shape: Shape, first: dict[str, Any]) -> tuple[float, float | None]:
    """One round of the floor: the lerp and, without a strategy, the update
    alone on a fresh model of the shape (`measure_floor`)."""
    model = build_model(shape, "none") if _strategy is None else None
    return measure_floor(first["float_elements"], first["jit_compile"], model)


def floor_result(
    floors: list[tuple[float, float | None]],
    elements: int,
    per_step: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """The floor's JSON: the lerp's best median, its bandwidth, the update
    alone's best median and its ratio to the lerp, and, for each per-step
    metric given, ``(keras_ema - none) / lerp``.

    The bandwidth counts 12 bytes an element: two arrays read, one written.
    """
    lerps = [lerp for lerp, _ in floors]
    updates = [update for _, update in floors if update is not None]
    lerp_ms = min(lerps)
    result: dict[str, Any] = {
        "elements": elements,
        "lerp_ms": lerp_ms,
        "lerp_ms_all": lerps,
        "lerp_gb_per_s": 12 * elements / lerp_ms / 1e6,
    }
    if updates:
        result["update_ms"] = min(updates)
        result["update_ms_all"] = updates
        result["update_over_lerp"] = min(updates) / lerp_ms
    for name, best in per_step.items():
        if "keras_ema" in best and "none" in best:
            added = best["keras_ema"] - best["none"]
            result[f"{name}_ema_over_lerp"] = added / lerp_ms
    return result


def print_floor(floor: dict[str, Any]) -> None:
    """One line for the floor of a shape's table."""
    ratios = [
        f"(keras_ema - none) / lerp {floor[key]:.3f} ({key.split('_ema')[0]})"
        for key in floor
        if key.endswith("_ema_over_lerp")
    ]
    print(
        f"  floor: one in-place lerp of {floor['elements']:,} float32, "
        f"{floor['lerp_ms']:.4f} ms ({floor['lerp_gb_per_s']:.1f} GB/s, median of "
        f"{FLOOR_REPEATS}, best of {len(floor['lerp_ms_all'])} rounds)"
        + (f"; {', '.join(ratios)}" if ratios else "")
    )
    if "update_ms" in floor:
        print(
            f"  the update alone: {floor['update_ms']:.4f} ms, "
            f"{floor['update_over_lerp']:.3f} lerps"
        )


# --------------------------------------------------------------------------
# Cold mode: the first `fit` of a fresh model, tracing and compiling included

COLD_EPOCHS = 4
COLD_STEPS = 50
# JAX's duration events for the three stages of compiling one jitted function.
JAX_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}
COLD_METRICS = ("fit_ms", "first_step_ms", "steady_ms_per_step", "end_ms")


class CompileLog:
    """The JAX functions traced, lowered and compiled while a phase is set.

    It listens to ``jax.monitoring``'s duration events, the ones behind
    ``jax_log_compiles``' "Finished tracing / jaxpr to MLIR module conversion /
    XLA compilation of ... in ... sec" messages (JAX emits them whether or not
    those messages are logged). ``phase`` names where in ``fit`` they happen
    (set by `ColdClock`); ``None`` records nothing. On other backends it
    records nothing.
    """

    def __init__(self) -> None:
        self.phase: str | None = None
        self.events: list[tuple[str, str, str, float]] = []
        if keras.backend.backend() == "jax":
            import jax

            jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
        stage = JAX_COMPILE_EVENTS.get(event)
        if stage is None or self.phase is None:
            return
        # Tracing names the Python function, lowering and compiling its
        # module: `jit(name)`.
        name = str(kwargs.get("fun_name", "?"))
        if name.startswith("jit(") and name.endswith(")"):
            name = name[4:-1]
        self.events.append((self.phase, name, stage, duration))

    def start(self) -> None:
        self.events = []
        self.phase = "setup"

    def stop(self) -> list[dict[str, Any]]:
        """The events since `start`, one entry per phase and function."""
        self.phase = None
        table: dict[tuple[str, str], dict[str, Any]] = {}
        for phase, name, stage, duration in self.events:
            entry = table.setdefault(
                (phase, name),
                {"phase": phase, "function": name, "compiles": 0}
                | {f"{s}_ms": 0.0 for s in JAX_COMPILE_EVENTS.values()},
            )
            entry[f"{stage}_ms"] += 1000.0 * duration
            entry["compiles"] += stage == "compile"
        return list(table.values())


def compile_ms(entries: list[dict[str, Any]]) -> float:
    """Tracing, lowering and compiling time of a `CompileLog.stop` list."""
    stages = [f"{s}_ms" for s in JAX_COMPILE_EVENTS.values()]
    return sum(e[s] for e in entries for s in stages)


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


class ColdClock(keras.callbacks.Callback):
    """Stamps within a cold ``fit`` of ``epochs`` epochs, and its compile phases.

    ``first_step``: when batch 1 of the first epoch begins (``fit``'s set-up,
    tracing, compiling and first step are done). ``steady_start``: when the
    second epoch begins (with one epoch, batch ``STARTUP_STEPS`` of it).
    ``last_epoch_end``: when the last epoch ends. Like `StepClock` it waits for
    the steps dispatched so far before each stamp, and overrides no
    ``*_batch_end`` hook.
    """

    def __init__(self, model: keras.Model, epochs: int, compiles: CompileLog) -> None:
        super().__init__()
        self.fitted = model
        self.epochs = epochs
        self.compiles = compiles
        self.steady_epoch, self.steady_batch = (
            (1, 0) if epochs > 1 else (0, STARTUP_STEPS)
        )
        self.epoch = 0
        self.first_step = self.steady_start = self.last_epoch_end = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch
        self.compiles.phase = f"epoch {epoch}"

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self.epoch == 0 and batch == 1:
            self.first_step = wait_for_steps(self.fitted)
        if self.epoch == self.steady_epoch and batch == self.steady_batch:
            self.steady_start = wait_for_steps(self.fitted)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch == self.epochs - 1:
            self.last_epoch_end = wait_for_steps(self.fitted)
            self.compiles.phase = "end"


def measure_cold(
    shape: Shape, mode: str, epochs: int, steps: int, compiles: CompileLog
) -> dict[str, Any]:
    """Build a fresh model and callback, then time its first ``fit``, whole.

    See `_measure_cold`."""
    with guard_removed(mode):
        return _measure_cold(shape, mode, epochs, steps, compiles)


def _measure_cold(
    shape: Shape, mode: str, epochs: int, steps: int, compiles: CompileLog
) -> dict[str, Any]:
    """Build a fresh model and callback, then time its first ``fit``, whole.

    Returns ``fit_ms`` (the ``fit`` call until the backend's queued work is
    done), ``first_step_ms`` (up to the end of the first step),
    ``steady_ms_per_step`` (from `ColdClock`'s ``steady_start`` to the end of
    the last epoch, per step), ``end_ms`` (from the end of the last epoch to
    the end: Keras' and the callbacks' end of ``fit``), the JAX ``compiles``
    and the model's sizes.
    """
    if keras.backend.backend() == "jax":
        import jax

        # What earlier measurements compiled (Keras' eager ops) is compiled
        # again, as in a new process; building the model is not timed.
        jax.clear_caches()
    model = build_model(shape, mode)
    callbacks = make_callbacks(mode)
    data = make_data(shape, steps)
    clock = ColdClock(model, epochs, compiles)
    compiles.start()
    start = time.perf_counter()
    _fit(model, shape, data, [*callbacks, clock], epochs)
    wait_for_device(model, callbacks)
    end = time.perf_counter()
    steady_steps = (epochs - clock.steady_epoch) * steps - clock.steady_batch
    return {
        "fit_ms": 1000.0 * (end - start),
        "first_step_ms": 1000.0 * (clock.first_step - start),
        "steady_ms_per_step": 1000.0
        * (clock.last_epoch_end - clock.steady_start)
        / steady_steps,
        "end_ms": 1000.0 * (end - clock.last_epoch_end),
        "compiles": compiles.stop(),
        "params": model.count_params(),
        "variables": len(model.variables),
        "float_elements": float_elements(model),
        "jit_compile": bool(model.jit_compile),
    }


def run_shape_cold(
    shape: Shape,
    modes: list[str],
    repeats: int,
    epochs: int,
    steps: int,
    compiles: CompileLog,
    first_in_process: bool,
    floor: bool,
) -> dict[str, Any]:
    """Interleave cold ``fit``s of the modes ``repeats`` times; keep the minima.

    The compiles reported for a mode are those of its fastest ``fit``. In a
    new process, each mode first runs one short cold ``fit``, untimed, so that
    what a process does only once (lazy imports, thread pools, kernels used
    for the first time) is charged to no mode. ``floor`` as in `run_shape`.
    """
    if first_in_process:
        for mode in modes:
            measure_cold(shape, mode, 1, STARTUP_STEPS + 1, compiles)
    runs: dict[str, dict[str, list[float]]] = {
        k: {m: [] for m in modes} for k in COLD_METRICS
    }
    fastest: dict[str, dict[str, Any]] = {}
    floors: list[tuple[float, float | None]] = []
    for _ in range(repeats):
        for mode in modes:
            info = measure_cold(shape, mode, epochs, steps, compiles)
            for key in COLD_METRICS:
                runs[key][mode].append(info[key])
            if mode not in fastest or info["fit_ms"] < fastest[mode]["fit_ms"]:
                fastest[mode] = info
        first = fastest[modes[0]]
        if floor or first["params"] > FLOOR_PARAMS:
            floors.append(floor_round(shape, first))
    result: dict[str, Any] = {
        "backend": keras.backend.backend(),
        "shape": shape.name,
        "cold": True,
        "params": first["params"],
        "variables": first["variables"],
        "batch": shape.batch,
        "epochs": epochs,
        "steps_per_epoch": steps,
        "repeats": repeats,
    }
    for key in COLD_METRICS:
        result[key] = {m: min(t) for m, t in runs[key].items()}
    result["fit_ratios"] = _mode_ratios(result["fit_ms"])
    result["steady_ratios"] = _mode_ratios(result["steady_ms_per_step"])
    result["fit_ms_all"] = runs["fit_ms"]
    if floors:
        result["floor"] = floor_result(
            floors, first["float_elements"], {"steady": result["steady_ms_per_step"]}
        )
    if keras.backend.backend() == "jax":
        result["compile_ms"] = {m: compile_ms(fastest[m]["compiles"]) for m in modes}
        result["compiles"] = {m: fastest[m]["compiles"] for m in modes}
    return result


def _mode_ratios(best: dict[str, float]) -> dict[str, float | None]:
    """Each keras_ema mode over ``builtin`` and over ``none``, and the
    profiles' marginal costs (`_profile_ratios`)."""
    ratios: dict[str, float | None] = {}
    for mode in best:
        if mode.startswith("keras_ema"):
            for base in ("builtin", "none"):
                if base in best:
                    ratios[f"{mode}_over_{base}"] = best[mode] / best[base]
    marginal = _profile_ratios(best).items()
    return ratios | {k: v for k, v in marginal if k.endswith("_marginal")}


def print_cold_table(result: dict[str, Any]) -> None:
    """A readable table of one shape's cold result, and its JAX compiles."""
    print(
        f"\n[{result['backend']}{_strategy_label(result)}] {result['shape']} "
        f"(cold): {result['params']:,} "
        f"params, {result['variables']} variables, batch {result['batch']}, "
        f"{result['epochs']} epochs x {result['steps_per_epoch']} steps, "
        f"{result['repeats']} repeats (minima)"
    )
    jax_compiles = "compile_ms" in result
    print(
        f"  {'mode':<26} {'fit ms':>9} {'1st step':>9} {'steady':>9} {'end ms':>8}"
        f"{' compile' if jax_compiles else ''}  all fit ms"
    )
    for mode, best in result["fit_ms"].items():
        line = (
            f"  {mode:<26} {best:>9.1f} {result['first_step_ms'][mode]:>9.1f} "
            f"{result['steady_ms_per_step'][mode]:>9.4f} {result['end_ms'][mode]:>8.1f}"
        )
        if jax_compiles:
            line += f" {result['compile_ms'][mode]:>7.1f}"
        all_runs = " ".join(f"{t:.1f}" for t in result["fit_ms_all"][mode])
        print(f"{line}  {all_runs}")
    for label, key in (("fit", "fit_ratios"), ("steady", "steady_ratios")):
        print(f"  ratios ({label}): {format_ratios(result[key])}")
    if "floor" in result:
        print_floor(result["floor"])
    if jax_compiles:
        print_compiles(result["compiles"])
    if "other_cpu_s" in result:
        print(
            f"  wall {result['wall_s']} s; CPU used by other processes meanwhile: "
            f"{result['other_cpu_s']} s (should be near 0)"
        )


def print_compiles(compiles: dict[str, list[dict[str, Any]]]) -> None:
    """Per mode, the functions JAX traced and compiled in the fastest cold ``fit``.

    Phase by phase, in order; functions that took under 1 ms in all are
    summed on one line per phase.
    """
    print("  JAX compiles (ms: trace + lower + compile = total, then how many):")
    for mode, entries in compiles.items():
        print(f"    {mode}:")
        phases: dict[str, list[dict[str, Any]]] = {}
        for entry in entries:
            phases.setdefault(entry["phase"], []).append(entry)
        for phase, group in phases.items():
            small = []
            for e in group:
                total = compile_ms([e])
                if total < 1.0:
                    small.append(total)
                    continue
                print(
                    f"      {phase:<8} {e['function']:<28} {e['trace_ms']:>7.1f} + "
                    f"{e['lower_ms']:>6.1f} + {e['compile_ms']:>7.1f} = "
                    f"{total:>7.1f}  x{e['compiles']}"
                )
            if small:
                label = f"{len(small)} more, under 1 ms each"
                print(f"      {phase:<8} {label:<47} {sum(small):>7.1f}")


def other_cpu_seconds() -> float:
    """CPU seconds used machine-wide (``/proc/stat``) minus this process and children.

    A difference of it over a run shows whether other processes shared the cores.
    """
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system, irq softirq steal
    own = os.times()
    mine = own.user + own.system + own.children_user + own.children_system
    return busy / os.sysconf("SC_CLK_TCK") - mine


def environment() -> dict[str, str]:
    """Versions and machine facts recorded with the results."""
    env = {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "cpus": str(os.cpu_count()),
        "machine": platform.machine(),
    }
    backend_module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    module = __import__(backend_module[keras.backend.backend()])
    env[keras.backend.backend()] = module.__version__
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"comma-separated subset of: {', '.join(SHAPES)}",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated subset of: {', '.join(MODES)}",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="interleaved rounds per shape; the minimum is kept (default 5)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help="timed steps per fit (default: per shape); "
        f"--cold: steps per epoch (default {COLD_STEPS})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer steps and 3 repeats (a smoke run, noisier)",
    )
    parser.add_argument(
        "--rss",
        action="store_true",
        help="also measure peak-RSS growth, one child process per mode",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="time each mode's first fit of a fresh model, compiling included",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=COLD_EPOCHS,
        help=f"--cold: epochs per fit (default {COLD_EPOCHS})",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="time the bandwidth floor (one in-place lerp over the model's float "
        f"weights) for every shape, not only those over {FLOOR_PARAMS:,} params",
    )
    parser.add_argument(
        "--strategy",
        choices=["mirrored"],
        default="",
        help="TensorFlow only: build every model under tf.distribute."
        f"MirroredStrategy on {TF_LOGICAL_CPUS} logical CPUs (batch: the global "
        f"batch); modes {', '.join(MIRRORED_MODES)} (the default then)",
    )
    parser.add_argument(
        "--json-out", default="", help="append the JSON lines to this file"
    )
    parser.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected shapes and modes; print tables and JSON lines."""
    args = parse_args(argv)
    if args.strategy:
        if keras.backend.backend() != "tensorflow":
            raise SystemExit(
                "--strategy mirrored runs tf.distribute.MirroredStrategy, which "
                "needs KERAS_BACKEND=tensorflow; received backend "
                f"{keras.backend.backend()!r}"
            )
        use_mirrored_strategy()
    if args.rss_child:
        name, mode, steps = args.rss_child.split(":")
        rss_child(name, mode, int(steps))
        return 0
    shapes = [SHAPES[s] for s in args.shapes.split(",") if s]
    if args.strategy and args.modes == ",".join(MODES):
        args.modes = ",".join(MIRRORED_MODES)
    modes = [m for m in args.modes.split(",") if m]
    if args.strategy and not set(modes) <= set(MIRRORED_MODES):
        raise SystemExit(
            f"--strategy mirrored runs the modes {', '.join(MIRRORED_MODES)}; "
            f"received --modes {args.modes}"
        )
    unknown = sorted(set(modes) - set(MODES))
    if unknown or args.repeats < 1:
        raise SystemExit(f"bad --modes {unknown} or --repeats {args.repeats}")
    if args.cold:
        cold_steps = args.steps or COLD_STEPS
        if (
            args.epochs < 1
            or cold_steps < 2
            or (args.epochs == 1 and cold_steps <= STARTUP_STEPS)
        ):
            raise SystemExit(
                f"--cold needs --epochs >= 1 and --steps >= 2 (> {STARTUP_STEPS} "
                f"with one epoch); received --epochs {args.epochs} --steps "
                f"{cold_steps}"
            )
        if args.rss:
            raise SystemExit("--rss measures the warm mode only; drop --cold or --rss")
        compiles = CompileLog()  # one listener for the whole run
    env = environment()
    print("environment: " + json.dumps(env))
    for shape in shapes:
        start, other_before = time.perf_counter(), other_cpu_seconds()
        if args.cold:
            result = run_shape_cold(
                shape,
                modes,
                args.repeats,
                args.epochs,
                cold_steps,
                compiles,
                first_in_process=shape is shapes[0],
                floor=args.floor,
            )
        else:
            steps = args.steps or (shape.quick_steps if args.quick else shape.steps)
            result = run_shape(shape, modes, args.repeats, steps, args.rss, args.floor)
        result["strategy"] = args.strategy or None
        result["environment"] = env
        result["wall_s"] = round(time.perf_counter() - start, 1)
        result["other_cpu_s"] = round(other_cpu_seconds() - other_before, 1)
        (print_cold_table if args.cold else print_table)(result)
        line = json.dumps(result)
        print("JSON " + line, flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
