"""Warm mode: each mode's ``fit`` timed after a warm-up, and its table."""

from __future__ import annotations

import json
import resource
import time
from typing import Any

import keras
import numpy as np

from benchmarks.overhead.environment import strategy_label
from benchmarks.overhead.floor import FLOOR_PARAMS
from benchmarks.overhead.floor import floor_result
from benchmarks.overhead.floor import floor_round
from benchmarks.overhead.floor import print_floor
from benchmarks.overhead.modes import build_model
from benchmarks.overhead.modes import guard_removed
from benchmarks.overhead.modes import make_callbacks
from benchmarks.overhead.ratios import format_ratios
from benchmarks.overhead.ratios import warm_ratios
from benchmarks.overhead.rss import current_rss_kib
from benchmarks.overhead.rss import measure_rss
from benchmarks.overhead.shapes import SHAPES
from benchmarks.overhead.shapes import Shape
from benchmarks.overhead.shapes import make_data
from benchmarks.overhead.snapshots import SnapshotTimer
from benchmarks.overhead.timing import STARTUP_STEPS
from benchmarks.overhead.timing import StepClock
from benchmarks.overhead.timing import fit_quietly
from benchmarks.overhead.timing import float_elements
from benchmarks.overhead.timing import state_bytes
from benchmarks.overhead.timing import unalias_builtin_ema
from benchmarks.overhead.timing import wait_for_device

WARMUP_STEPS = 12  # covers a keras_ema_every10 averaging step (step 10) as well
METRICS = ("ms_per_step", "steady_ms_per_step", "startup_ms")


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
    callbacks = make_callbacks(mode, model)
    fit_quietly(model, shape, make_data(shape, WARMUP_STEPS), callbacks)
    wait_for_device(model, callbacks)
    unalias_builtin_ema(model)
    data = make_data(shape, steps)
    clock = StepClock(model)
    with SnapshotTimer(callbacks) as snapshots:
        start = time.perf_counter()
        fit_quietly(model, shape, data, [*callbacks, clock])
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


def rss_child(shape_name: str, mode: str, steps: int) -> None:
    """In a child process: peak-RSS growth (KiB) of one full measurement, as JSON."""
    before = current_rss_kib()
    measure(SHAPES[shape_name], mode, steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"rss_growth_kib": peak - before}))


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
    result.update(warm_ratios(result["ms_per_step"]))
    result["steady_ratios"] = warm_ratios(result["steady_ms_per_step"])
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


def print_table(result: dict[str, Any]) -> None:
    """A readable table of one shape's result."""
    print(
        f"\n[{result['backend']}{strategy_label(result)}] {result['shape']}: "
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
        ("ratios (ms/step)", warm_ratios(result["ms_per_step"])),
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
