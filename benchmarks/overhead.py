"""Per-step cost of weight EMA in ``keras.Model.fit``, for one Keras backend.

Six modes are timed on synthetic data, for several model shapes:

* ``none``: plain ``fit`` with Adam, no EMA;
* ``builtin``: Keras' own optimizer flag, ``Adam(use_ema=True, ema_momentum=0.999)``;
* ``keras_ema``: ``keras_ema.EMA(update_every=1, update_after_step=0)`` as a callback;
* ``keras_ema_every10``: the same with ``update_every=10``;
* ``keras_ema_offload`` and ``keras_ema_offload_every10``: the two above with
  ``offload_to_host=True`` (shadows in host memory, updated on the CPU).

Each measurement builds and compiles a fresh model (same seed), runs a short warm-up
``fit`` of 12 steps (so that the first tracing and compilation are not timed), then
times one ``fit`` of ``N`` steps (``epochs=1``, data sized to exactly ``N`` batches,
``verbose=0``) with ``time.perf_counter``. The clock stops after ``fit`` has returned
and the backend's queued work is done (on JAX, every array the model, its optimizer
and the EMA callback hold is blocked on; TensorFlow and torch run synchronously on
CPU). Three numbers come out of that one timed ``fit``:

* ``ms_per_step``: the whole ``fit`` over ``N``. It includes ``fit``'s fixed costs
  (data adapter, callbacks' ``on_train_begin/end``, Keras' ``finalize_variable_values``
  for the built-in EMA) and anything traced or compiled again in that ``fit``;
* ``steady_ms_per_step``: from the start of batch 3 to the end, over ``N - 3``;
* ``startup_ms``: ``fit``'s set-up plus its first 3 steps.

The modes are interleaved (none, builtin, keras_ema, keras_ema_every10, none, ...)
for ``--repeats`` rounds and the minimum of each number per mode is kept; the ratios
(``keras_ema_over_builtin``, ``keras_ema_over_none``, ``builtin_over_none``,
``every10_over_none``, ``offload_over_keras_ema``, ``offload_over_none``,
``offload_every10_over_none``) are computed from those minima, for ``ms_per_step``
at the top level of the JSON and for ``steady_ms_per_step`` under ``steady_ratios``.

Memory: ``state_bytes`` is the bytes held in the optimizer's variables plus the
EMA callback's shadow variables (``keras_ema.EMA.variables``) after the timed ``fit``,
so ``state_bytes[mode] - state_bytes["none"]`` is exactly the EMA's shadow copy
(in host memory for the offload modes; 4 bytes per tracked float32 element; the
callback also tracks non-trainable floats such as BatchNormalization statistics,
the built-in EMA only trainable ones). With ``--rss``, for each mode one child
process builds the model, runs the warm-up and one timed ``fit``, and reports the
growth of its peak resident set (``ru_maxrss`` at the end minus the resident set
just before the model was built). That includes compilation memory, temporaries
and allocator noise: read it for big differences only (the ``big_mlp`` shadow is
42 MiB).

``other_cpu_s`` is the CPU time that other processes used during a shape's run: the
machine has 2 cores, and numbers taken while it is well above 0 are not comparable.

Usage (one backend per process)::

    KERAS_BACKEND=jax python benchmarks/overhead.py [--quick] [--shapes a,b]
        [--modes none,builtin,...] [--repeats 5] [--rss] [--json-out results.jsonl]

Every shape prints a table and one line ``JSON {...}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
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
)
# Each keras_ema mode: (update_every, offload_to_host).
KERAS_EMA_MODES: dict[str, tuple[int, bool]] = {
    "keras_ema": (1, False),
    "keras_ema_every10": (10, False),
    "keras_ema_offload": (1, True),
    "keras_ema_offload_every10": (10, True),
}
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
    if mode not in KERAS_EMA_MODES:
        return []
    import keras_ema

    update_every, offload = KERAS_EMA_MODES[mode]
    return [
        keras_ema.EMA(
            update_every=update_every, update_after_step=0, offload_to_host=offload
        )
    ]


def build_model(shape: Shape, mode: str) -> keras.Model:
    """A freshly built and compiled model (same seed for every mode).

    The previous measurement's model, optimizer and callbacks are freed
    first, so that no mode runs beside the memory of the ones before it.
    """
    keras.backend.clear_session()
    gc.collect()
    keras.utils.set_random_seed(SEED)
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
) -> None:
    """One epoch over ``data``, no shuffling, no output."""
    x, y = data
    model.fit(
        x,
        y,
        batch_size=shape.batch,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )


def measure(shape: Shape, mode: str, steps: int) -> dict[str, Any]:
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
    start = time.perf_counter()
    _fit(model, shape, data, [*callbacks, clock])
    wait_for_device(model, callbacks)
    end = time.perf_counter()
    return {
        "ms_per_step": 1000.0 * (end - start) / steps,
        "steady_ms_per_step": 1000.0 * (end - clock.stamp) / (steps - STARTUP_STEPS),
        "startup_ms": 1000.0 * (clock.stamp - start),
        "params": model.count_params(),
        "trainable_params": sum(
            int(np.prod(v.shape)) for v in model.trainable_variables
        ),
        "variables": len(model.variables),
        "state_bytes": state_bytes(model, callbacks),
    }


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
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    line = [s for s in out.splitlines() if s.startswith("{")][-1]
    return json.loads(line)["rss_growth_kib"] / 1024.0


METRICS = ("ms_per_step", "steady_ms_per_step", "startup_ms")


def run_shape(
    shape: Shape, modes: list[str], repeats: int, steps: int, rss: bool
) -> dict[str, Any]:
    """Interleave the modes ``repeats`` times; keep each metric's minimum per mode."""
    runs: dict[str, dict[str, list[float]]] = {
        k: {m: [] for m in modes} for k in METRICS
    }
    info: dict[str, dict[str, Any]] = {}
    for _ in range(repeats):
        for mode in modes:
            info[mode] = measure(shape, mode, steps)
            for key in METRICS:
                runs[key][mode].append(info[mode][key])
    first = info[modes[0]]
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
    if rss:
        result["rss_growth_mib"] = {m: measure_rss(shape, m, steps) for m in modes}
    return result


def _ratios(best: dict[str, float]) -> dict[str, float]:
    """The overhead ratios computable from the modes that were run."""
    pairs = {
        "keras_ema_over_builtin": ("keras_ema", "builtin"),
        "keras_ema_over_none": ("keras_ema", "none"),
        "builtin_over_none": ("builtin", "none"),
        "every10_over_none": ("keras_ema_every10", "none"),
        "offload_over_keras_ema": ("keras_ema_offload", "keras_ema"),
        "offload_over_none": ("keras_ema_offload", "none"),
        "offload_every10_over_none": ("keras_ema_offload_every10", "none"),
    }
    return {
        k: best[a] / best[b] for k, (a, b) in pairs.items() if a in best and b in best
    }


def print_table(result: dict[str, Any]) -> None:
    """A readable table of one shape's result."""
    print(
        f"\n[{result['backend']}] {result['shape']}: {result['params']:,} params, "
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
        print(f"  {label}: " + ", ".join(f"{k} {v:.4f}" for k, v in ratios.items()))
    if "other_cpu_s" in result:
        print(
            f"  wall {result['wall_s']} s; CPU used by other processes meanwhile: "
            f"{result['other_cpu_s']} s (should be near 0)"
        )


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
        "--steps", type=int, default=0, help="timed steps per fit (default: per shape)"
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
    if args.rss_child:
        name, mode, steps = args.rss_child.split(":")
        rss_child(name, mode, int(steps))
        return 0
    shapes = [SHAPES[s] for s in args.shapes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or args.repeats < 1:
        raise SystemExit(f"bad --modes {unknown} or --repeats {args.repeats}")
    env = environment()
    print("environment: " + json.dumps(env))
    for shape in shapes:
        steps = args.steps or (shape.quick_steps if args.quick else shape.steps)
        start, other_before = time.perf_counter(), other_cpu_seconds()
        result = run_shape(shape, modes, args.repeats, steps, args.rss)
        result["environment"] = env
        result["wall_s"] = round(time.perf_counter() - start, 1)
        result["other_cpu_s"] = round(other_cpu_seconds() - other_before, 1)
        print_table(result)
        line = json.dumps(result)
        print("JSON " + line, flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
