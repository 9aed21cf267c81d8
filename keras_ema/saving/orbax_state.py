"""The EMA state inside Orbax checkpoints (`keras.callbacks.OrbaxCheckpoint`).

Keras' `OrbaxCheckpoint` (Keras 3.14+) saves each step as a folder of
named "checkpointables": `pytree` (Keras' variables), `model_config`,
`assets`. While an `EMA` is attached to a model (`sidecars.py`), each save of
an `OrbaxCheckpoint` of its `fit` also holds one more checkpointable per
attached EMA, named `keras_ema` (`keras_ema_1`, ... for the next ones): the
pytree `{"header": <JSON>, "shadows": [[array, ...], ...]}`, with the header
of a state file (`npz_state.make_header`: counters, hyperparameters, profile
names, each variable's path, shape and dtype) and one list of shadows per
profile, in the header's order.

The shadows are saved as Keras saves the weights there
(`backends.BACKEND_OPS.orbax_value`): on JAX as they are laid out, so that
under `keras.distribution` each process writes the shards it holds and
nothing is gathered; on TensorFlow and torch as NumPy copies. They are part
of Keras' own save (in the background when Keras' is), so the step folder
holding them is committed, kept and deleted (`max_to_keep`) as one.

`read` reads the header first and checks it against the model as
`npz_state.match` checks a state file, then restores each shadow with its
own shape and dtype (`backends.BACKEND_OPS.orbax_target`): on JAX with its
own sharding, so that each process reads only its shards; elsewhere as a
NumPy array. The state saved on one backend restores on the others.
"""

from __future__ import annotations

import json
import os

from keras_ema import _internals
from keras_ema import backends
from keras_ema.saving import npz_state
from keras_ema.saving.atomic import reading

NAME = "keras_ema"
_KEYS = {"header", "shadows"}


def checkpointable_name(index: int = 0) -> str:
    """The checkpointable of the `index`-th EMA attached to a model."""
    return NAME if index == 0 else f"{NAME}_{index}"


def orbax_checkpoints(callbacks) -> list:
    """The `keras.callbacks.OrbaxCheckpoint`s among `callbacks` (none before
    Keras 3.14)."""
    checkpoint_class = _internals.optional_orbax_checkpoint_class()
    if checkpoint_class is None:
        return []
    return [c for c in callbacks if isinstance(c, checkpoint_class)]


def state_tree(state, hyperparameters: dict, extra: dict | None = None) -> dict:
    """The checkpointable of `state` (its variables current): the header
    (with `extra`, as in a state file) and every profile's shadow values
    (`backends.BACKEND_OPS.orbax_value`)."""
    header = npz_state.make_header(state, hyperparameters, extra)
    return {
        "header": json.dumps(header),
        "shadows": [
            [backends.BACKEND_OPS.orbax_value(shadow) for shadow in profile.shadows]
            for profile in state.profiles
        ],
    }


def read(step_path: str, name: str, state) -> tuple | None:
    """Reads the checkpointable `name` of the Orbax checkpoint step
    `step_path`, checked against `state` first.

    Returns `(header, arrays, where)` like `StateStore.read`, `arrays` one
    list per profile, or `None` when the step holds no such checkpointable.
    Raises a `ValueError` naming `where` (`<step_path>/<name>`) when it does
    not fit the model or is not a keras_ema state.
    """
    from orbax.checkpoint import v1 as ocp

    where = os.path.join(os.fspath(step_path), name)
    saved = ocp.checkpointables_metadata(step_path).metadata
    if name not in saved:
        return None
    with reading(where, "a valid keras_ema state", damage="unreadable or corrupt"):
        stored = _stored_shadows(saved[name])
        placeholders = [[ocp.PLACEHOLDER] * len(row) for row in stored]
        loaded = ocp.load_checkpointables(
            step_path, {name: {"header": "", "shadows": placeholders}}
        )
        header = json.loads(loaded[name]["header"])
        npz_state.check_header(header)
    npz_state.match(header, None, state, where)
    _check_stored(stored, header, where)
    targets = [
        [backends.BACKEND_OPS.orbax_target(shadow) for shadow in profile.shadows]
        for profile in state.profiles
    ]
    loaded = ocp.load_checkpointables(
        step_path, {name: {"header": ocp.PLACEHOLDER, "shadows": targets}}
    )
    return header, loaded[name]["shadows"], where


def _stored_shadows(tree) -> list:
    """The metadata of the stored shadows, one list per profile."""
    if not isinstance(tree, dict) or set(tree) != _KEYS:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"it holds {keys}, not {sorted(_KEYS)}")
    shadows = tree["shadows"]
    if not isinstance(shadows, list) or not all(isinstance(r, list) for r in shadows):
        raise ValueError("its `shadows` are not one list per profile")
    return shadows


def _check_stored(stored: list, header: dict, where: str) -> None:
    """Every stored array as the header describes it (the header fits the
    model: `npz_state.match`)."""
    variables = header["variables"]
    profiles = len(header.get("profiles", [""]))
    if len(stored) != profiles or any(len(row) != len(variables) for row in stored):
        raise ValueError(
            f"{where!r} is corrupt: it stores {[len(row) for row in stored]} "
            f"shadows per profile, but its header describes {len(variables)} "
            f"variables in each of {profiles} profiles."
        )
    for row in stored:
        for spec, array in zip(variables, row, strict=True):
            shape = list(getattr(array, "shape", ()))
            dtype = str(getattr(array, "dtype", None))
            if shape != spec["shape"] or dtype != spec["dtype"]:
                raise ValueError(
                    f"{where!r} is corrupt: variable {spec['path']!r} is stored "
                    f"with shape {shape} and dtype {dtype}, but its header says "
                    f"{spec['shape']} and {spec['dtype']}."
                )
