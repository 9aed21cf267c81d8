"""`StateStore`: how an `EMA` writes and reads its state, in state files
(`npz_state`; also beside `model.save_weights` files, see `sidecars`) and in
Orbax checkpoints (`orbax_state`)."""

from __future__ import annotations

import warnings
import weakref

from keras_ema import backends
from keras_ema.saving import npz_state
from keras_ema.saving import orbax_state


class StateStore:
    """The state of one `EMA` (its counters and every profile's shadows),
    written and read.

    Each `EMA` owns one, as `ema.state_store`; `EMA.save_state`,
    `EMA.load_state` and the files that ride along with the model's weights
    (`sidecars`) all go through it. Reading (`read`, `read_orbax`) checks a
    saved state against the model and changes nothing; `apply` then
    restores it. The store works on its callback's `ShadowState`, engine and
    swaps, and holds the callback weakly (the callback owns the store).

    A subclass of `EMA` that keeps more than its shadows in the state (the
    run id of `PostHocEMA`) gives its own store: `extra` returns that JSON
    object, and `write` and `apply` may do more around the state.

    Args:
        ema: The `EMA` callback whose state this is.
        uncompared: The `get_config()` entries a loaded state may differ in
            without a warning (options that change no shadow value).
    """

    def __init__(self, ema, uncompared: tuple = ()) -> None:
        self._ema = weakref.proxy(ema)
        self._uncompared = tuple(uncompared)

    def extra(self) -> dict | None:
        """The JSON object kept in the header beside the shadows (`None`:
        nothing)."""
        return None

    def write(self, path) -> None:
        """Writes the state to the state file `path`, atomically."""
        # The model may hold the EMA weights: a checkpoint may be written
        # inside `swap_weights()` (EMAModelCheckpoint), which must stay swapped.
        state = self._ema._flushed_state()
        require_held_here(
            "save_state()",
            [
                (path_, shadow.value)
                for profile in state.profiles
                for path_, shadow in zip(state.paths, profile.shadows, strict=True)
            ],
        )
        npz_state.save(path, state, self._ema.get_config(), self.extra())

    def read(self, path) -> tuple:
        """Reads the state file `path` and checks it against the model;
        changes nothing. Returns `(header, arrays, path)` for `apply`."""
        state = self._ema._require_state()
        header, arrays = npz_state.read(path)
        arrays = npz_state.match(header, arrays, state, path)
        return header, arrays, path

    def apply(self, header: dict, arrays: list, path) -> None:
        """Restores a state that `read` or `read_orbax` returned."""
        ema = self._ema
        state = ema._require_state()
        self._warn_if_hyperparameters_differ(header["hyperparameters"], path)
        ema._swaps.repair(ema.tracked_model)
        for profile, profile_arrays in zip(state.profiles, arrays, strict=True):
            for shadow, array in zip(profile.shadows, profile_arrays, strict=True):
                shadow.assign(array)
        state.step.assign(header["step"])
        state.skipped.assign(header["skipped"])
        ema._engine.reload()

    def orbax_tree(self) -> dict:
        """The checkpointable an `OrbaxCheckpoint` save holds for this EMA:
        every profile's shadows, as they are laid out, and the header."""
        return orbax_state.state_tree(
            self._ema._flushed_state(), self._ema.get_config(), self.extra()
        )

    def read_orbax(self, step_path, name: str) -> tuple | None:
        """Reads the checkpointable `name` of an Orbax checkpoint step and
        checks it against the model; changes nothing. Returns what `read`
        does, or `None` if the step holds no such checkpointable."""
        return orbax_state.read(step_path, name, self._ema._require_state())

    def follow_loaded_weights(self) -> None:
        """After `model.load_weights` without an EMA state: an EMA that has
        not updated yet is a copy of the weights, so it takes the loaded
        ones."""
        ema = self._ema
        state = ema._state
        if state is None or ema.step != 0:
            return
        ema._swaps.repair(ema.tracked_model)
        for profile in state.profiles:
            for shadow, weight in zip(profile.shadows, state.weights, strict=True):
                shadow.assign(
                    backends.BACKEND_OPS.fresh_copy(weight.value, shadow.dtype)
                )
        ema._engine.reload()

    def _warn_if_hyperparameters_differ(self, saved: dict, path: str) -> None:
        differing = {
            name: {"file": saved.get(name), "callback": value}
            for name, value in self._ema.get_config().items()
            if saved.get(name) != value and name not in self._uncompared
        }
        if differing:
            warnings.warn(
                f"The EMA state in {path!r} was saved with other hyperparameters; "
                f"the callback keeps its own. Differences: {differing}",
                stacklevel=3,
            )


def require_held_here(action: str, values) -> None:
    """Raises unless this process holds each of the `(path, value)` pairs
    whole: `action` would gather it from the other processes."""
    for path, value in values:
        if not backends.BACKEND_OPS.held_here(value):
            raise ValueError(
                f"`{action}` needs every value on this process, but {path!r} "
                "is sharded over devices of several processes, and keras_ema "
                "does not gather an array to one process. Save and resume the "
                "EMA with `keras.callbacks.OrbaxCheckpoint` in `fit` (the EMA "
                "state rides along: each process writes its own shards) and "
                "`model.load_weights(<directory>)`; export the EMA weights "
                "with `keras_ema.EMAOrbaxCheckpoint` in `fit`, or by saving "
                "`model.get_state_tree()` with Orbax inside "
                "`ema.swap_weights()` (see docs/distributed.md)."
            )
