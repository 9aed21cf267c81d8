"""Scoring synthesized EMAs over several `sigma_rel`s, for `PostHocRun.sweep`
and `PostHocRun.plot`: the checks of their arguments, the scores, the best
one, and the plot."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence

import numpy as np

from keras_ema.schedule import check_sigma_rel


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Scores of synthesized EMAs, as returned by `PostHocRun.sweep`.

    Attributes:
        sigma_rels: The targets, in the order given.
        scores: The score of each target.
        mode: `"min"` or `"max"`: which score is best.
        step: The snapshot step synthesized.
    """

    sigma_rels: tuple
    scores: tuple
    mode: str
    step: int

    @property
    def best(self) -> float | None:
        """The `sigma_rel` of the best score (`None` if every score is NaN)."""
        index = best_index(self.scores, self.mode)
        return None if index is None else self.sigma_rels[index]

    @property
    def best_score(self) -> float | None:
        index = best_index(self.scores, self.mode)
        return None if index is None else self.scores[index]


def best_index(scores, mode: str) -> int | None:
    """The index of the best score (`None` if every score is NaN)."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).all():
        return None
    return int(np.nanargmin(scores) if mode == "min" else np.nanargmax(scores))


def checked_targets(sigma_rels) -> list:
    """The target `sigma_rel`s as a list of Python numbers, checked."""
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Iterable):
        raise ValueError(
            "`sigma_rels` must be a sequence of numbers. "
            f"Received: sigma_rels={sigma_rels!r}"
        )
    targets = [s.item() if isinstance(s, np.generic) else s for s in sigma_rels]
    if not targets:
        raise ValueError("`sigma_rels` must not be empty. Received: sigma_rels=[]")
    for index, target in enumerate(targets):
        check_sigma_rel(f"sigma_rels[{index}]", target)
    return targets


def check_mode(mode) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` must be 'min' or 'max'. Received: mode={mode!r}")


def check_evaluate(evaluate) -> None:
    if not callable(evaluate):
        raise ValueError(
            f"`evaluate` must be callable. Received: evaluate={evaluate!r}"
        )


def scores_of(
    targets: list,
    weights: Iterable[dict],
    evaluate: Callable[[dict], float],
    hold: Callable[[dict], contextlib.AbstractContextManager] | None = None,
) -> list[float]:
    """`evaluate` of each target's weights, each checked to be a number,
    inside `hold(weights)` if given (a model holding them); a NaN warns,
    naming its target."""
    scores = []
    for target, target_weights in zip(targets, weights, strict=True):
        scope = contextlib.nullcontext() if hold is None else hold(target_weights)
        with scope:
            score = evaluate(target_weights)
        try:
            if isinstance(score, (str, bytes)):
                raise TypeError
            scores.append(float(score))
        except (TypeError, ValueError):
            raise ValueError(
                "`evaluate` must return a number. Received: "
                f"{score!r} for sigma_rel={target!r}"
            ) from None
        if math.isnan(scores[-1]):
            warnings.warn(
                f"`evaluate` returned NaN for sigma_rel={target!r}: that "
                "target is left out of `best`.",
                # The line that called `PostHocRun.sweep`.
                stacklevel=3,
            )
    return scores


def plot_scores(
    sigma_rels: Sequence[float],
    scores: Sequence[float],
    tracked: Sequence[float],
    ax=None,
    mode: str = "min",
    label: str | None = None,
):
    """Draws `scores` against `sigma_rels`, marking the `tracked` ones and
    the best; see `PostHocRun.plot`."""
    sigma_rels = np.asarray(sigma_rels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if sigma_rels.ndim != 1 or sigma_rels.shape != scores.shape:
        raise ValueError(
            "`sigma_rels` and `scores` must be 1-D and of the same length. "
            f"Received: shapes {sigma_rels.shape} and {scores.shape}"
        )
    check_mode(mode)
    if ax is None:
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "`PostHocRun.plot` needs matplotlib: `pip install matplotlib`."
            ) from error
        _, ax = plt.subplots()
    order = np.argsort(sigma_rels)
    ax.plot(sigma_rels[order], scores[order], marker="o", label=label or "score")
    for index, value in enumerate(tracked):
        ax.axvline(
            value,
            color="0.5",
            linestyle="--",
            linewidth=1,
            label="tracked sigma_rel" if index == 0 else None,
        )
    best = best_index(scores, mode)
    if best is not None:
        ax.plot(
            sigma_rels[best],
            scores[best],
            marker="*",
            markersize=14,
            linestyle="none",
            color="C3",
            label=f"best: sigma_rel={sigma_rels[best]:.4g}",
        )
    ax.set_xlabel("sigma_rel")
    ax.set_ylabel("score")
    ax.legend()
    return ax
