"""`fit`'s validation with the EMA weights: the online metrics, then the
same with each profile's EMA weights (or only the EMA's)."""

from __future__ import annotations

from keras_ema import _internals

VALIDATE_OPTIONS = ("both", "ema")


def check_validate(validate: str) -> str:
    """Checks `EMA`'s `validate` argument."""
    if validate not in VALIDATE_OPTIONS:
        raise ValueError(
            f"`validate` must be one of {VALIDATE_OPTIONS}. "
            f"Received: validate={validate!r}"
        )
    return validate


def evaluate_online_and_ema(ema, keras_evaluate, args, kwargs):
    """Keras' `evaluate` as `fit` calls it for validation, with `val_ema_*`.

    Outside `fit`'s validation it is Keras' own. With `validate="both"`
    Keras' evaluation (online weights, `fit`'s callbacks and progress bar)
    runs first; then each profile's, swapped in, with no callbacks. With
    `validate="ema"` the first profile's runs with `fit`'s callbacks.
    """
    if not _internals.is_fit_validation(kwargs):
        return keras_evaluate(*args, **kwargs)
    quiet = dict(kwargs, callbacks=None, verbose=0)
    logs = {}
    if ema.validate == "both":
        logs = keras_evaluate(*args, **kwargs)
        if not isinstance(logs, dict):
            return logs
    for index, name in enumerate(ema.profile_names):
        own = kwargs if index == 0 and ema.validate == "ema" else quiet
        with ema.swap_weights(name or None):
            ema_logs = keras_evaluate(*args, **own)
        logs = {**logs, **prefixed_ema(ema_logs, name)}
    return logs


def prefixed_ema(logs, profile: str = "") -> dict:
    """`evaluate` logs renamed `ema_<metric>` (`ema_<profile>_<metric>`);
    `fit` adds the `val_`."""
    prefix = f"ema_{profile}_" if profile else "ema_"
    return {f"{prefix}{name}": value for name, value in logs.items()}
