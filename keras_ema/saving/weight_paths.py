"""Which variable paths name the same weight of one architecture, as Keras'
`.weights.h5` files pair weights: up to Keras' automatic `_<n>` numbering of
names and to leading model names."""

from __future__ import annotations

import re

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
