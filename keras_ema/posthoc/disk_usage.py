"""The line `PostHocEMA` prints about the disk space its snapshots take."""

from __future__ import annotations

import math

# Bytes per averaged value in a snapshot file.
_STORED_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def disk_usage(
    state,
    sigma_rels: tuple,
    snapshot_dtype: str,
    snapshot_every: int,
    max_snapshots: int | None,
    directory: str,
) -> str:
    """The space each snapshot of `state` (a `ShadowState`) takes, per 1,000
    steps, and in all with `max_snapshots`."""
    parameters = sum(math.prod(w.shape) for w in state.weights)
    tracked = {id(w) for w in state.weights}
    buffers = sum(
        math.prod(w.shape) for w in state.model.weights if id(w) not in tracked
    )
    per_snapshot = parameters * _STORED_BYTES[snapshot_dtype] * len(sigma_rels)
    per_thousand = per_snapshot * 1000 / snapshot_every
    line = (
        f"PostHocEMA: each snapshot holds {parameters:,} parameters x "
        f"{len(sigma_rels)} sigma_rels in {snapshot_dtype} "
        f"({_size(per_snapshot)}, plus {buffers:,} buffer values); one "
        f"every {snapshot_every:,} steps takes {_size(per_thousand)} "
        f"per 1,000 steps in {directory!r}"
    )
    if max_snapshots is not None:
        line += f", at most {_size(per_snapshot * max_snapshots)} in all"
    return line + "."


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")
