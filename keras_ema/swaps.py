"""Moving the EMA weights into a model and its online weights back.

A swap saves what it replaces before writing anything (the backend's
`online_backup`) and puts it back by assignment, bit for bit, never by
arithmetic. `Swaps` keeps that backup until it is restored, so that a swap
left open by an interrupted `evaluate` or `predict` (whose end hook never
ran) is repaired at the callback's next use. `swap_weights()` blocks nest:
only the outermost one swaps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Iterator

import keras
from keras import ops

from keras_ema import backends


class Swaps:
    """The swap state of one callback's model."""

    def __init__(self):
        # `(variable, value)` pairs of what the open swap took out.
        self._backup = None
        self._depth = 0
        self._hook_swapped = False

    @property
    def in_block(self) -> bool:
        """Whether a `swap_weights()` block is open."""
        return self._depth > 0

    def swap_in(self, model, weights, values) -> None:
        """Writes `values` (the EMA's, aligned with `weights`) into the
        model, after repairing any swap left open."""
        self.repair(model)
        # Saved before the first assignment, so that an interruption
        # anywhere from here on is repaired.
        self._backup = backends.BACKEND_OPS.online_backup(model, weights)
        for weight, value in zip(weights, values, strict=True):
            weight.assign(backends.BACKEND_OPS.copy_for_weight(value, weight))

    def restore(self, model) -> None:
        backup, self._backup = self._backup, None
        if backup is not None:
            backends.BACKEND_OPS.restore_backup(model, backup)

    def repair(self, model) -> None:
        """Puts back what a swap left out, outside any block."""
        self._hook_swapped = False
        self.restore(model)

    @contextlib.contextmanager
    def block(self, model, swap_in: Callable[[], None]) -> Iterator[None]:
        if self._depth == 0:
            swap_in()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.restore(model)

    def hook_begin(self, swap_in: Callable[[], None]) -> None:
        """`evaluate`/`predict` with the callback: EMA weights, unless a
        block has them in the model already."""
        if self._depth == 0:
            swap_in()
            self._hook_swapped = True

    def hook_end(self, model) -> None:
        if self._hook_swapped:
            self._hook_swapped = False
            self.restore(model)


def model_values(model, weights, shadows) -> list:
    """`(path, value)` pairs aligned with `model.weights`: the shadow's value
    where a weight is tracked (`weights`, aligned with `shadows`), the
    model's own value elsewhere."""
    by_weight = {id(w): s for w, s in zip(weights, shadows, strict=True)}
    return [
        (weight.path, by_weight.get(id(weight), weight).value)
        for weight in model.weights
    ]


def as_model_arrays(model, values) -> list:
    """`model_values`' values as NumPy arrays of the weights' dtypes, as
    `model.get_weights()` returns them."""
    return [
        ops.convert_to_numpy(value).astype(
            keras.backend.standardize_dtype(weight.dtype)
        )
        for weight, (_, value) in zip(model.weights, values, strict=True)
    ]
