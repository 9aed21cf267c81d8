"""Which variable paths name the same weight of one architecture, as Keras'
`.weights.h5` files pair weights: up to Keras' automatic `_<n>` numbering of
names and to leading model names; and how a saved weight differs from the
current one paired with it by position. State files (`load_state`) and
post-hoc snapshots (`PostHocRun.synthesize_into`) pair weights by this one
rule."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from collections.abc import Sequence

# Keras makes names unique within a process by appending `_<n>` to the
# default name (`dense`, `dense_1`, ...; `variable_3` for an unnamed weight).
_AUTO_NUMBER = re.compile(r"_\d+$")


def same_weight(saved: str, current: str) -> bool:
    """Whether two variable paths name the same weight of one architecture.

    Keras' `.weights.h5` files address weights by the model's structure:
    attribute names and class names, never the layer names, which Keras
    numbers anew for each model built in a process (`dense_4/kernel` in one
    build is `dense_6/kernel` in the next). State files keep `variable.path`
    instead, so two paths name the same weight when they are equal segment
    by segment once that `_<n>` suffix is removed from every segment, and up
    to leading segments: paths lose or gain a leading model name across
    `keras.models.load_model` (`net/a/kernel` vs `a/kernel`). With the
    positional pairing, the same count and the shape and dtype checks, this
    accepts every rebuild of an architecture and still tells layers of
    another type (`batch_normalization/gamma` vs `layer_normalization/gamma`)
    or another variable (`moving_mean` vs `gamma`) apart.
    """
    saved_segments, current_segments = _segments(saved), _segments(current)
    shorter, longer = sorted((saved_segments, current_segments), key=len)
    return longer[len(longer) - len(shorter) :] == shorter


def _segments(path: str) -> list[str]:
    return [_AUTO_NUMBER.sub("", segment) for segment in path.split("/")]


def matches_any(path: str, others) -> bool:
    """Whether `path` names the same weight as any of `others`."""
    return any(same_weight(path, other) for other in others)


def difference(
    saved: dict,
    path: str,
    shape: Sequence[int],
    dtype: str,
    place: str,
    same_dtype: Callable[[str, str], bool] = operator.eq,
) -> str | None:
    """How a saved weight differs from the current weight paired with it by
    position, in words; `None` if they fit.

    Args:
        saved: The saved weight's `{"path", "shape", "dtype"}`.
        path: The current weight's path.
        shape: Its shape.
        dtype: Its dtype's name.
        place: Where `saved` comes from, for the message ("the file").
        same_dtype: Whether a saved dtype fits a current one. Defaults to
            equality.
    """
    if not same_weight(saved["path"], path):
        hint = (
            "another model name? Paths may differ only in Keras' `_<n>` "
            "numbering and by a leading model name"
            if _segments(saved["path"])[1:] == _segments(path)[1:]
            else "another architecture?"
        )
        return f"variable {path!r} is {saved['path']!r} in {place} ({hint})"
    if tuple(saved["shape"]) != tuple(shape):
        return (
            f"variable {path!r} has shape {tuple(shape)} in the model but "
            f"{tuple(saved['shape'])} in {place}"
        )
    if not same_dtype(saved["dtype"], dtype):
        return (
            f"variable {path!r} has dtype {dtype} in the model but "
            f"{saved['dtype']} in {place}"
        )
    return None


def unpaired(saved: Sequence[str], current: Sequence[str]) -> tuple[list, list]:
    """`(current paths that no saved path names, saved paths that no current
    path names)`, to say which weights a count mismatch concerns."""
    missing = [p for p in current if not matches_any(p, saved)]
    extra = [p for p in saved if not matches_any(p, current)]
    return missing, extra
