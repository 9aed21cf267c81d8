"""EMA state files: a NumPy `.npz` archive with a JSON header, no pickle.

Layout (format version 2):

- `header`: a uint8 array holding UTF-8 JSON: `{"format": "keras-ema-state",
  "version": 2, "step", "skipped", "hyperparameters", "profiles": [names],
  "variables": [{"path", "shape", "dtype"}, ...]}`, and optionally `"extra"`:
  a JSON object of what a callback keeps beside its shadows (the run id of
  `PostHocEMA`). Files without it are read as having `{}`.
- `shadow_<p>_<i>`: the shadow of variable `i` in profile `p`, in `profiles`
  and `variables` order.

Version 1 files (one unnamed profile, `shadow_<i>`, and the article's
`initted` flag, which the step counter determines) are read too.

Files are read with `allow_pickle=False`, so an object array or a pickle
raises instead of executing anything; zip CRCs catch flipped bytes. Writes are
atomic (`keras_ema.saving.atomic`): a crash leaves the previous file intact.
"""

from __future__ import annotations

import errno
import json
import os

import keras
import numpy as np
from keras import ops

from keras_ema.saving.atomic import FolderNotFoundError
from keras_ema.saving.atomic import open_npz
from keras_ema.saving.atomic import reading
from keras_ema.saving.atomic import write_atomically
from keras_ema.saving.weight_paths import difference
from keras_ema.saving.weight_paths import unpaired

FORMAT = "keras-ema-state"
VERSION = 2
# Version 1 also held the article's `initted` flag, which the step counter
# determines; it is read and ignored.
READABLE_VERSIONS = (1, 2)


class StateFileNotFoundError(FileNotFoundError, ValueError):
    """A state file to load, or the folder to save one in, does not exist.

    Keras' `model.load_weights` and `model.save_weights` raise
    `FileNotFoundError` there, as `open` does, so code that resumes a run
    may catch that; every other bad state file is a `ValueError` naming the
    file. This error is both (like `io.UnsupportedOperation`, an `OSError`
    and a `ValueError`), so either `except` clause catches it. Its
    `filename` is the path given.
    """


def make_header(state, hyperparameters: dict, extra: dict | None = None) -> dict:
    """The header describing `state` (its variables current): the counters,
    the hyperparameters, the profiles' names, each variable's path, shape
    and dtype, and the JSON object `extra` if given. Orbax checkpoints
    (`orbax_state`) hold the same header."""
    header = {
        "format": FORMAT,
        "version": VERSION,
        "step": _scalar(state.step),
        "skipped": _scalar(state.skipped),
        "hyperparameters": hyperparameters,
        "profiles": [profile.name for profile in state.profiles],
        "variables": [
            {"path": p, "shape": list(s.shape), "dtype": _dtype(s)}
            for p, s in zip(state.paths, state.shadows, strict=True)
        ],
    }
    if extra is not None:
        header["extra"] = extra
    return header


def save(path: str, state, hyperparameters: dict, extra: dict | None = None) -> None:
    """Writes `state` (its variables current) to `path`, atomically, with the
    JSON object `extra` in the header if given."""
    header = make_header(state, hyperparameters, extra)
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), np.uint8)}
    for p, profile in enumerate(state.profiles):
        for i, shadow in enumerate(profile.shadows):
            arrays[_entry(header, p, i)] = ops.convert_to_numpy(shadow.value)
    try:
        write_atomically(path, lambda file: np.savez(file, **arrays))
    except FolderNotFoundError as error:
        raise StateFileNotFoundError(
            errno.ENOENT,
            f"The folder {error.filename!r} does not exist, so the keras_ema "
            "state file cannot be written",
            os.fspath(path),
        ) from None


def read(path: str) -> tuple[dict, list]:
    """Reads and checks a state file; raises `ValueError` naming `path`
    (`StateFileNotFoundError`, also a `ValueError`, if there is none)."""
    with (
        reading(path, "a valid keras_ema state file", missing=lambda: _missing(path)),
        open_npz(path) as archive,
    ):
        names = set(archive.files)
        if "header" not in names:
            raise ValueError("it has no `header` entry")
        header = json.loads(bytes(archive["header"]).decode())
        check_header(header)
        entries = [
            [_entry(header, p, i) for i in range(len(header["variables"]))]
            for p in range(len(_profiles(header)))
        ]
        expected = {"header"} | {name for row in entries for name in row}
        if names != expected:
            raise ValueError(f"entries {sorted(names ^ expected)} do not fit")
        arrays = [[archive[name] for name in row] for row in entries]
    for row in arrays:
        for spec, array in zip(header["variables"], row, strict=True):
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                raise ValueError(
                    f"{path!r} is corrupt: variable {spec['path']!r} is stored "
                    f"with shape {list(array.shape)} and dtype {array.dtype}, "
                    f"but its header says {spec['shape']} and {spec['dtype']}."
                )
    return header, arrays


def _missing(path) -> StateFileNotFoundError:
    return StateFileNotFoundError(
        errno.ENOENT, "The keras_ema state file does not exist", os.fspath(path)
    )


def match(header: dict, arrays: list, state, path: str) -> list:
    """Pairs the file's shadows with the state's (one list per profile);
    raises on any mismatch.

    The pairing is by position, as Keras pairs the entries of a
    `.weights.h5` file with a model's weights (by the model's structure, not
    by layer names); each pair must have the same shape and dtype, and
    paths that `same_weight` accepts (`weight_paths.difference`).
    """
    saved_profiles = _profiles(header)
    profiles = [profile.name for profile in state.profiles]
    if saved_profiles != profiles:
        raise ValueError(
            f"{path!r} holds the EMA profiles {saved_profiles} but the callback "
            f"has {profiles} (names in order; an EMA without `profiles` has "
            "one profile, named '')."
        )
    saved = header["variables"]
    if len(saved) != len(state.paths):
        missing, extra = unpaired([v["path"] for v in saved], state.paths)
        raise ValueError(
            f"{path!r} holds {len(saved)} EMA variables but the model has "
            f"{len(state.paths)} floating-point weights. Missing from the file: "
            f"{missing[:10]}; not in the model: {extra[:10]}."
        )
    for spec, current, shadow in zip(saved, state.paths, state.shadows, strict=True):
        problem = difference(spec, current, shadow.shape, _dtype(shadow), "the file")
        if problem is not None:
            raise ValueError(f"{path!r} does not fit this model: {problem}.")
    return arrays


def extra(header: dict) -> dict:
    """The header's optional `extra` object (`{}` in files without one)."""
    return header.get("extra", {})


def _profiles(header: dict) -> list[str]:
    return header.get("profiles", [""])


def _entry(header: dict, profile: int, index: int) -> str:
    if header["version"] == 1:
        return f"shadow_{index}"
    return f"shadow_{profile}_{index}"


def check_header(header) -> None:
    """Raises `ValueError` (the reason, without the file's name) unless
    `header` is a well-formed header of a readable version."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("its header does not name the keras-ema-state format")
    version = header.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"unsupported version {version!r}")
    for key in ("step", "skipped") + (("initialized",) if version == 1 else ()):
        value = header.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"`{key}` must be an integer >= 0, got {value!r}")
    variables = header.get("variables")
    if not isinstance(variables, list) or not all(
        isinstance(v, dict)
        and isinstance(v.get("path"), str)
        and isinstance(v.get("shape"), list)
        and isinstance(v.get("dtype"), str)
        for v in variables
    ):
        raise ValueError("its `variables` list is malformed")
    if not isinstance(header.get("hyperparameters"), dict):
        raise ValueError("its `hyperparameters` are malformed")
    if not isinstance(header.get("extra", {}), dict):
        raise ValueError("its `extra` entry is malformed")
    profiles = header.get("profiles", [""] if version == 1 else None)
    if (
        not isinstance(profiles, list)
        or not profiles
        or not all(isinstance(name, str) for name in profiles)
        or len(set(profiles)) != len(profiles)
    ):
        raise ValueError("its `profiles` list is malformed")


def _scalar(variable) -> int:
    return int(ops.convert_to_numpy(variable.value))


def _dtype(variable) -> str:
    return keras.backend.standardize_dtype(variable.dtype)
