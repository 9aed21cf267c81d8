"""The private Keras internals `keras_ema` relies on, wrapped in one place.

Each function names the Keras attribute it touches and why no public route
exists. The supported Keras range is pinned in `pyproject.toml`, and
`tests/test_internals.py` checks every one of them against the installed
Keras.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable
from typing import NamedTuple

import keras

# `fit` runs its validation as `self.evaluate(..., _use_cached_eval_dataset=True)`
# (keras/src/backend/*/trainer.py). That keyword is the only way to tell the
# validation pass inside `fit` from a user's `evaluate`, and to evaluate the
# same validation data again with the EMA weights.
CACHED_EVAL_KWARG = "_use_cached_eval_dataset"


def is_fit_validation(kwargs: dict) -> bool:
    return bool(kwargs.get(CACHED_EVAL_KWARG, False))


def wrap_evaluate(model, wrapper: Callable) -> Callable:
    """Shadows `model.evaluate` with `wrapper(keras_evaluate, *args, **kw)`.

    `fit` calls `self.evaluate` for validation; an instance attribute is the
    only hook that runs before `fit` builds the epoch logs, so that
    `val_ema_*` reach every callback's `on_epoch_end`.
    Returns the function that undoes it.
    """
    keras_evaluate = type(model).evaluate.__get__(model)

    def evaluate(*args, **kwargs):
        return wrapper(keras_evaluate, *args, **kwargs)

    model.evaluate = evaluate

    def unwrap() -> None:
        if model.__dict__.get("evaluate") is evaluate:
            del model.__dict__["evaluate"]

    return unwrap


def jax_train_out_shardings(model):
    """Keras' `out_shardings` for the JAX train step, or `None`.

    Mirrors `JAXTrainer.make_train_function`, which uses the private
    `_get_state_sharding_spec()` under a `keras.distribution`.
    """
    from keras.src.distribution import distribution_lib

    if distribution_lib.distribution() is None:
        return None
    return (None, model._get_state_sharding_spec())


@contextlib.contextmanager
def train_step_replaced(model, train_step):
    """`model.train_step` replaced by `train_step` for the duration.

    Keras' TensorFlow `make_train_function` traces `self.train_step`; an
    instance attribute is the only way to have it trace the EMA's update
    into the same `tf.function` (and into every inner step with
    `steps_per_execution > 1`) while keeping Keras' own loop and
    distribution handling.
    """
    model.train_step = train_step
    try:
        yield
    finally:
        del model.train_step


def jax_state_weights(model, weights) -> Callable:
    """Maps `weights` to their values in Keras' JAX train state.

    Keras' JAX `train_step(state, data)` takes and returns the state tuple
    `(trainable_variables, non_trainable_variables, optimizer_variables,
    metrics_variables)`, each in the order of the model's (optimizer's)
    variable lists (`JAXTrainer.make_train_function`); the EMA reads the
    weights a step has just computed from there.
    """
    slots = {id(v): (0, i) for i, v in enumerate(model.trainable_variables)}
    slots.update({id(v): (1, i) for i, v in enumerate(model.non_trainable_variables)})
    positions = [slots[id(w)] for w in weights]

    def locate(keras_state):
        return [keras_state[group][index] for group, index in positions]

    return locate


def jax_state_writer(model, variables) -> Callable:
    """`write(keras_state, values)`: Keras' JAX train state (see
    `jax_state_weights`) with each of `variables` that is one of the
    model's set to its value in `values` (aligned with `variables`); the
    others are left out."""
    slots = {id(v): (0, i) for i, v in enumerate(model.trainable_variables)}
    slots.update({id(v): (1, i) for i, v in enumerate(model.non_trainable_variables)})
    positions = [(k, slots[id(v)]) for k, v in enumerate(variables) if id(v) in slots]

    def write(keras_state, values):
        if not positions:
            return keras_state
        groups = [list(keras_state[0]), list(keras_state[1])]
        for k, (group, index) in positions:
            groups[group][index] = values[k]
        return (*groups, *keras_state[2:])

    return write


def jax_state_optimizer_variable(model, variable) -> Callable:
    """Maps one optimizer variable to its value in Keras' JAX train state
    (slot 2 of the tuple described in `jax_state_weights`)."""
    for index, candidate in enumerate(model.optimizer.variables):
        if candidate is variable:
            return lambda keras_state: keras_state[2][index]
    raise ValueError(f"Variable {variable.path!r} is not among the optimizer's.")


def batches(iterator, steps_per_execution: int):
    """The batches of one JAX `train_function` call, as Keras takes them: up
    to `steps_per_execution`, and a `StopIteration` (the epoch's end) only
    when there is not even one.

    Copied from `JAXTrainer.make_train_function`'s `iterator_step`: the EMA
    installs a train function of its own (Keras' step and the update, or
    Keras' step and a separate jitted update) and must take the batches
    exactly as Keras' would; Keras has no public function for it.
    """
    first = next(iterator)
    return itertools.chain([first], itertools.islice(iterator, steps_per_execution - 1))


def jit_keras_train_step(model):
    """Keras' own JAX train step, jitted and donated as Keras does, or as is
    when the model runs eagerly.

    Copied from `JAXTrainer.make_train_function` / `_make_function` (without
    their nnx branch, which a Keras model never takes): the EMA runs Keras'
    step in its own train function, and Keras offers no public way to get
    the jitted step alone. `tests/test_internals.py` pins the copy to the
    installed Keras.
    """
    if model.run_eagerly or not model.jit_compile:
        return model.train_step
    import jax

    return jax.jit(
        model.train_step,
        donate_argnums=0,
        out_shardings=jax_train_out_shardings(model),
    )


def tf_optimization_barrier(values) -> list:
    """TensorFlow's XLA optimization barrier on `values`.

    TF's own XLA op (`tensorflow.compiler.tf2xla`) has no public name; it is
    the one way to keep XLA from fusing away a narrow weight's rounding
    (see `backends.base.as_stored`).
    """
    from tensorflow.compiler.tf2xla.python.xla import optimization_barrier

    return list(optimization_barrier(*values))


def raw_iterations(optimizer):
    """The optimizer's own step counter variable.

    Under gradient accumulation the public `optimizer.iterations` is derived
    (`_iterations // gradient_accumulation_steps`), not a variable; the EMA
    needs the counter that advances at every `apply`.
    """
    return optimizer._iterations


def model_checkpoint_save(checkpoint, epoch, batch, logs) -> None:
    """Calls `ModelCheckpoint._save_model`, the one place that writes a file
    (every epoch, every N batches, best only), so the EMA swap wraps exactly
    the write."""
    checkpoint._save_model(epoch=epoch, batch=batch, logs=logs)


def optional_orbax_checkpoint_class() -> type | None:
    """`keras.callbacks.OrbaxCheckpoint`, or `None` before Keras 3.14 (looked
    up at each call: the one place that asks whether Keras has it)."""
    return getattr(keras.callbacks, "OrbaxCheckpoint", None)


def orbax_checkpoint_class() -> type:
    """`keras.callbacks.OrbaxCheckpoint`, or a `ValueError` naming the
    installed Keras, which has none before 3.14."""
    checkpoint_class = optional_orbax_checkpoint_class()
    if checkpoint_class is None:
        raise ValueError(
            "Orbax checkpoints need `keras.callbacks.OrbaxCheckpoint`, which "
            f"Keras has from version 3.14 on. Installed: Keras {keras.__version__}."
        )
    return checkpoint_class


def orbax_checkpoint_save(checkpoint, step, logs) -> None:
    """Calls `OrbaxCheckpoint._save_checkpoint`, the one place that writes a
    checkpoint (every epoch, every N batches, best only), so the EMA swap
    wraps exactly the write."""
    checkpoint._save_checkpoint(step=step, logs=logs)


def add_orbax_checkpointables(checkpoint, extra: Callable[[], dict]) -> None:
    """Makes each save of `checkpoint` (an `OrbaxCheckpoint`) also hold the
    checkpointables `extra()` returns, in the same step.

    `OrbaxCheckpoint._save_checkpoint` builds its payload (`pytree`,
    `model_config`, `assets`) in a local and passes it to
    `self.checkpointer.save_checkpointables(step, payload)` or
    `save_checkpointables_async(step, payload)`; Keras offers no hook to add
    to it. Added there, the EMA's arrays are written by the same save (in
    the background when Keras' is), into the same step folder, which Orbax
    commits, keeps and deletes (`max_to_keep`) as a whole. A second call on
    the same callback replaces `extra`.
    """
    checkpointer = checkpoint.checkpointer
    if isinstance(checkpointer, _CheckpointerWithExtras):
        checkpointer.extra = extra
    else:
        checkpoint.checkpointer = _CheckpointerWithExtras(checkpointer, extra)


class _CheckpointerWithExtras:
    """An Orbax `Checkpointer` whose saves add `extra()` to the payload;
    everything else is the wrapped checkpointer's."""

    def __init__(self, checkpointer, extra):
        self.checkpointer = checkpointer
        self.extra = extra

    def save_checkpointables(self, step, checkpointables, *args, **kwargs):
        checkpointables = {**checkpointables, **self.extra()}
        return self.checkpointer.save_checkpointables(
            step, checkpointables, *args, **kwargs
        )

    def save_checkpointables_async(self, step, checkpointables, *args, **kwargs):
        checkpointables = {**checkpointables, **self.extra()}
        return self.checkpointer.save_checkpointables_async(
            step, checkpointables, *args, **kwargs
        )

    def __getattr__(self, name):
        return getattr(self.checkpointer, name)


# The file names `keras.saving.load_weights` reads as files before it tries
# an Orbax checkpoint (keras/src/saving/saving_api.py).
_KERAS_WEIGHTS_FILES = (".keras", ".weights.h5", ".weights.json", ".h5", ".hdf5")


def orbax_checkpoint_step(filepath) -> str | None:
    """The step folder `model.load_weights(filepath)` reads when `filepath`
    is an Orbax checkpoint; `None` when it is not (always before Keras 3.14).

    Keras' `load_weights` (keras/src/saving/saving_api.py) takes a path that
    is none of its weights files and that the private
    `orbax_util.is_orbax_checkpoint` accepts as an Orbax checkpoint: the
    latest step (`orbax_util.find_latest_orbax_checkpoint`) of a folder that
    holds step folders, else the folder itself. The EMA must read its state
    from that same step before Keras loads the weights; Keras makes neither
    choice public.
    """
    try:
        from keras.src.saving import orbax_util
        from keras.src.utils import file_utils
    except ImportError:
        return None
    path = str(filepath)
    if path.endswith(_KERAS_WEIGHTS_FILES) or not orbax_util.is_orbax_checkpoint(path):
        return None
    if any(
        item.isdigit() and file_utils.isdir(file_utils.join(path, item))
        for item in file_utils.listdir(path)
    ):
        return orbax_util.find_latest_orbax_checkpoint(path)
    return path


def build_from_element_spec(model, element_spec) -> None:
    """Builds the model, its compiled metrics and loss, and its optimizer,
    from the spec of the data (`Trainer._symbolic_build`).

    Keras' TensorFlow trainer builds an unbuilt model only inside the first
    trace of its train function (outside a `tf.distribute` strategy), where
    the EMA cannot create its shadows before the step that uses them. Keras
    itself calls `_symbolic_build` under a strategy; no public method builds
    all of this from data.
    """
    model._symbolic_build(data_batch=element_spec)


def keras_version() -> tuple[int, ...]:
    return tuple(int(p) for p in keras.__version__.split(".")[:3] if p.isdigit())


def running_fit(model) -> dict:
    """The local variables of the `fit` of `model` that is running now, or
    `{}` outside one.

    Keras gives a callback no handle on the other callbacks of its `fit`,
    nor on whether the `fit` validates. Every trainer's `fit`
    (keras/src/backend/*/trainer.py) keeps both in locals before it calls
    `on_train_begin`: `callbacks` (the `CallbackList`) and `validation_data`
    (set from `validation_split` too). A user override of `fit` that calls
    Keras' own is skipped: the frame taken is the one holding a
    `CallbackList`.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            names = frame.f_locals
            if (
                frame.f_code.co_name == "fit"
                and names.get("self") is model
                and isinstance(names.get("callbacks"), keras.callbacks.CallbackList)
            ):
                return dict(names)
            frame = frame.f_back
        return {}
    finally:
        del frame


class FitContext(NamedTuple):
    """What a callback needs to know of the running `fit`, read once at its
    `on_train_begin` (`fit_context`)."""

    # The callbacks of the `fit` (empty outside one).
    callbacks: list
    # Its batch size, or `None` where it is unknown (outside `fit`, or data
    # that batches itself).
    batch_size: int | None
    # Whether it validates; `None` if unknown.
    validates: bool | None


def fit_context(model) -> FitContext:
    """The `FitContext` of the running `fit` of `model`.

    Every trainer's `fit` keeps its `epoch_iterator` in a local; its data
    adapter's `batch_size` is the batch size Keras uses (32 for arrays
    without `batch_size`), which `fit` passes to no callback.
    """
    names = running_fit(model)
    callbacks = names.get("callbacks")
    adapter = getattr(names.get("epoch_iterator"), "data_adapter", None)
    return FitContext(
        callbacks=list(callbacks.callbacks) if callbacks is not None else [],
        batch_size=getattr(adapter, "batch_size", None),
        validates=names.get("validation_data") is not None if names else None,
    )


def fit_callbacks(model) -> list:
    """The callbacks of the running `fit` of `model` (empty outside one)."""
    return fit_context(model).callbacks


def torch_variable_storage(variable, tensor) -> None:
    """Makes a torch-backend `keras.Variable` hold `tensor` (a view into a
    flat buffer) as its value.

    Keras' torch `Variable` keeps its tensor in `_value`, a
    `torch.nn.Parameter`; `assign` copies into it. Only by making each
    shadow a view of one flat buffer can the update blend all of them with
    a few whole-buffer ops.
    """
    import torch

    variable._value = torch.nn.Parameter(tensor, requires_grad=False)


def use_variables(model, replacements: dict) -> None:
    """Makes every layer of `model` hold `replacements[id(v)]` wherever it
    held the variable `v`.

    A Keras layer keeps its variables in two lists (`_trainable_variables`,
    `_non_trainable_variables`, read by `weights`) and in the attributes its
    `call` reads (`self.kernel`, or lists of them); no public method makes a
    layer compute with a variable it did not create, which the averaged
    model (a clone computing with the EMA's shadows) needs. Attributes are
    set with `object.__setattr__`: Keras' tracker would file a variable in a
    list a second time by its `trainable` flag. The torch backend's
    parameter dict of each layer is dropped, to be made again from the new
    variables when read.
    """
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for store in (layer._trainable_variables, layer._non_trainable_variables):
            store[:] = [replacements.get(id(v), v) for v in store]
        for name, value in list(vars(layer).items()):
            if isinstance(value, keras.Variable) and id(value) in replacements:
                object.__setattr__(layer, name, replacements[id(value)])
            elif isinstance(value, list) and not name.startswith("_"):
                value[:] = [
                    replacements.get(id(v), v) if isinstance(v, keras.Variable) else v
                    for v in value
                ]
        if keras.backend.backend() == "torch" and hasattr(layer, "_torch_params"):
            del layer._torch_params


def jax_hold_arrays(variables, arrays) -> None:
    """Makes each JAX variable hold the matching array as its value, as it
    is (`_value`): the arrays a jitted step returned, already of the
    variable's dtype and sharding. `assign` converts and checks each value
    first, a cost per variable that a model of many small weights pays at
    every step."""
    for variable, array in zip(variables, arrays, strict=True):
        variable._value = array


@contextlib.contextmanager
def jax_values_while_tracing(variables, values):
    """Makes each JAX variable of `variables` read as the matching traced
    value of `values` while a jitted step is traced.

    Keras' JAX train step maps the model's own variables to its traced
    state in a `StatelessScope`; any other variable the step reads is taken
    from its `_value` (`KerasVariable.value`), a concrete array the trace
    captures as a constant. An averaged model called in the step without
    being a sublayer of the model would then compute with the shadows as
    they were when the step was traced, for ever. Setting `_value` to the
    traced shadows for the trace, and back right after, makes them inputs of
    the compiled step.
    """
    saved = [variable._value for variable in variables]
    try:
        for variable, value in zip(variables, values, strict=True):
            variable._value = value
        yield
    finally:
        for variable, value in zip(variables, saved, strict=True):
            variable._value = value


def in_compiled_step() -> bool:
    """Whether the caller runs inside a step that Keras traces: JAX's train,
    test and predict steps run in a `StatelessScope` (also when eager), and
    TensorFlow's are graphs. Keras exposes the scope only privately."""
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    if in_stateless_scope():
        return True
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    return False


def all_layers(model) -> list:
    """Every layer of `model`, nested ones included (`Layer._flatten_layers`).

    `model.layers` lists only the direct children; Keras has no public
    recursive walk, and `recalibrate_batchnorm` must find the
    BatchNormalization layers of nested models and custom layers."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def input_batches(x, batch_size, steps):
    """The input batches of `x` as `model.predict` reads them (arrays,
    `tf.data.Dataset`, `PyDataset`, generators), as NumPy-convertible
    values, at most `steps` of them.

    Keras' data adapters (`keras.src.trainers.data_adapters`) turn every
    input `predict` accepts into batches; no public function exposes them
    outside a `fit`, `evaluate` or `predict`."""
    from keras.src.trainers import data_adapters

    adapter = data_adapters.get_data_adapter(
        x=x, batch_size=batch_size, steps_per_epoch=steps, shuffle=False
    )
    adapter.on_epoch_begin()
    try:
        for step, data in enumerate(adapter.get_numpy_iterator()):
            if steps is not None and step >= steps:
                break
            inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
            yield inputs
    finally:
        adapter.on_epoch_end()
