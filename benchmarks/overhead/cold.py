"""Cold mode: the first ``fit`` of a fresh model, tracing and compiling
included."""

from __future__ import annotations

import time
from typing import Any

import keras

from benchmarks.overhead.compiles import CompileLog
from benchmarks.overhead.compiles import compile_ms
from benchmarks.overhead.compiles import print_compiles
from benchmarks.overhead.environment import strategy_label
from benchmarks.overhead.floor import FLOOR_PARAMS
from benchmarks.overhead.floor import floor_result
from benchmarks.overhead.floor import floor_round
from benchmarks.overhead.floor import print_floor
from benchmarks.overhead.modes import build_model
from benchmarks.overhead.modes import guard_removed
from benchmarks.overhead.modes import make_callbacks
from benchmarks.overhead.ratios import cold_ratios
from benchmarks.overhead.ratios import format_ratios
from benchmarks.overhead.shapes import Shape
from benchmarks.overhead.shapes import make_data
from benchmarks.overhead.timing import STARTUP_STEPS
from benchmarks.overhead.timing import fit_quietly
from benchmarks.overhead.timing import float_elements
from benchmarks.overhead.timing import wait_for_device
from benchmarks.overhead.timing import wait_for_steps

COLD_EPOCHS = 4
COLD_STEPS = 50
COLD_METRICS = ("fit_ms", "first_step_ms", "steady_ms_per_step", "end_ms")


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
    callbacks = make_callbacks(mode, model)
    data = make_data(shape, steps)
    clock = ColdClock(model, epochs, compiles)
    compiles.start()
    start = time.perf_counter()
    fit_quietly(model, shape, data, [*callbacks, clock], epochs)
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
    result["fit_ratios"] = cold_ratios(result["fit_ms"])
    result["steady_ratios"] = cold_ratios(result["steady_ms_per_step"])
    result["fit_ms_all"] = runs["fit_ms"]
    if floors:
        result["floor"] = floor_result(
            floors, first["float_elements"], {"steady": result["steady_ms_per_step"]}
        )
    if keras.backend.backend() == "jax":
        result["compile_ms"] = {m: compile_ms(fastest[m]["compiles"]) for m in modes}
        result["compiles"] = {m: fastest[m]["compiles"] for m in modes}
    return result


def print_cold_table(result: dict[str, Any]) -> None:
    """A readable table of one shape's cold result, and its JAX compiles."""
    print(
        f"\n[{result['backend']}{strategy_label(result)}] {result['shape']} "
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
