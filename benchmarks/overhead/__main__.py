"""The command line: ``python -m benchmarks.overhead [options]``; see the
package's docstring."""

from __future__ import annotations

import argparse
import json
import sys
import time

import keras  # the environment is set by the package, before this import

import benchmarks.overhead
from benchmarks.overhead.cold import COLD_EPOCHS
from benchmarks.overhead.cold import COLD_STEPS
from benchmarks.overhead.cold import print_cold_table
from benchmarks.overhead.cold import run_shape_cold
from benchmarks.overhead.compiles import CompileLog
from benchmarks.overhead.environment import TF_LOGICAL_CPUS
from benchmarks.overhead.environment import environment
from benchmarks.overhead.environment import other_cpu_seconds
from benchmarks.overhead.environment import use_mirrored_strategy
from benchmarks.overhead.floor import FLOOR_PARAMS
from benchmarks.overhead.modes import MIRRORED_MODES
from benchmarks.overhead.modes import MODES
from benchmarks.overhead.shapes import SHAPES
from benchmarks.overhead.timing import STARTUP_STEPS
from benchmarks.overhead.warm import print_table
from benchmarks.overhead.warm import rss_child
from benchmarks.overhead.warm import run_shape


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead",
        description=benchmarks.overhead.__doc__.splitlines()[0],
    )
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
