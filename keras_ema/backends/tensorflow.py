"""The EMA on TensorFlow.

At `fit` the model's `train_step` is wrapped (Keras' step, then the update
of every profile with `assign`s) and traced into Keras' own `tf.function`,
once per inner step when `steps_per_execution > 1`. Outside any
`tf.distribute` strategy the small shadows are updated in a few flat
variables (`Packing`) during `fit`. `HostEngine` keeps the shadows in host
memory: the update stays in the step's graph with its ops on the CPU, and
the weights are read inside the due branch, so a step that is not due copies
nothing.
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

from keras_ema import _internals
from keras_ema import update
from keras_ema.backends import base
from keras_ema.guard import Guard
from keras_ema.packing import Packing
from keras_ema.sizes import BRANCH_MEAN_ELEMENTS
from keras_ema.steps import any_optimizer_moved
from keras_ema.steps import counters_before
from keras_ema.steps import step_rule

# --------------------------------------------------------------------------
# Buffers and layouts


def fresh_copy(value, dtype):
    """A copy of `value` cast to `dtype` that shares no buffer with it."""
    return tf.identity(tf.cast(tf.convert_to_tensor(value), dtype))


def read(variable):
    """The variable's value now (a variable used as a tensor is only read
    when an op consumes it)."""
    return tf.identity(variable.value)


class Placement(base.Placement):
    """Shadows and counters created under the model's distribution strategy
    with `only_first_replica` aggregation: mirrored like the weights, and
    every replica computes the same EMA from the same mirrored weights."""

    aggregation = "only_first_replica"

    def scope(self, model):
        strategy = getattr(model, "distribute_strategy", None)
        return strategy.scope() if strategy is not None else contextlib.nullcontext()

    def initial_value(self, weight, dtype):
        return fresh_copy(weight.value, dtype)


# --------------------------------------------------------------------------
# The update inside Keras' train function


def keras_train_function_around(model, train_step, jit_compile=None):
    """Keras' own TF train function, traced around `train_step` (once per
    inner step when `steps_per_execution > 1`), with the model's
    `jit_compile` set to `jit_compile` for the trace when given."""
    saved = model.jit_compile
    with _internals.train_step_replaced(model, train_step):
        if jit_compile is not None:
            model.jit_compile = jit_compile
        try:
            model.make_train_function(force=True)
        finally:
            model.jit_compile = saved
    return model.train_function


def _mostly_large(variables) -> bool:
    """Whether the variables average `BRANCH_MEAN_ELEMENTS` or more."""
    sizes = [math.prod(v.shape) for v in variables]
    return sum(sizes) >= BRANCH_MEAN_ELEMENTS * len(sizes)


def as_stored(values, dtypes) -> list:
    """`values` read as stored inside one XLA computation (see
    `base.as_stored`), with TensorFlow's XLA optimization barrier."""
    return base.as_stored(values, dtypes, _internals.tf_optimization_barrier)


def _packs(model) -> bool:
    """Whether the model trains outside any `tf.distribute` strategy (its
    strategy is TF's default one, and none is in scope)."""
    if tf.distribute.has_strategy():
        return False
    return model.distribute_strategy is tf.distribute.get_strategy()


class _PackedShadows:
    """During `fit`, one flat `tf.Variable` per packed group of small
    shadows, per profile; larger shadows are updated in place."""

    def __init__(self, state):
        self.state = state
        self.packing = Packing(state.shadows, state.kinds, lambda shadow: "")
        self._flat = None
        self._current = False

    def ensure_current(self) -> None:
        """Creates the flat variables, or refreshes them from the shadow
        variables written since; eagerly, before a step runs."""
        if self._current:
            return
        with tf.init_scope():
            packed = [
                self.packing.pack([s.value for s in profile.shadows])
                for profile in self.state.profiles
            ]
            if self._flat is None:
                self._flat = [self._new_flat(n, p) for n, p in enumerate(packed)]
            else:
                for flats, values in zip(self._flat, packed, strict=True):
                    for variable, value in zip(flats, values, strict=True):
                        if variable is not None:
                            variable.assign(value)
        self._current = True

    def _new_flat(self, number: int, packed) -> list:
        return [
            keras.Variable(
                value, trainable=False, autocast=False, name=f"ema_packed_{number}_{i}"
            )
            if flat
            else None
            for i, (value, flat) in enumerate(
                zip(packed, self.packing.flat, strict=True)
            )
        ]

    def targets(self) -> list:
        """Per profile, the variable each group is updated in."""
        return [
            [
                flat if flat is not None else profile.shadows[group[0]]
                for flat, group in zip(flats, self.packing.groups, strict=True)
            ]
            for flats, profile in zip(self._flat, self.state.profiles, strict=True)
        ]

    @property
    def live(self) -> bool:
        """Whether the flat variables hold the latest averages (those of the
        small shadows' variables may be older)."""
        return self._flat is not None and self._current

    def flush(self) -> None:
        if not self.live:
            return
        for flats, profile in zip(self._flat, self.state.profiles, strict=True):
            values = self.packing.unpack(
                [v.value if v is not None else None for v in flats]
            )
            for shadow, value in zip(profile.shadows, values, strict=True):
                if value is not None:
                    shadow.assign(value)

    def reload(self) -> None:
        self._current = False

    def host_shadows(self) -> list[list]:
        """`Engine.host_shadows` while `live`, sliced on the host from one
        copy of each flat variable: no eager op per shadow."""
        copies = []
        for flats, profile in zip(self._flat, self.state.profiles, strict=True):
            arrays = [
                base.host_copy(
                    (flat if flat is not None else profile.shadows[group[0]]).value
                )
                for flat, group in zip(flats, self.packing.groups, strict=True)
            ]
            copies.append(self.packing.unpack(arrays, reshape=np.reshape))
        return copies


def assign_update(
    state, run, read_values, stepped=None, blend=None, packed=None, xla=False
):
    """Runs `run` (`update.update_all` or `update_when_due`) on the values of
    the counters and shadows (or of `packed`'s variables), and assigns the
    results; returns the new counters and the decays. `xla`: whether it runs
    in a function XLA compiles."""
    targets = [p.shadows for p in state.profiles]
    kinds = state.kinds
    if packed is not None:
        targets, kinds = packed.targets(), packed.packing.kinds
    counters = [read(v) for v in state.counters]
    shadows = [[read(v) for v in profile] for profile in targets]
    counters, shadows, decays = run(
        state.schedules,
        kinds,
        counters,
        shadows,
        read_values,
        stepped,
        blend or update.blend_elementwise,
        Guard.XLA if xla else Guard.EAGER,
    )
    variables = [*state.counters, *(v for profile in targets for v in profile)]
    values = [*counters, *(v for profile in shadows for v in profile)]
    _assign_all(variables, values)
    return counters, decays


def _assign_all(variables, values) -> None:
    """`variable.assign(value)` for every pair, with one cross-replica call.

    Under a `tf.distribute` strategy each `assign` of a mirrored variable in
    a replica context is its own `merge_call`, a synchronisation of the
    replicas per variable. As Keras' optimizer does for its updates, the
    writes go through one `merge_call` and `extended.update`, which writes
    each replica's own value to that replica's copy.
    """
    replica = tf.distribute.get_replica_context()
    if replica is None or not tf.distribute.has_strategy():
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)
        return

    def assign_in_cross_replica_context(distribution, variables, values):
        for variable, value in zip(variables, values, strict=True):
            distribution.extended.update(
                variable, lambda v, x: v.assign(x), args=(value,), group=False
            )

    replica.merge_call(
        assign_in_cross_replica_context,
        args=([v.value for v in variables], values),
    )


class Engine(base.Engine):
    def __init__(self, state):
        super().__init__(state)
        # An averaged model reads the shadow variables in the train step:
        # they are updated in place.
        packs = _packs(self.model) and not state.averaged_models
        self.packed = _PackedShadows(state) if packs else None
        self._eager_update = None

    def flush(self) -> None:
        if self.packed is not None:
            self.packed.flush()

    def reload(self) -> None:
        if self.packed is not None:
            self.packed.reload()

    def host_shadows(self) -> list[list]:
        if self.packed is not None and self.packed.live:
            return self.packed.host_shadows()
        return super().host_shadows()

    def _fit_update(self):
        """The update a step of `fit` runs after Keras' step, as a function of
        whether the optimizer moved the weights (`stepped`): the update
        function, blend and packed variables chosen for this model. Returns
        the new counters and the decays."""
        state, model, packed = self.state, self.model, self.packed
        # Keras resolves `jit_compile="auto"` to False on a CPU-only machine.
        xla = bool(model.jit_compile) and not model.run_eagerly
        blend = (
            update.blend_by_branches
            if not xla and _mostly_large(state.shadows)
            else update.blend_elementwise
        )
        run = update.update_when_due if base.gated(state) else update.update_all
        if packed is not None:
            packed.ensure_current()
        dtypes = [s.dtype for s in state.shadows]

        def read_values():
            values = [read(w) for w in state.weights]
            if xla:
                values = as_stored(values, dtypes)
            return packed.packing.pack(values) if packed is not None else values

        def fit_update(stepped=None):
            return assign_update(state, run, read_values, stepped, blend, packed, xla)

        return fit_update, xla

    def build_train_function(self):
        state, model, packed = self.state, self.model, self.packed
        rule = step_rule(model)
        keras_train_step = model.train_step
        fit_update, _ = self._fit_update()

        def train_step(data):
            before = counters_before(rule, read)
            logs = keras_train_step(data)
            stepped = any_optimizer_moved(rule, read, before)
            counters, decays = fit_update(stepped)
            return base.ema_logs(logs, state, decays, counters[1])

        fused = keras_train_function_around(model, train_step)
        if packed is None:
            return fused

        def train_function(iterator):
            # The shadow variables may have been written since the last step
            # (a state loaded by `BackupAndRestore`, a swap): repack them.
            packed.ensure_current()
            return fused(iterator)

        return train_function

    def update(self) -> None:
        state = self.state
        if self._eager_update is None:
            self._eager_update = tf.function(
                lambda: assign_update(
                    state,
                    update.update_when_due,
                    lambda: [read(w) for w in state.weights],
                    blend=update.blend_by_branches,
                )[0],
                autograph=False,
            )
        # It updates the shadow variables themselves.
        self.flush()
        self.reload()
        self._eager_update()

    # -- for measurement -----------------------------------------------------

    def update_timer(self):
        """The update a step of `fit` runs after Keras' step, alone (the same
        `_fit_update`), in a `tf.function` compiled with XLA when the model's
        steps are. The variables are current again after a `flush()`."""
        fit_update, xla = self._fit_update()

        @tf.function(jit_compile=xla, autograph=False)
        def update_alone():
            fit_update()

        return update_alone


class Backend(base.Backend):
    """The TensorFlow backend's buffer operations (see `base.Backend`)."""

    def fresh_copy(self, value, dtype):
        return fresh_copy(value, dtype)

    def start_when_built(self, model, start):
        """Calls `start()` once `model` is built, before its first train step.

        TensorFlow defers building a model that was never called to the first
        trace of its train function, which comes after `on_train_begin`. The
        train function is wrapped for its first call: the model (and its
        optimizer) is built symbolically from the data's element spec, as Keras
        does under a `tf.distribute` strategy, then `start()` installs the EMA,
        which then runs the step. Returns the function that undoes the wrapping
        if no step ran.
        """
        keras_train_function = model.train_function

        def train_function(iterator):
            model.train_function = keras_train_function
            _internals.build_from_element_spec(model, iterator.element_spec)
            start()
            return model.train_function(iterator)

        model.train_function = train_function

        def undo() -> None:
            if model.train_function is train_function:
                model.train_function = keras_train_function

        return undo
