"""Warnings about setups that do not do what their author most likely
expects, given when `fit` starts or ends."""

from __future__ import annotations

import inspect
import os
import warnings

import keras

from keras_ema import _internals

# Where the frames of Keras and of this library live: a warning points at
# the first frame outside them, the user's `fit(...)` (or `evaluate`) line.
_LIBRARY_FOLDERS = (
    os.path.dirname(keras.__file__) + os.sep,
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
)


def _warn(message: str) -> None:
    """`warnings.warn` pointing at the user's line that called into Keras,
    however deep the backend's trainer and its callbacks nest the call."""
    frame, stacklevel = inspect.currentframe(), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_FOLDERS):
        frame, stacklevel = frame.f_back, stacklevel + 1
    del frame
    warnings.warn(message, UserWarning, stacklevel=stacklevel)


def warn_about_setup(ema, model, fit: _internals.FitContext) -> None:
    """At the start of `fit` (`fit`: its context): Keras' own EMA in the
    optimizer, a plain `ModelCheckpoint` monitoring `val_ema_*`, and
    `val_ema_*` monitored in a `fit` without validation."""
    optimizer = getattr(model, "optimizer", None)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if getattr(inner, "use_ema", False):
        _warn(
            "The optimizer was created with `use_ema=True`: Keras' own EMA "
            "writes its average into the model at the end of `fit`, so the "
            "model will not hold its online weights afterwards, and the two "
            "EMAs average each other's effects. Create the optimizer with "
            "`use_ema=False` when using `keras_ema.EMA`.",
        )
    monitored = [
        callback
        for callback in fit.callbacks
        if callback is not ema
        and isinstance(getattr(callback, "monitor", None), str)
        and callback.monitor.startswith("val_ema_")
    ]
    for callback in monitored:
        if _saves_online_weights_only(callback):
            _warn(
                f"A `ModelCheckpoint` monitors `{callback.monitor}` but saves "
                "the model with its online weights. To save the EMA weights, "
                "use `keras_ema.EMAModelCheckpoint(ema, filepath, ...)`.",
            )
    if monitored and fit.validates is False:
        _warn(
            f"`{monitored[0].monitor}` is monitored by "
            f"`{type(monitored[0]).__name__}`, but this `fit` runs no "
            "validation, so no `val_ema_*` key will be logged. `val_ema_*` "
            "needs `validation_data` (or `validation_split`).",
        )


def _saves_online_weights_only(callback) -> bool:
    """A plain `ModelCheckpoint` saving the whole model: the online weights,
    with no EMA. With `save_weights_only=True` the EMA state rides along in
    the `.ema.npz` file beside the weights (`saving.sidecars`)."""
    return (
        isinstance(callback, keras.callbacks.ModelCheckpoint)
        and not hasattr(callback, "ema")
        and not getattr(callback, "save_weights_only", False)
    )


def warn_if_first_skipped(skipped: int, warned_at: int) -> None:
    """At an epoch's end: the first update skipped for a NaN or Inf weight
    (`skipped` updates so far, `warned_at` when the last warning came)."""
    if skipped > warned_at == 0:
        _warn(
            "keras_ema.EMA skipped an update because a model weight was "
            "NaN or infinite; the shadows were left unchanged. Skipped "
            "updates are counted in the `ema_skipped` log.",
        )


def warn_if_never_averaged(step: int, schedules) -> None:
    """At the end of `fit`: an EMA still a copy of the weights."""
    first = min(schedule.first_averaging_step() for schedule in schedules)
    if step >= first:
        return
    schedule = min(schedules, key=lambda s: s.first_averaging_step())
    update_after_step = getattr(schedule, "update_after_step", 0)
    remedies = []
    if update_after_step > 0:
        remedies.append("lower `update_after_step`")
    if schedule.update_every > 1:
        remedies.append("use a smaller `update_every`")
    remedies.append(f"train for at least {first} optimizer steps")
    _warn(
        f"After {step} optimizer steps the EMA has not averaged yet: it is "
        "still a copy of the weights. The first update that averages comes "
        f"after step {first} with `update_after_step={update_after_step}` "
        f"and `update_every={schedule.update_every}`; "
        f"{', or '.join(remedies)}."
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
