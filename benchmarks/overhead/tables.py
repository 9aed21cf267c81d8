"""Markdown tables of the benchmark's JSON lines, as `docs/performance.md` shows them.

Usage (from the repository's root)::

    python -m benchmarks.overhead.tables KIND FILE
    python -m benchmarks.overhead.tables compare BEFORE AFTER
    python -m benchmarks.overhead.tables teacher FILE [FILE ...]

KIND, for a file of warm runs: ``warm`` (ms per step and ratios), ``profiles``
(2 and 4 profiles), ``guard`` (keras_ema_noguard), ``floor`` (the bandwidth
floor), ``posthoc`` (PostHocEMA's snapshots), ``snapshots`` (where a
snapshot's time goes), ``offload``; for a file of cold runs (``--cold``):
``cold`` (first fit, whole), ``compiles`` (JAX compile times). ``teacher``
takes any number of warm and cold files (e.g. one of each per backend) and
puts keras_ema_teacher against handwritten_teacher in one table. ``compare``
puts two warm files (e.g. ``before-jax.jsonl after-jax.jsonl``) or two cold
files side by side.

Each cell of a ratio is the whole timed ``fit`` and, in brackets, the steady
state (from batch 3 on; cold: from the second epoch on). When a file holds
several lines for one shape, the last one is used.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from collections.abc import Iterable


def load(path: str) -> dict[str, dict]:
    """The results of one JSON-lines file, by shape."""
    results: dict[str, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                result = json.loads(line)
                results[result["shape"]] = result
    return results


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(result: dict, a: str, b: str, whole: str, steady: str) -> str:
    """`a / b` for the whole `fit` and, in brackets, the steady state."""
    if a not in result[whole] or b not in result[whole]:
        return "-"
    return (
        f"{result[whole][a] / result[whole][b]:.2f} "
        f"({result[steady][a] / result[steady][b]:.2f})"
    )


def warm_ratio(result: dict, a: str, b: str) -> str:
    return ratio(result, a, b, "ms_per_step", "steady_ms_per_step")


def size(result: dict) -> str:
    return f"{result['params']:,} ({result['variables']})"


def warm(results: dict[str, dict]) -> str:
    rows = []
    for shape, r in results.items():
        ms = r["ms_per_step"]
        rows.append(
            [
                shape,
                size(r),
                *(f"{ms[m]:.3f}" for m in ("none", "builtin", "keras_ema")),
                warm_ratio(r, "keras_ema", "builtin"),
                warm_ratio(r, "keras_ema", "none"),
                warm_ratio(r, "keras_ema_every10", "none"),
            ]
        )
    header = ["shape", "params (variables)", "ms/step none", "builtin"]
    header += ["keras_ema", "keras_ema / builtin", "keras_ema / none"]
    return table(header + ["every10 / none"], rows)


def _marginal(r: dict, mode: str, k: int, key: str) -> str:
    ms = r[key]
    one = ms["keras_ema"] - ms["none"]
    if one <= 0 or mode not in ms:
        return "-"
    return f"{(ms[mode] - ms['none']) / (k * one):.2f}"


def profiles(results: dict[str, dict]) -> str:
    rows = []
    for shape, r in results.items():
        row = [shape, warm_ratio(r, "keras_ema", "builtin")]
        for mode, k in (("keras_ema_2profiles", 2), ("keras_ema_4profiles", 4)):
            row.append(warm_ratio(r, mode, "builtin"))
            row.append(
                f"{_marginal(r, mode, k, 'ms_per_step')} "
                f"({_marginal(r, mode, k, 'steady_ms_per_step')})"
            )
        rows.append(row)
    header = ["shape", "1 profile / builtin", "2 profiles / builtin"]
    header += ["2: added / (2 x one's)", "4 profiles / builtin"]
    return table(header + ["4: added / (4 x one's)"], rows)


def guard(results: dict[str, dict]) -> str:
    rows = []
    for shape, r in results.items():
        ms, steady = r["ms_per_step"], r["steady_ms_per_step"]
        if "keras_ema_noguard" not in ms:
            continue
        share = [
            (t["keras_ema"] - t["keras_ema_noguard"]) / (t["keras_ema"] - t["none"])
            if t["keras_ema"] > t["none"]
            else None
            for t in (ms, steady)
        ]
        shares = " ".join(
            "-" if s is None else (f"{s:.2f}" if i == 0 else f"({s:.2f})")
            for i, s in enumerate(share)
        )
        rows.append(
            [
                shape,
                f"{ms['keras_ema']:.3f}",
                f"{ms['keras_ema_noguard']:.3f}",
                f"{ms['keras_ema'] - ms['keras_ema_noguard']:+.3f}",
                shares,
                warm_ratio(r, "keras_ema_noguard", "builtin"),
            ]
        )
    header = ["shape", "keras_ema ms/step", "without guard", "guard ms/step"]
    header += ["guard / EMA's cost", "without guard / builtin"]
    return table(header, rows)


def posthoc(results: dict[str, dict], snapshot_every: int = 10) -> str:
    rows = []
    for shape, r in results.items():
        ms = r["ms_per_step"]
        if "keras_ema_posthoc" not in ms:
            continue
        added = ms["keras_ema_posthoc"] - ms["keras_ema_2profiles"]
        rows.append(
            [
                shape,
                f"{ms['keras_ema_2profiles']:.3f}",
                f"{ms['keras_ema_posthoc']:.3f}",
                f"{added * snapshot_every:.2f}",
                warm_ratio(r, "keras_ema_posthoc", "keras_ema_2profiles"),
                warm_ratio(r, "keras_ema_posthoc", "builtin"),
            ]
        )
    header = ["shape", "2 profiles ms/step", "PostHocEMA ms/step"]
    header += ["ms per snapshot", "PostHocEMA / 2 profiles", "PostHocEMA / builtin"]
    return table(header, rows)


SNAPSHOT_PARTS = {
    "device": "queued steps",
    "wait": "previous file",
    "sync": "model sync",
    "averages": "averages to host",
    "buffers": "buffers to host",
    # Parts of files written before the averages were copied straight from
    # the engine: the flush into the variables, then one copy of everything.
    "flush": "flush",
    "copy": "host copy",
}


def snapshots(results: dict[str, dict]) -> str:
    rows, parts_seen = [], []
    for r in results.values():
        parts_seen += [p for p in r.get("snapshot_ms", {}) if p in SNAPSHOT_PARTS]
    columns = [p for p in SNAPSHOT_PARTS if p in parts_seen]
    for shape, r in results.items():
        parts = r.get("snapshot_ms")
        if parts is None:
            continue
        row = [shape, str(parts["count"]), f"{parts['block']:.2f}"]
        row += [f"{parts[p]:.2f}" if p in parts else "-" for p in columns]
        rows.append([*row, f"{parts['write']:.2f}"])
    header = ["shape", "snapshots per fit", "blocking ms"]
    header += [f"of which {SNAPSHOT_PARTS[p]}" for p in columns]
    return table([*header, "writing ms (writer thread)"], rows)


def floor(results: dict[str, dict]) -> str:
    rows = []
    for shape, r in results.items():
        f = r.get("floor")
        if not f:
            continue
        ms = r["ms_per_step"]
        rows.append(
            [
                shape,
                f"{f['elements']:,}",
                f"{f['lerp_ms']:.3f}",
                f"{f['lerp_gb_per_s']:.1f}",
                f"{ms['keras_ema'] - ms['none']:.3f}",
                f"{f['ms_per_step_ema_over_lerp']:.2f} "
                f"({f['steady_ema_over_lerp']:.2f})",
                _update_alone(r) or "-",
            ]
        )
    header = ["shape", "float elements", "lerp ms", "lerp GB/s"]
    header += ["keras_ema - none, ms/step", "(keras_ema - none) / lerp"]
    header += ["update alone ms (/ lerp)"]
    return table(header, rows)


def _milliseconds(by_mode: dict[str, float], mode: str, digits: int = 0) -> str:
    """A mode's figure, or "-" for a mode the run left out."""
    return f"{by_mode[mode]:,.{digits}f}" if mode in by_mode else "-"


def cold(results: dict[str, dict]) -> str:
    rows = []
    for shape, r in results.items():
        fit, first, end = r["fit_ms"], r["first_step_ms"], r["end_ms"]
        rows.append(
            [
                shape,
                *(_milliseconds(fit, m) for m in ("none", "builtin", "keras_ema")),
                ratio(r, "keras_ema", "builtin", "fit_ms", "steady_ms_per_step"),
                ratio(r, "keras_ema", "none", "fit_ms", "steady_ms_per_step"),
                ratio(
                    r, "keras_ema_every10", "builtin", "fit_ms", "steady_ms_per_step"
                ),
                f"{_milliseconds(first, 'builtin')} / "
                f"{_milliseconds(first, 'keras_ema')}",
                f"{_milliseconds(end, 'builtin', 1)} / "
                f"{_milliseconds(end, 'keras_ema', 1)}",
            ]
        )
    header = ["shape", "fit ms none", "builtin", "keras_ema"]
    header += ["keras_ema / builtin", "keras_ema / none", "every10 / builtin"]
    header += ["first step ms, builtin / keras_ema", "end of fit ms"]
    return table(header, rows)


def _compile_total(entries: list[dict], match: Callable[[dict], bool]) -> str:
    chosen = [e for e in entries if match(e)]
    if not chosen:
        return "-"
    stages = ("trace_ms", "lower_ms", "compile_ms")
    return f"{sum(e[s] for e in chosen for s in stages):,.0f}"


def compiles(results: dict[str, dict]) -> str:
    rows = []
    for shape, r in results.items():
        if "compiles" not in r:
            continue
        builtin, ema = r["compiles"]["builtin"], r["compiles"]["keras_ema"]
        every10 = r["compiles"].get("keras_ema_every10", [])
        rows.append(
            [
                shape,
                _compile_total(builtin, lambda e: "train_step" in e["function"]),
                _compile_total(ema, lambda e: "fused_step" in e["function"]),
                _compile_total(every10, lambda e: "due_update" in e["function"]),
                _milliseconds(r["compile_ms"], "builtin"),
                _milliseconds(r["compile_ms"], "keras_ema"),
                _milliseconds(r["compile_ms"], "keras_ema_every10"),
                str(sum(e["compiles"] for e in ema if e["phase"] == "end")),
            ]
        )
    header = ["shape", "builtin: train_step ms", "keras_ema: fused_step ms"]
    header += ["every10: due_update ms", "all compiles ms, builtin", "keras_ema"]
    header += ["every10", "keras_ema compiles at end"]
    return table(header, rows)


def offload(results: dict[str, dict]) -> str:
    rows = []
    for shape, r in results.items():
        ms = r["ms_per_step"]
        rows.append(
            [
                shape,
                *(
                    f"{ms[m]:.3f}"
                    for m in ("none", "keras_ema_offload", "keras_ema_offload_every10")
                ),
                warm_ratio(r, "keras_ema_offload", "none"),
                warm_ratio(r, "keras_ema_offload_every10", "none"),
            ]
        )
    header = ["shape", "ms/step none", "offload", "offload, every 10"]
    return table(header + ["offload / none", "offload every 10 / none"], rows)


COMPARED_MODES = {
    "keras_ema": "keras_ema",
    "keras_ema_every10": "every10",
    "keras_ema_noguard": "without guard",
}


def _before_after(
    before: dict[str, dict],
    after: dict[str, dict],
    key: str,
    columns: dict[str, Callable[[dict, str], str]],
    per_shape: dict[str, Callable[[dict], str]] | None = None,
) -> str:
    """One row per shape both runs measured, and for each mode of
    `COMPARED_MODES` that both measured (under `key`), one "before / after"
    cell per column: `columns` maps a column's name to the cell's text for
    one run and mode. `per_shape`: columns of one cell per run, where every
    run has one (the text for a run, or `None`)."""
    pairs = [(b, after[shape]) for shape, b in before.items() if shape in after]
    modes = [
        mode
        for mode in COMPARED_MODES
        if all(mode in r[key] for pair in pairs for r in pair)
    ]
    shared = {
        name: cell
        for name, cell in (per_shape or {}).items()
        if all(cell(r) is not None for pair in pairs for r in pair)
    }
    rows = []
    for b, a in pairs:
        row = [a["shape"]]
        for mode in modes:
            row += [f"{cell(b, mode)} / {cell(a, mode)}" for cell in columns.values()]
        row += [f"{cell(b)} / {cell(a)}" for cell in shared.values()]
        rows.append(row)
    header = ["shape"]
    for mode in modes:
        header += [f"{COMPARED_MODES[mode]} {name}, before / after" for name in columns]
    header += [f"{name}, before / after" for name in shared]
    return table(header, rows)


def _update_alone(result: dict) -> str | None:
    """The update timed alone, in ms and (in brackets) in lerps."""
    f = result.get("floor") or {}
    if "update_ms" not in f:
        return None
    return f"{f['update_ms']:.3f} ({f['update_over_lerp']:.2f})"


def compare(before: dict[str, dict], after: dict[str, dict]) -> str:
    """Before and after, warm: ms a step and the ratio to the built-in, and
    the update alone where both runs timed it (`--floor`)."""
    return _before_after(
        before,
        after,
        "ms_per_step",
        {
            "ms/step": lambda r, mode: f"{r['ms_per_step'][mode]:.3f}",
            "/ builtin": lambda r, mode: warm_ratio(r, mode, "builtin"),
        },
        {"update alone ms (lerps)": _update_alone},
    )


def compare_cold(before: dict[str, dict], after: dict[str, dict]) -> str:
    """Before and after, cold: the whole first `fit`, its ratio to the
    built-in's, and the time spent compiling in it."""
    return _before_after(
        before,
        after,
        "fit_ms",
        {
            "fit ms": lambda r, mode: f"{r['fit_ms'][mode]:,.0f}",
            "/ builtin": lambda r, mode: (
                f"{r['fit_ms'][mode] / r['fit_ms']['builtin']:.2f}"
            ),
            # JAX only: "-" on the other backends.
            "compiles ms": lambda r, mode: _milliseconds(r.get("compile_ms", {}), mode),
        },
    )


TEACHER_PAIR = ("keras_ema_teacher", "handwritten_teacher")


def teacher(runs: list[dict[str, dict]]) -> str:
    """keras_ema_teacher against handwritten_teacher, one row per backend,
    shape and warm or cold file, with the CPU time other processes used
    meanwhile (the rows where it is well above 0 are noisy)."""
    rows, pair = [], TEACHER_PAIR[::-1]
    for results in runs:
        for shape, r in results.items():
            cold_run = bool(r.get("cold"))
            whole = "fit_ms" if cold_run else "ms_per_step"
            unit = "first fit ms" if cold_run else "ms/step"
            if not set(TEACHER_PAIR) <= r[whole].keys():
                continue
            ms = [_milliseconds(r[whole], m, 0 if cold_run else 3) for m in pair]
            cell = ratio(r, *TEACHER_PAIR, whole, "steady_ms_per_step")
            load = f"{r.get('other_cpu_s', '-')} / {r.get('wall_s', '-')}"
            rows.append([r["backend"], shape, unit, load, *ms, cell])
    header = ["backend", "shape", "measure", "other CPU s / wall s"]
    header += ["hand-written", "keras_ema_teacher"]
    return table([*header, "keras_ema_teacher / hand-written"], rows)


KINDS = {
    "warm": warm,
    "profiles": profiles,
    "guard": guard,
    "floor": floor,
    "posthoc": posthoc,
    "snapshots": snapshots,
    "cold": cold,
    "compiles": compiles,
    "offload": offload,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead.tables",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("kind", choices=[*KINDS, "compare", "teacher"])
    parser.add_argument(
        "files", nargs="+", help="JSON-lines files of python -m benchmarks.overhead"
    )
    args = parser.parse_args(argv)
    if args.kind == "compare":
        before, after = (load(path) for path in args.files)
        cold_runs = all(r.get("cold") for r in before.values())
        print((compare_cold if cold_runs else compare)(before, after))
    elif args.kind == "teacher":
        print(teacher([load(path) for path in args.files]))
    else:
        print(KINDS[args.kind](load(args.files[0])))


if __name__ == "__main__":
    main()
