"""An EMA bound to a part of the model that `fit` trains.

`ema.set_model(student)` before `fit` binds the EMA to `student`; a later
`trainer.fit(..., callbacks=[ema])` hands the callback `trainer`, which must
contain every weight the EMA averages (a mean teacher's trainer holds its
student, a GAN its generator). The EMA keeps averaging `student`; swaps,
`val_ema_*` and `evaluate`/`predict` with the callback put the EMA weights
into `student`, so `trainer` runs with its `student` averaged.
"""

from __future__ import annotations


def require_contained(tracked, weights, model) -> None:
    """Raises a `ValueError` naming both models where `model` does not hold
    every one of `weights` (the weights the EMA averages, of `tracked`)."""
    held = {id(weight) for weight in model.weights}
    missing = [weight.path for weight in weights if id(weight) not in held]
    if missing:
        raise ValueError(
            f"This `EMA` callback averages the weights of model "
            f"{tracked.name!r}, but model {model.name!r} does not contain "
            f"them all (missing: {missing[:5]}). Pass it to the `fit`, "
            f"`evaluate` or `predict` of a model that holds {tracked.name!r} "
            "(as a layer or an attribute), or create a new `EMA` for model "
            f"{model.name!r}."
        )
