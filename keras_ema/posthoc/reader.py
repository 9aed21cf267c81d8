"""Reading post-hoc EMA snapshot files, every part checked against the
layout of `keras_ema.posthoc.format` before use: `read_snapshot` for a whole
file, and the pieces `PostHocRun` reads one entry at a time."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from keras_ema.checks import is_int
from keras_ema.posthoc.format import FORMAT
from keras_ema.posthoc.format import SNAPSHOT_DTYPES
from keras_ema.posthoc.format import VERSION
from keras_ema.posthoc.format import decode_averaged
from keras_ema.posthoc.format import decode_buffer
from keras_ema.posthoc.format import entry_names
from keras_ema.posthoc.format import expected_layout
from keras_ema.saving import atomic
from keras_ema.schedule import checked_sigma_rels
from keras_ema.schedule import sigma_rel_to_gamma

# The largest JSON header read, in bytes.
_HEADER_LIMIT = 1 << 26


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One snapshot file, read and checked by `read_snapshot`.

    Attributes:
        path: The file.
        header: Its JSON header (see `keras_ema.posthoc.format`).
        averaged: Variable path -> one float32 array per profile.
        buffers: Variable path -> its value (bfloat16 ones as float32).
    """

    path: str
    header: dict
    averaged: dict
    buffers: dict

    @property
    def step(self) -> int:
        return self.header["step"]

    @property
    def sigma_rels(self) -> tuple:
        return tuple(self.header["sigma_rels"])


def read_snapshot(path: str | os.PathLike) -> Snapshot:
    """Reads and checks one snapshot file.

    Example:

    >>> snapshot = read_snapshot("snapshots/snapshot-000000000008.npz")
    >>> snapshot.step
    8
    >>> snapshot.averaged["net/d1/kernel"][0].shape  # as tracked by profile 0
    (6, 8)

    Args:
        path: The file.

    Returns:
        A `Snapshot`. Raises `ValueError` naming the file if it is missing,
        truncated, corrupt, pickled or not a snapshot.
    """
    path = os.fspath(path)
    with reading(path), open_archive(path) as archive:
        header = checked_header(archive)
        averaged, buffers = {}, {}
        for index, spec in enumerate(header["variables"]):
            if spec["kind"] == "averaged":
                averaged[spec["path"]] = [
                    read_averaged(archive, header, index, profile)
                    for profile in range(len(header["sigma_rels"]))
                ]
            else:
                buffers[spec["path"]] = read_buffer(archive, header, index)
    return Snapshot(path, header, averaged, buffers)


def read_header(path: str) -> dict:
    """The checked header of the snapshot at `path` (no array is read)."""
    with reading(path), open_archive(path) as archive:
        return checked_header(archive)


def read_averaged(archive, header: dict, index: int, profile: int) -> np.ndarray:
    """Variable `index` as tracked by profile `profile`, as float32."""
    spec = header["variables"][index]
    stored = _member(archive, f"averaged_{index}_{profile}", header, spec)
    return decode_averaged(stored, header["snapshot_dtype"])


def read_buffer(archive, header: dict, index: int) -> np.ndarray:
    """Buffer `index` in its own dtype (bfloat16 as float32)."""
    spec = header["variables"][index]
    stored = _member(archive, f"buffer_{index}", header, spec)
    return decode_buffer(stored, spec["dtype"])


def reading(path: str):
    """Turns any failure to read `path` into a `ValueError` naming it."""
    return atomic.reading(path, "a valid keras_ema post-hoc EMA snapshot")


def open_archive(path: str):
    """The `.npz` archive at `path` (`atomic.open_npz`), closed on exit."""
    return atomic.open_npz(path)


def checked_header(archive) -> dict:
    """The archive's header, checked together with every entry's npy header
    (shape and dtype), without reading the arrays."""
    if "header" not in archive.files:
        raise ValueError("it has no `header` entry")
    raw = _read_entry(archive, "header", np.dtype(np.uint8), None)
    header = json.loads(bytes(raw).decode())
    _check_header(header)
    expected = {"header"}
    for index, spec in enumerate(header["variables"]):
        expected.update(entry_names(header, index, spec))
    names = set(archive.files)
    if names != expected:
        raise ValueError(f"its entries {sorted(names ^ expected)[:10]} do not fit")
    for index, spec in enumerate(header["variables"]):
        for name in entry_names(header, index, spec):
            with archive.zip.open(name + ".npy") as file:
                _check_npy_header(file, name, *expected_layout(header, spec))
    return header


def _member(archive, name, header, spec) -> np.ndarray:
    return _read_entry(archive, name, *expected_layout(header, spec))


def _read_entry(archive, name, dtype, shape) -> np.ndarray:
    """Reads one entry after checking its npy header; reading it to the end
    makes `zipfile` check its CRC."""
    with archive.zip.open(name + ".npy") as file:
        found_shape = _check_npy_header(file, name, dtype, shape)
        data = file.read()
    count = int(np.prod(found_shape, dtype=np.int64))
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"entry `{name}` holds {len(data)} bytes, not {count}")
    return np.frombuffer(data, dtype=dtype).reshape(found_shape)


def _check_npy_header(file, name, dtype, shape) -> tuple:
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        found_shape, fortran, found_dtype = np.lib.format.read_array_header_1_0(file)
    elif version == (2, 0):
        found_shape, fortran, found_dtype = np.lib.format.read_array_header_2_0(file)
    else:
        raise ValueError(f"entry `{name}` has npy version {version}")
    if fortran or found_dtype != dtype:
        raise ValueError(
            f"entry `{name}` is stored as {found_dtype}"
            f"{' (Fortran order)' if fortran else ''}, not {dtype}"
        )
    if shape is None:
        if len(found_shape) != 1 or found_shape[0] > _HEADER_LIMIT:
            raise ValueError(f"entry `{name}` has shape {found_shape}")
    elif tuple(found_shape) != tuple(shape):
        raise ValueError(
            f"entry `{name}` has shape {tuple(found_shape)}, but the header "
            f"says {tuple(shape)}"
        )
    return tuple(found_shape)


def _check_header(header) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"its header does not name the {FORMAT} format")
    if header.get("version") != VERSION:
        raise ValueError(f"unsupported version {header.get('version')!r}")
    for key in ("step", "update_every"):
        value = header.get(key)
        if not is_int(value) or value < 1:
            raise ValueError(f"`{key}` must be a positive integer, got {value!r}")
    sigma_rels = header.get("sigma_rels")
    gammas = header.get("gammas")
    if not isinstance(sigma_rels, list) or not isinstance(gammas, list):
        raise ValueError("its `sigma_rels` or `gammas` are not lists")
    checked_sigma_rels(sigma_rels)
    if len(gammas) != len(sigma_rels) or not all(
        isinstance(g, float) and abs(g - sigma_rel_to_gamma(s)) <= 1e-9 * g
        for g, s in zip(gammas, sigma_rels, strict=False)
    ):
        raise ValueError(f"its `gammas` {gammas} do not fit `sigma_rels`")
    if header.get("snapshot_dtype") not in SNAPSHOT_DTYPES:
        raise ValueError(f"unknown `snapshot_dtype` {header.get('snapshot_dtype')!r}")
    for key in ("fingerprint", "run_id"):
        if not isinstance(header.get(key), str) or not header[key]:
            raise ValueError(f"its `{key}` is not a non-empty string")
    variables = header.get("variables")
    if not isinstance(variables, list) or not all(_valid_spec(v) for v in variables):
        raise ValueError("its `variables` list is malformed")
    if len({v["path"] for v in variables}) != len(variables):
        raise ValueError("its `variables` repeat a path")


def _valid_spec(spec) -> bool:
    if not (
        isinstance(spec, dict)
        and set(spec) == {"path", "shape", "dtype", "kind"}
        and isinstance(spec["path"], str)
        and isinstance(spec["shape"], list)
        and all(is_int(d) and d >= 0 for d in spec["shape"])
        and isinstance(spec["dtype"], str)
        and spec["kind"] in ("averaged", "buffer")
    ):
        return False
    if spec["dtype"] == "bfloat16":
        return True
    try:
        dtype = np.dtype(spec["dtype"])
    except TypeError:
        return False
    if spec["kind"] == "averaged":
        return dtype.kind == "f"
    return dtype.kind in "biuf" and dtype.name == spec["dtype"]
