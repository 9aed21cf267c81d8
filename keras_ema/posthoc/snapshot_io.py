"""Post-hoc EMA snapshot files: a NumPy `.npz` archive per step, with a JSON
header, no pickle.

Layout (format `keras-ema-posthoc-snapshot`, version 1), one file per
snapshot, named `snapshot-<step, 12 digits or more>.npz` so that names sort
by step:

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
it. Writes go to a hidden temporary file in the same folder, created with
mode `0o666` minus the umask like any new file, then `os.replace`: a crash
leaves no partial snapshot (at worst a `.*.tmp` file, which readers ignore).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np

from keras_ema.checks import is_int
from keras_ema.schedule import checked_sigma_rels
from keras_ema.schedule import sigma_rel_to_gamma

FORMAT = "keras-ema-posthoc-snapshot"
VERSION = 1
SNAPSHOT_DTYPES = ("float32", "float16", "bfloat16")
NAME_PATTERN = re.compile(r"snapshot-(\d+)\.npz")
# Stored dtype of each `snapshot_dtype` (NumPy has no bfloat16: its bits).
_STORAGE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
_HEADER_LIMIT = 1 << 26


def snapshot_filename(step: int) -> str:
    """The file name of the snapshot at `step`: `snapshot-000000001234.npz`."""
    return f"snapshot-{step:012d}.npz"


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


def write_snapshot(
    directory: str | os.PathLike,
    step: int,
    sigma_rels: Sequence[float],
    update_every: int,
    averaged: Mapping[str, Sequence[np.ndarray]],
    buffers: Mapping[str, np.ndarray],
    fingerprint: str,
    run_id: str,
    dtype: str = "float32",
) -> str:
    """Writes one post-hoc EMA snapshot, atomically.

    The snapshot holds, for every averaged variable, its value under each
    tracked profile, and for every buffer its online value. The file goes to
    `directory/snapshot_filename(step)` (replacing one of the same step): a
    temporary file in `directory` first, then `os.replace`. The directory is
    created if needed. Values are validated before anything is written.

    Example:

    >>> write_snapshot(
    ...     "snapshots", step=4096, sigma_rels=(0.05, 0.10), update_every=1,
    ...     averaged={"net/dense/kernel": [kernel_005, kernel_010]},
    ...     buffers={"net/bn/moving_mean": mean},
    ...     fingerprint=model_fingerprint(model.weights), run_id="run-1",
    ... )

    Args:
        directory: The folder of the run's snapshots.
        step: The step of the snapshot (optimizer steps taken), >= 1: the
            time of every profile in it.
        sigma_rels: The tracked `sigma_rel`s, distinct, in `(0, 12**-0.5)`.
        update_every: How often the profiles were updated, in steps;
            recorded as metadata.
        averaged: Variable path -> one floating-point array per profile, in
            `sigma_rels` order, all of the variable's shape.
        buffers: Variable path -> its online value (numeric).
        fingerprint: A string identifying the model, e.g.
            `model_fingerprint(model.weights)`.
        run_id: A string identifying the training run.
        dtype: How averaged values are stored: `"float32"`, `"float16"` or
            `"bfloat16"`. Defaults to `"float32"`.

    Returns:
        The path of the file written.
    """
    header, arrays = _snapshot_contents(
        step, sigma_rels, update_every, averaged, buffers, fingerprint, run_id, dtype
    )
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, snapshot_filename(step))
    _write_atomically(path, arrays)
    return path


def _snapshot_contents(
    step, sigma_rels, update_every, averaged, buffers, fingerprint, run_id, dtype
):
    if not is_int(step) or step < 1:
        raise ValueError(f"`step` must be a positive integer. Received: step={step!r}")
    sigma_rels = tuple(float(s) for s in checked_sigma_rels(sigma_rels))
    if not is_int(update_every) or update_every < 1:
        raise ValueError(
            "`update_every` must be a positive integer. "
            f"Received: update_every={update_every!r}"
        )
    for name, value in (("fingerprint", fingerprint), ("run_id", run_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"`{name}` must be a non-empty string. Received: {name}={value!r}"
            )
    if dtype not in SNAPSHOT_DTYPES:
        raise ValueError(
            f"`dtype` must be one of {SNAPSHOT_DTYPES}. Received: dtype={dtype!r}"
        )
    shared = set(averaged) & set(buffers)
    if shared:
        raise ValueError(
            "`averaged` and `buffers` must not share a path. "
            f"Received: both hold {sorted(shared)[:10]}"
        )
    variables, arrays = [], {}
    for path, values in averaged.items():
        index = len(variables)
        values = _averaged_values(path, values, len(sigma_rels))
        variables.append(_spec(path, values[0], "averaged"))
        for profile, value in enumerate(values):
            arrays[f"averaged_{index}_{profile}"] = _encode_averaged(path, value, dtype)
    for path, value in buffers.items():
        index = len(variables)
        value = np.asarray(value)
        if not _is_numeric(value.dtype):
            raise ValueError(
                f"`buffers` must hold numeric arrays. Received: "
                f"buffers[{path!r}] of dtype {value.dtype}"
            )
        variables.append(_spec(path, value, "buffer"))
        arrays[f"buffer_{index}"] = _encode_buffer(value)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "sigma_rels": list(sigma_rels),
        "gammas": [sigma_rel_to_gamma(s) for s in sigma_rels],
        "update_every": int(update_every),
        "snapshot_dtype": dtype,
        "fingerprint": fingerprint,
        "run_id": run_id,
        "variables": variables,
    }
    return header, arrays


def _averaged_values(path, values, profiles) -> list:
    if isinstance(values, np.ndarray) or not isinstance(values, Sequence):
        raise ValueError(
            "`averaged` must map each path to a list of arrays, one per profile. "
            f"Received: averaged[{path!r}] of type {type(values).__name__}"
        )
    values = [np.asarray(v) for v in values]
    if len(values) != profiles:
        raise ValueError(
            f"`averaged` must hold one array per profile ({profiles}). "
            f"Received: {len(values)} arrays for averaged[{path!r}]"
        )
    for value in values:
        if not _is_float(value.dtype):
            raise ValueError(
                "`averaged` must hold floating-point arrays. "
                f"Received: averaged[{path!r}] of dtype {value.dtype}"
            )
        if value.shape != values[0].shape or value.dtype != values[0].dtype:
            raise ValueError(
                "`averaged` must hold arrays of one shape and dtype per path. "
                f"Received: averaged[{path!r}] with shapes "
                f"{[v.shape for v in values]} and dtypes "
                f"{[str(v.dtype) for v in values]}"
            )
    return values


def _spec(path, value, kind) -> dict:
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"Variable paths must be non-empty strings. Received: path={path!r}"
        )
    return {
        "path": path,
        "shape": list(value.shape),
        "dtype": dtype_name(value.dtype),
        "kind": kind,
    }


def _encode_averaged(path, value, dtype) -> np.ndarray:
    value32 = np.ascontiguousarray(value, dtype=np.float32)
    if dtype == "float32":
        return value32
    if dtype == "float16":
        with np.errstate(over="ignore"):
            stored = value32.astype(np.float16)
    else:
        stored = _bfloat16_bits(value32)
    overflow = ~np.isfinite(_decode_averaged(stored, dtype)) & np.isfinite(value32)
    if overflow.any():
        raise ValueError(
            f"`dtype` must represent every averaged value: {path!r} holds "
            f"{value32[overflow].flat[0]!r}, which overflows {dtype}. "
            f"Received: dtype={dtype!r}"
        )
    return stored


def _encode_buffer(value) -> np.ndarray:
    if dtype_name(value.dtype) == "bfloat16":
        return _bfloat16_bits(np.asarray(value, dtype=np.float32))
    return np.ascontiguousarray(value)


def _bfloat16_bits(value32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(value32, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    quiet_nan = (bits >> 16) | np.uint32(0x0040)
    return np.where(np.isnan(value32), quiet_nan, rounded).astype(np.uint16)


def _decode_averaged(stored: np.ndarray, snapshot_dtype: str) -> np.ndarray:
    """A stored averaged value as a new float32 array."""
    if snapshot_dtype == "bfloat16":
        return _bfloat16_to_float32(stored)
    return stored.astype(np.float32)


def _decode_buffer(stored: np.ndarray, dtype: str) -> np.ndarray:
    """A stored buffer as a new array of its own dtype (bfloat16: float32)."""
    if dtype == "bfloat16":
        return _bfloat16_to_float32(stored)
    return stored.copy()


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _write_atomically(path: str, arrays: dict) -> None:
    folder, name = os.path.split(path)
    # `os.open` with mode 0o666 lets the kernel apply the umask, as for any
    # new file (`tempfile.mkstemp` would make it 0o600).
    while True:
        temporary = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            handle = os.open(
                temporary,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                0o666,
            )
        except FileExistsError:
            continue
        break
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    """Makes the rename durable where the platform allows it."""
    with contextlib.suppress(OSError, AttributeError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def dtype_name(dtype) -> str:
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype)


def _is_float(dtype) -> bool:
    return dtype_name(dtype) == "bfloat16" or np.dtype(dtype).kind == "f"


def _is_numeric(dtype) -> bool:
    return dtype_name(dtype) == "bfloat16" or np.dtype(dtype).kind in "biuf"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One snapshot file, read and checked by `read_snapshot`.

    Attributes:
        path: The file.
        header: Its JSON header (see the module docstring).
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

    >>> snapshot = read_snapshot("snapshots/snapshot-000000004096.npz")
    >>> snapshot.averaged["net/dense/kernel"][0]  # as tracked by profile 0

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
    return _decode_averaged(stored, header["snapshot_dtype"])


def read_buffer(archive, header: dict, index: int) -> np.ndarray:
    """Buffer `index` in its own dtype (bfloat16 as float32)."""
    spec = header["variables"][index]
    stored = _member(archive, f"buffer_{index}", header, spec)
    return _decode_buffer(stored, spec["dtype"])


@contextlib.contextmanager
def reading(path: str):
    """Turns any failure to read `path` into a `ValueError` naming it."""
    try:
        yield
    except ValueError as error:
        raise ValueError(
            f"{path!r} is not a valid keras_ema post-hoc EMA snapshot: {error}"
        ) from None
    except Exception as error:
        # A damaged zip can fail deep inside `zipfile`/`zlib`/`json` with almost
        # any exception type: every one of them means an unusable snapshot.
        raise ValueError(
            f"{path!r} is not a valid keras_ema post-hoc EMA snapshot (unreadable, "
            f"truncated or corrupt): {type(error).__name__}: {error}"
        ) from None


def open_archive(path: str):
    """`np.load` without pickle, refusing anything but an `.npz` archive."""
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError("it is a single .npy array, not an .npz archive")
    return archive


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
        expected.update(_entry_names(header, index, spec))
    names = set(archive.files)
    if names != expected:
        raise ValueError(f"its entries {sorted(names ^ expected)[:10]} do not fit")
    for index, spec in enumerate(header["variables"]):
        for name in _entry_names(header, index, spec):
            with archive.zip.open(name + ".npy") as file:
                _check_npy_header(file, name, *_expected_layout(header, spec))
    return header


def _entry_names(header, index, spec) -> list:
    if spec["kind"] == "buffer":
        return [f"buffer_{index}"]
    return [f"averaged_{index}_{k}" for k in range(len(header["sigma_rels"]))]


def _expected_layout(header, spec) -> tuple:
    if spec["kind"] == "averaged":
        storage = _STORAGE[header["snapshot_dtype"]]
    else:
        storage = "uint16" if spec["dtype"] == "bfloat16" else spec["dtype"]
    return np.dtype(storage), tuple(spec["shape"])


def _member(archive, name, header, spec) -> np.ndarray:
    return _read_entry(archive, name, *_expected_layout(header, spec))


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
