"""The averaged model: a Keras model whose weights are an EMA's shadows.

`averaged_model(state, index)` clones the tracked model's architecture and
makes the clone use the shadow variables of profile `index` where a weight
is averaged, and the tracked model's own variables elsewhere (integer
weights, weights the name filters copy or leave alone, and, for an EMA of
the trainable weights only, the non-trainable ones). No value is copied: an
update of the EMA is what the averaged model computes with next. The clone
is not trainable, so its BatchNormalization layers run in inference mode
and no optimizer of a model holding it moves its weights.
"""

from __future__ import annotations

import keras

from keras_ema import _internals
from keras_ema.state import Kind
from keras_ema.state import ShadowState
from keras_ema.state import shadow_dtype


def averaged_model(state: ShadowState, index: int) -> keras.Model:
    """A model of `state.model`'s architecture computing with profile
    `index`'s shadows (see the module docstring)."""
    model = state.model
    require_averageable(state)
    clone = _clone(model)
    clone.trainable = False
    replacements = _replacements(state, index, clone, model)
    _internals.use_variables(clone, replacements)
    _check_uses(clone, model, replacements)
    return clone


def require_averageable(state: ShadowState) -> None:
    """Raises where an averaged model cannot share the shadows: shadows in
    host memory, or averaged weights whose dtype is not their shadow's."""
    if state.offload:
        raise ValueError(
            "`averaged_model()` needs the shadows beside the weights: with "
            "`offload_to_host=True` they live in host memory, where a model "
            "called on the accelerator cannot read them. Received: "
            "offload_to_host=True"
        )
    for weight, kind in zip(state.weights, state.kinds, strict=True):
        dtype = keras.backend.standardize_dtype(weight.dtype)
        if kind == Kind.AVERAGE and shadow_dtype(dtype) != dtype:
            raise ValueError(
                f"`averaged_model()` computes with the float32 shadows, but "
                f"weight {weight.path!r} is {dtype}. Use a mixed precision "
                "policy (e.g. `mixed_bfloat16`, whose weights are float32) "
                "or `ema.swap_weights()`. Received: "
                f"{weight.path}.dtype={dtype}"
            )


def _clone(model) -> keras.Model:
    try:
        clone = keras.models.clone_model(model)
    except Exception as error:
        raise ValueError(
            f"`averaged_model()` clones the architecture of model "
            f"{model.name!r} with `keras.models.clone_model`, which failed: "
            f"{error}. A subclassed model needs `get_config()` and "
            "`from_config()`."
        ) from error
    if not clone.built:
        clone.build_from_config(model.get_build_config())
    return clone


def _replacements(state: ShadowState, index: int, clone, model) -> dict:
    """`id(clone weight) -> variable` for every weight of the clone."""
    clone_weights, weights = clone.weights, model.weights
    if [_signature(w) for w in clone_weights] != [_signature(w) for w in weights]:
        raise ValueError(
            f"`keras.models.clone_model` of model {model.name!r} gave other "
            "weights (shapes and dtypes, in order) than the model's, so the "
            "EMA's shadows cannot be matched to them. Received: "
            f"{[_signature(w) for w in weights]} vs "
            f"{[_signature(w) for w in clone_weights]}"
        )
    shadows = {
        id(weight): shadow
        for weight, shadow, kind in zip(
            state.weights, state.profiles[index].shadows, state.kinds, strict=True
        )
        if kind == Kind.AVERAGE
    }
    return {
        id(copy): shadows.get(id(weight), weight)
        for copy, weight in zip(clone_weights, weights, strict=True)
    }


def _signature(weight) -> tuple:
    return tuple(weight.shape), keras.backend.standardize_dtype(weight.dtype)


def _check_uses(clone, model, replacements) -> None:
    expected = list(replacements.values())
    if [id(w) for w in clone.weights] != [id(w) for w in expected]:
        raise ValueError(
            f"The clone of model {model.name!r} holds its weights in a way "
            "`averaged_model()` cannot follow (a layer keeping variables "
            "outside its attributes and lists)."
        )


def refuse_in_compiled_step(action: str) -> None:
    """Raises a `ValueError` where `action` (a swap, a read of the EMA
    weights as arrays) is called inside a step Keras compiles: there it
    would assign the model's variables in the middle of the trace, or read
    values that do not exist yet."""
    if _internals.in_compiled_step():
        raise ValueError(
            f"`ema.{action}` cannot run inside a compiled train, test or "
            "predict step (`train_step`, `compute_loss`, `call`). To compute "
            "with the EMA weights there, call `ema.averaged_model()` before "
            "`fit` and call that model inside the step."
        )
