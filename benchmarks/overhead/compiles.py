"""The JAX functions traced, lowered and compiled during a cold ``fit``."""

from __future__ import annotations

from typing import Any

import keras

# JAX's duration events for the three stages of compiling one jitted function.
JAX_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}


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
