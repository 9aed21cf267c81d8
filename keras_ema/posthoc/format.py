"""Post-hoc EMA snapshot files: their names, what each one holds, how it
stores its values, and the disk space they take.

Layout (format `keras-ema-posthoc-snapshot`, version 1), one NumPy `.npz`
archive per snapshot, no pickle, named `snapshot-<step, 12 digits or
more>.npz` so that names sort by step:

- `header`: a uint8 array holding UTF-8 JSON: `{"format", "version", "step",
  "sigma_rels", "gammas", "update_every", "snapshot_dtype", "fingerprint",
  "run_id", "variables": [{"path", "shape", "dtype", "kind"}, ...]}`. `kind`
  is `"averaged"` (tracked by every profile and mixed by the synthesis) or
  `"buffer"` (the online value, stored once and never mixed: a mix of
  BatchNormalization variances can come out negative). `dtype` is the dtype
  of the value handed to the writer. `gammas` are the profiles' exponents,
  for reference; readers check that they fit `sigma_rels`.
- `averaged_<i>_<k>`: variable `i` (its index in `variables`) as tracked by
  profile `k` (its index in `sigma_rels`), stored as `snapshot_dtype`:
  float32, float16, or bfloat16 kept as its raw bits in a uint16 array
  (NumPy has no bfloat16).
- `buffer_<i>`: buffer `i` in its own dtype (bfloat16 as uint16 bits).

`fingerprint` identifies the model (`model_fingerprint` computes the
recommended one), `run_id` the training run: the files of one folder must
agree on both, on `sigma_rels` and on `variables`.

Files are read with `allow_pickle=False`, and every entry's npy header is
checked against the JSON header before its data is read; zip CRCs catch
flipped bytes. Every file that cannot be used raises a `ValueError` naming
it (`keras_ema.posthoc.reader`). Writes are atomic
(`keras_ema.saving.atomic`, from `keras_ema.posthoc.writer`): a crash leaves
no partial snapshot (at worst a `.*.tmp` file, which readers ignore).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable

import numpy as np

FORMAT = "keras-ema-posthoc-snapshot"
VERSION = 1
NAME_PATTERN = re.compile(r"snapshot-(\d+)\.npz")
SNAPSHOT_DTYPES = ("float32", "float16", "bfloat16")
# Stored dtype of each `snapshot_dtype` (NumPy has no bfloat16: its bits).
STORAGE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


def snapshot_filename(step: int) -> str:
    """The file name of the snapshot at `step`: `snapshot-000000001234.npz`."""
    return f"snapshot-{step:012d}.npz"


def snapshot_step(folder: str, name: str) -> int | None:
    """The step of the snapshot file `name` in `folder`, or `None` if the
    name is not a snapshot's (`snapshot-*.npz`); raises a `ValueError`
    naming the file for a `snapshot-*.npz` name that is not
    `snapshot_filename` of a step."""
    if not (name.startswith("snapshot-") and name.endswith(".npz")):
        return None
    match = NAME_PATTERN.fullmatch(name)
    if not match or snapshot_filename(int(match.group(1))) != name:
        path = os.path.join(folder, name)
        raise ValueError(
            f"{path!r} is not a valid keras_ema post-hoc EMA snapshot: its "
            "name is not `snapshot-<step, 12 digits>.npz`."
        )
    return int(match.group(1))


def model_fingerprint(variables: Iterable) -> str:
    """The recommended `fingerprint` of a model for `write_snapshot`.

    It is the hex SHA-256 of the compact JSON of the sorted list of
    `[path, shape, dtype]` of the variables: equal for two models with the
    same variables whatever their order, different as soon as a path, shape
    or dtype differs.

    Example:

    >>> fingerprint = model_fingerprint(model.weights)

    Args:
        variables: Keras variables (anything with `path`, `shape` and
            `dtype`) or `(path, shape, dtype)` tuples.
    """
    specs = []
    for variable in variables:
        if isinstance(variable, tuple):
            path, shape, dtype = variable
        else:
            path, shape, dtype = variable.path, variable.shape, variable.dtype
        specs.append([str(path), [int(d) for d in shape], dtype_name(dtype)])
    text = json.dumps(sorted(specs), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def entry_names(header: dict, index: int, spec: dict) -> list:
    """The archive entries of variable `index`, described by `spec`."""
    if spec["kind"] == "buffer":
        return [f"buffer_{index}"]
    return [f"averaged_{index}_{k}" for k in range(len(header["sigma_rels"]))]


def expected_layout(header: dict, spec: dict) -> tuple:
    """`(dtype, shape)` of each stored entry of the variable `spec`."""
    if spec["kind"] == "averaged":
        storage = STORAGE[header["snapshot_dtype"]]
    else:
        storage = "uint16" if spec["dtype"] == "bfloat16" else spec["dtype"]
    return np.dtype(storage), tuple(spec["shape"])


# ------------------------------------------------------------------
# Stored values


def dtype_name(dtype) -> str:
    """The name of a NumPy or Keras dtype, `"bfloat16"` included."""
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype)


def is_float(dtype) -> bool:
    """Whether `dtype` is a floating-point dtype, bfloat16 included."""
    return dtype_name(dtype) == "bfloat16" or np.dtype(dtype).kind == "f"


def is_numeric(dtype) -> bool:
    """Whether `dtype` is a bool, integer or floating-point dtype."""
    return dtype_name(dtype) == "bfloat16" or np.dtype(dtype).kind in "biuf"


def encode_averaged(path: str, value, dtype: str) -> np.ndarray:
    """An averaged value as stored in the snapshot dtype `dtype`; raises a
    `ValueError` naming `path` if a finite value overflows it."""
    value32 = np.ascontiguousarray(value, dtype=np.float32)
    if dtype == "float32":
        return value32
    if dtype == "float16":
        with np.errstate(over="ignore"):
            stored = value32.astype(np.float16)
    else:
        stored = _bfloat16_bits(value32)
    overflow = ~np.isfinite(decode_averaged(stored, dtype)) & np.isfinite(value32)
    if overflow.any():
        raise ValueError(
            f"`dtype` must represent every averaged value: {path!r} holds "
            f"{value32[overflow].flat[0]!r}, which overflows {dtype}. "
            f"Received: dtype={dtype!r}"
        )
    return stored


def encode_buffer(value: np.ndarray) -> np.ndarray:
    """A buffer as stored: in its own dtype, bfloat16 as uint16 bits."""
    if dtype_name(value.dtype) == "bfloat16":
        return _bfloat16_bits(np.asarray(value, dtype=np.float32))
    return np.ascontiguousarray(value)


def _bfloat16_bits(value32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(value32, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    quiet_nan = (bits >> 16) | np.uint32(0x0040)
    return np.where(np.isnan(value32), quiet_nan, rounded).astype(np.uint16)


def decode_averaged(stored: np.ndarray, snapshot_dtype: str) -> np.ndarray:
    """A stored averaged value as a new float32 array."""
    if snapshot_dtype == "bfloat16":
        return _bfloat16_to_float32(stored)
    return stored.astype(np.float32)


def decode_buffer(stored: np.ndarray, dtype: str) -> np.ndarray:
    """A stored buffer as a new array of its own dtype (bfloat16: float32)."""
    if dtype == "bfloat16":
        return _bfloat16_to_float32(stored)
    return stored.copy()


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ------------------------------------------------------------------
# Disk space


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
    stored_bytes = np.dtype(STORAGE[snapshot_dtype]).itemsize
    per_snapshot = parameters * stored_bytes * len(sigma_rels)
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
