"""Refusals before `PostHocEMA` changes anything: its arguments, a model
whose variables share a path, and a `steps_per_execution` under which a
snapshot step could fall inside an execution, and a `train_step` whose
optimizer steps the host cannot follow from the model's optimizer."""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence

from keras_ema.checks import check_int_at_least
from keras_ema.posthoc.format import SNAPSHOT_DTYPES
from keras_ema.schedule import checked_sigma_rels
from keras_ema.steps import step_rule


def check_arguments(
    directory,
    sigma_rels: Sequence[float],
    snapshot_every: int,
    update_every: int,
    snapshot_dtype: str,
    max_snapshots: int | None,
    verbose: int,
) -> tuple:
    """Checks the arguments of `PostHocEMA`.

    Returns:
        `sigma_rels` as a tuple of floats.
    """
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise ValueError(
            f"`directory` must be a non-empty path. Received: directory={directory!r}"
        )
    sigma_rels = tuple(float(s) for s in checked_sigma_rels(sigma_rels))
    check_int_at_least("update_every", update_every, 1)
    check_int_at_least("snapshot_every", snapshot_every, 1)
    if snapshot_every % update_every:
        raise ValueError(
            "`snapshot_every` must be a multiple of `update_every`, so that "
            "every snapshot follows an update. Received: "
            f"snapshot_every={snapshot_every!r}, update_every={update_every!r}"
        )
    if snapshot_dtype not in SNAPSHOT_DTYPES:
        raise ValueError(
            f"`snapshot_dtype` must be one of {SNAPSHOT_DTYPES}. "
            f"Received: snapshot_dtype={snapshot_dtype!r}"
        )
    if max_snapshots is not None:
        check_int_at_least("max_snapshots", max_snapshots, 3)
    if verbose not in (0, 1):
        raise ValueError(f"`verbose` must be 0 or 1. Received: verbose={verbose!r}")
    return sigma_rels


def check_distinct_paths(model) -> None:
    """Refuses a model with several variables of one path: snapshots name
    the variables by path."""
    counts = collections.Counter(w.path for w in model.weights)
    repeated = sorted(path for path, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(
            "`PostHocEMA` names the variables of its snapshots by path, but "
            f"model {model.name!r} has several variables with each of the "
            f"paths {repeated[:10]}. Give its layers distinct names."
        )


def check_counted_by_model_optimizer(model) -> None:
    """Refuses a `train_step` whose steps are counted by optimizers other
    than the model's (`steps.step_rule`): the host follows the model's."""
    optimizer, rule = model.optimizer, step_rule(model)
    if len(rule.optimizers) != 1 or rule.optimizers[0] is not optimizer:
        raise ValueError(
            "`PostHocEMA` follows the optimizer steps of the model's "
            "optimizer, but this model's `train_step` applies optimizers of "
            "its own (or the model has none): the snapshot steps cannot be "
            "told on the host. Use `keras_ema.EMA`, or apply the model's "
            "`optimizer` in `train_step`. Received: "
            f"optimizer={optimizer}, optimizers={list(rule.optimizers)}"
        )


def check_steps_per_execution(model, snapshot_every: int, params: dict | None) -> None:
    """Refuses a `steps_per_execution > 1` under which a snapshot step could
    fall inside an execution; `params` are the callback's."""
    optimizer, rule = model.optimizer, step_rule(model)
    steps_per_execution = getattr(model, "steps_per_execution", 1) or 1
    if steps_per_execution == 1:
        return
    if rule.per_step:
        raise ValueError(
            "`steps_per_execution` > 1 needs an optimizer that moves the "
            "weights at every step (Keras' own `train_step`, no gradient "
            "accumulation, no `LossScaleOptimizer`): the snapshot steps "
            "could fall inside an execution. Received: "
            f"steps_per_execution={steps_per_execution}, optimizer={optimizer}"
        )
    if snapshot_every % steps_per_execution:
        raise ValueError(
            "`steps_per_execution` must divide `snapshot_every`: a snapshot "
            "is taken between two executions. Received: "
            f"steps_per_execution={steps_per_execution}, "
            f"snapshot_every={snapshot_every}"
        )
    steps = (params or {}).get("steps")
    if not steps or steps % steps_per_execution:
        raise ValueError(
            "`steps_per_execution` must divide the number of steps of each "
            "epoch, so that every execution holds as many steps. Received: "
            f"steps_per_execution={steps_per_execution}, steps per "
            f"epoch={steps}"
        )


def check_start_step(model, step: int) -> None:
    """Refuses a `fit` that starts at an EMA step counter that is not a
    multiple of `steps_per_execution`."""
    steps_per_execution = getattr(model, "steps_per_execution", 1) or 1
    if step % steps_per_execution:
        raise ValueError(
            "`steps_per_execution` must divide the EMA's step counter at "
            "the start of `fit`, so that snapshot steps end executions. "
            f"Received: steps_per_execution={steps_per_execution}, "
            f"step={step}"
        )
