"""Post-hoc EMA snapshot files: their names and what each one holds.

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
  (NumPy has no bfloat16; see `keras_ema.posthoc.encoding`).
- `buffer_<i>`: buffer `i` in its own dtype (bfloat16 as uint16 bits).

`fingerprint` identifies the model (`model_fingerprint` computes the
recommended one), `run_id` the training run: the files of one folder must
agree on both, on `sigma_rels` and on `variables`.

Files are read with `allow_pickle=False`, and every entry's npy header is
checked against the JSON header before its data is read; zip CRCs catch
flipped bytes. Every file that cannot be used raises a `ValueError` naming
it (`keras_ema.posthoc.reader`). Writes go to a hidden temporary file in the
same folder, created with mode `0o666` minus the umask like any new file,
then `os.replace`: a crash leaves no partial snapshot (at worst a `.*.tmp`
file, which readers ignore; `keras_ema.posthoc.writer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable

import numpy as np

from keras_ema.posthoc.encoding import STORAGE
from keras_ema.posthoc.encoding import dtype_name

FORMAT = "keras-ema-posthoc-snapshot"
VERSION = 1
NAME_PATTERN = re.compile(r"snapshot-(\d+)\.npz")


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
