"""How an `EMA` reads and writes its state: state files (also through
`model.save_weights`/`load_weights`, see `backup.py`) and Orbax checkpoints
(see `backup.ride_along_orbax` and `orbax_io`)."""

from __future__ import annotations

import warnings

from keras_ema import backends
from keras_ema import orbax_io
from keras_ema import state_io


class StateFiles:
    """The state-file methods of `EMA` (a mixin: it uses the callback's
    `_require_state`, `_flushed_state`, `_swaps`, `_engine`, `model` and
    `get_config`)."""

    # Options that change no shadow value: a state file saved with others
    # loads without a warning.
    _UNCOMPARED_OPTIONS: tuple = ("offload_to_host", "validate")

    def _write_state(self, path) -> None:
        # The model may hold the EMA weights: a checkpoint may be written
        # inside `swap_weights()` (EMAModelCheckpoint), which must stay swapped.
        state = self._flushed_state()
        require_held_here(
            "save_state()",
            [
                (path_, shadow.value)
                for profile in state.profiles
                for path_, shadow in zip(state.paths, profile.shadows, strict=True)
            ],
        )
        state_io.save(path, state, self.get_config(), self._state_extra())

    def _state_extra(self) -> dict | None:
        """What a subclass keeps in the state file's header beside the
        shadows (`None`: nothing)."""
        return None

    def _read_state(self, path) -> tuple:
        """Reads and checks a state file against the model; changes nothing."""
        state = self._require_state()
        header, arrays = state_io.read(path)
        arrays = state_io.match(header, arrays, state, path)
        return header, arrays, path

    def _apply_state(self, header: dict, arrays: list, path) -> None:
        state = self._require_state()
        self._warn_if_hyperparameters_differ(header["hyperparameters"], path)
        self._swaps.repair(self.model)
        for profile, profile_arrays in zip(state.profiles, arrays, strict=True):
            for shadow, array in zip(profile.shadows, profile_arrays, strict=True):
                shadow.assign(array)
        state.step.assign(header["step"])
        state.skipped.assign(header["skipped"])
        self._engine.reload()

    def _orbax_state(self) -> dict:
        """The checkpointable an `OrbaxCheckpoint` save holds for this EMA:
        every profile's shadows, as they are laid out, and the header."""
        return orbax_io.state_tree(
            self._flushed_state(), self.get_config(), self._state_extra()
        )

    def _read_orbax_state(self, step_path, name: str) -> tuple | None:
        """Reads and checks the checkpointable `name` of an Orbax checkpoint
        step against the model; changes nothing. `None` if there is none."""
        return orbax_io.read(step_path, name, self._require_state())

    def _follow_loaded_weights(self) -> None:
        """After `model.load_weights` without an EMA file: an EMA that has not
        updated yet is a copy of the weights, so it takes the loaded ones."""
        if self._state is None or self.step != 0:
            return
        self._swaps.repair(self.model)
        state = self._state
        for profile in state.profiles:
            for shadow, weight in zip(profile.shadows, state.weights, strict=True):
                shadow.assign(
                    backends.BACKEND_OPS.fresh_copy(weight.value, shadow.dtype)
                )
        self._engine.reload()

    def _warn_if_hyperparameters_differ(self, saved: dict, path: str) -> None:
        differing = {
            name: {"file": saved.get(name), "callback": value}
            for name, value in self.get_config().items()
            if saved.get(name) != value and name not in self._UNCOMPARED_OPTIONS
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
