"""Warnings about setups that do not do what their author most likely
expects, given when `fit` starts or ends."""

from __future__ import annotations

import warnings

import keras

from keras_ema import _internals


def warn_about_setup(ema, model, fit: _internals.FitContext) -> None:
    """At the start of `fit` (`fit`: its context): Keras' own EMA in the
    optimizer, a plain `ModelCheckpoint` monitoring `val_ema_*`, and
    `val_ema_*` monitored in a `fit` without validation."""
    optimizer = getattr(model, "optimizer", None)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if getattr(inner, "use_ema", False):
        warnings.warn(
            "The optimizer was created with `use_ema=True`: Keras' own EMA "
            "writes its average into the model at the end of `fit`, so the "
            "model will not hold its online weights afterwards, and the two "
            "EMAs average each other's effects. Create the optimizer with "
            "`use_ema=False` when using `keras_ema.EMA`.",
            stacklevel=4,
        )
    monitored = [
        callback
        for callback in fit.callbacks
        if callback is not ema
        and isinstance(getattr(callback, "monitor", None), str)
        and callback.monitor.startswith("val_ema_")
    ]
    for callback in monitored:
        if isinstance(callback, keras.callbacks.ModelCheckpoint) and not hasattr(
            callback, "ema"
        ):
            warnings.warn(
                f"A `ModelCheckpoint` monitors `{callback.monitor}` but saves "
                "the model with its online weights. To save the EMA weights, "
                "use `keras_ema.EMAModelCheckpoint(ema, filepath, ...)`.",
                stacklevel=4,
            )
    if monitored and fit.validates is False:
        warnings.warn(
            f"`{monitored[0].monitor}` is monitored by "
            f"`{type(monitored[0]).__name__}`, but this `fit` runs no "
            "validation, so no `val_ema_*` key will be logged. `val_ema_*` "
            "needs `validation_data` (or `validation_split`).",
            stacklevel=4,
        )


def warn_if_first_skipped(skipped: int, warned_at: int) -> None:
    """At an epoch's end: the first update skipped for a NaN or Inf weight
    (`skipped` updates so far, `warned_at` when the last warning came)."""
    if skipped > warned_at == 0:
        warnings.warn(
            "keras_ema.EMA skipped an update because a model weight was "
            "NaN or infinite; the shadows were left unchanged. Skipped "
            "updates are counted in the `ema_skipped` log.",
            stacklevel=3,
        )


def warn_if_never_averaged(step: int, schedules) -> None:
    """At the end of `fit`: an EMA still a copy of the weights."""
    first = min(schedule.first_averaging_step() for schedule in schedules)
    if step >= first:
        return
    schedule = min(schedules, key=lambda s: s.first_averaging_step())
    warnings.warn(
        f"After {step} optimizer steps the EMA has not averaged yet: it is "
        "still a copy of the weights. The first update that averages comes "
        f"after step {first} with "
        f"`update_after_step={getattr(schedule, 'update_after_step', 0)}` and "
        f"`update_every={schedule.update_every}`; lower `update_after_step` "
        "or train longer.",
        stacklevel=4,
    )


def refuse_another_ema(ema, fit: _internals.FitContext, ema_class) -> None:
    """Raises when another `ema_class` callback is in the running `fit`
    (`fit`: its context).

    Each installs its update in the model's compiled train step; two would
    each install their own around Keras' step, and only the last one would
    run. Several averages belong in one callback.
    """
    others = [
        callback
        for callback in fit.callbacks
        if isinstance(callback, ema_class) and callback is not ema
    ]
    if others:
        raise ValueError(
            "One `fit` can run one `keras_ema` callback (`EMA` or "
            "`PostHocEMA`); keep several averages in one with "
            "`keras_ema.EMA(profiles={...})`. Received: callbacks "
            f"{[type(c).__name__ for c in [ema, *others]]}"
        )
