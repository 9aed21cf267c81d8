"""Backend-specific code, all in one place.

Everything else in `keras_ema` is written with `keras.ops`. This module holds
what cannot be: buffer copies and layouts, and how the fused update is placed
inside each backend's compiled train step.

- TensorFlow: the model's `train_step` is wrapped so the update is traced
  into the same `tf.function` (and into every inner step when
  `steps_per_execution > 1`).
- JAX: Keras' train step is a pure function of an explicit, donated state.
  The EMA state is threaded beside it through one `jax.jit` that runs the
  model's `train_step` and then the update, so no shadow ever aliases a model
  buffer.
- torch: the shadows are views into one flat buffer per dtype, so the update
  after the eager train step is a handful of whole-buffer ops whatever the
  number of variables, with the schedule decided on the host (no device sync).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math

import keras
from keras import ops

from keras_ema import _internals

BACKEND = keras.backend.backend()


# --------------------------------------------------------------------------
# Buffers


def fresh_copy(value, dtype: str):
    """A copy of `value` cast to `dtype` that shares no buffer with it."""
    if BACKEND == "jax":
        import jax.numpy as jnp

        return jnp.array(value, dtype=dtype, copy=True)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.identity(tf.cast(tf.convert_to_tensor(value), dtype))
    if BACKEND == "torch":
        import torch

        return value.detach().to(dtype=getattr(torch, dtype), copy=True)
    return ops.copy(ops.cast(value, dtype))


def read(variable):
    """The variable's value now, as a tensor (an explicit read on TF, where a
    variable used as a tensor is only read when an op consumes it)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.identity(variable.value)
    return variable.value


def snapshot(variable):
    """The current value of a variable, safe from later in-place writes."""
    if BACKEND == "jax":
        return variable.value  # assign() rebinds; the array itself never changes
    return fresh_copy(variable.value, keras.backend.standardize_dtype(variable.dtype))


def online_backup(model, tracked) -> list:
    """What a swap must be able to put back, as `(variable, value)` pairs.

    The tracked weights' own values (the EMA weights replace them). On JAX,
    also a copy of every other model variable: Keras' JAX `evaluate` and
    `predict` take all of them out of the model while they run, and donate
    (delete) their arrays, so an interrupted one leaves them without a value
    (a Dropout layer's seed state, integer weights).
    """
    pairs = [(weight, snapshot(weight)) for weight in tracked]
    if BACKEND == "jax":
        ids = {id(weight) for weight in tracked}
        pairs += [
            (variable, fresh_copy(variable.value, variable.value.dtype))
            for variable in model.variables
            if id(variable) not in ids and variable.value is not None
        ]
    return pairs


def restore_backup(model, backup) -> None:
    """Puts `online_backup`'s values back, bit for bit (no arithmetic).

    On JAX, Keras' state of an interrupted `evaluate`/`predict` is synced
    into the model first (public `jax_state_sync`): left pending, it would
    overwrite the restored values at the next read of `callback.model`.
    """
    if BACKEND == "jax":
        model.jax_state_sync()
    for variable, value in backup:
        variable.assign(value)


def variable_scope(model):
    """Where shadows must be created so they are laid out like the weights."""
    if BACKEND == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        if strategy is not None:
            return strategy.scope()
    return contextlib.nullcontext()


def variable_aggregation() -> str:
    # Every replica computes the same EMA from the same mirrored weights.
    return "only_first_replica" if BACKEND == "tensorflow" else "none"


def shadow_layout(weight):
    """The layout a shadow of `weight` is created with, or `None`.

    On JAX under a `keras.distribution` it is the weight's own sharding.
    Passed to `keras.Variable(layout=...)` it overrides the distribution's
    default (replicated, or the `LayoutMap` entry that matches the shadow's
    own path), so a sharded weight's shadow is never gathered, even briefly.
    """
    if BACKEND == "jax":
        sharding = getattr(weight.value, "sharding", None)
        if _spans_devices(sharding):
            return sharding
    return None


def counter_layout(weights):
    """The layout of the counters: replicated over the weights' devices.

    The counters and the shadows enter one jitted update, which JAX refuses
    when its arguments are committed to different devices; this holds even
    when the EMA is created outside the distribution's scope.
    """
    if BACKEND == "jax":
        import jax

        for weight in weights:
            sharding = getattr(weight.value, "sharding", None)
            if _spans_devices(sharding) and hasattr(sharding, "mesh"):
                return jax.sharding.NamedSharding(
                    sharding.mesh, jax.sharding.PartitionSpec()
                )
    return None


def _spans_devices(sharding) -> bool:
    return sharding is not None and len(sharding.device_set) > 1


def check_placement(weights) -> None:
    """Raises where the EMA cannot be laid out like the weights.

    Keras' torch trainer runs on one device and ignores `keras.distribution`
    (the weights stay unsharded, every process trains alone); the torch
    update also keeps all shadows in one flat buffer, on one device.
    """
    if BACKEND != "torch":
        return
    distribution = keras.distribution.distribution()
    if distribution is not None:
        raise ValueError(
            "`keras_ema.EMA` does not support `keras.distribution` on the "
            "torch backend: Keras' torch trainer ignores it and trains on one "
            "device. Use the JAX backend for `keras.distribution`, or unset "
            "the distribution (`keras.distribution.set_distribution(None)`). "
            f"Received: distribution={distribution}"
        )
    devices = {str(w.value.device) for w in weights}
    if len(devices) > 1:
        raise ValueError(
            "On the torch backend `keras_ema.EMA` needs all floating-point "
            "weights of the model on one device. Received weights on "
            f"devices={sorted(devices)}"
        )


def match_layout(shadow, weight) -> None:
    """Places a shadow exactly like its weight (same device or sharding)."""
    if BACKEND == "jax":
        import jax

        sharding = getattr(weight.value, "sharding", None)
        if sharding is not None and not _spans_devices(sharding):
            shadow._layout = getattr(weight, "_layout", None)
            shadow._value = jax.device_put(shadow._value, sharding)
    elif BACKEND == "torch":
        device = weight.value.device
        if shadow.value.device != device:
            shadow._value = shadow._value.to(device)


# --------------------------------------------------------------------------
# EMA state held outside the variables while training


class LiveValues:
    """Where the EMA state lives between reads (base: in the variables).

    `sync_to_variables()` makes the shadow and counter `keras.Variable`s
    current; `invalidate()` tells the owner the variables were written from
    outside (a loaded state, a copy) and must be re-read.
    """

    def __init__(self, state):
        self._state = state

    def sync_to_variables(self) -> None:
        pass

    def invalidate(self) -> None:
        pass

    def release(self) -> None:
        self.sync_to_variables()
        self.invalidate()


def _committed_copy(array):
    """A copy of a JAX array committed to the array's own devices.

    `jax.jit` compiles once per placement of its arguments, and the arrays it
    returns are committed. Feeding it an uncommitted copy at the start of a
    `fit` would make every `fit` compile the fused step again.
    """
    import jax

    return jax.device_put(array, array.sharding, may_alias=False)


def _committed(tree):
    """`tree` with every uncommitted array committed to its device.

    Keras starts each epoch with some uncommitted arrays in its state (fresh
    variables, metrics just reset); the step's outputs are committed. Keras'
    own step takes either without compiling again, but a step that also
    takes the (committed) EMA arrays is compiled once per mix of the two, so
    a new epoch or `fit` would compile it again. Committing everything at an
    epoch's first step keeps one compiled step for all of them.
    """
    import jax

    def commit(array):
        if getattr(array, "committed", True):
            return array
        return jax.device_put(array, array.sharding)

    return jax.tree.map(commit, tree)


class Packing:
    """How the shadows are laid out in the arrays or variables a `fit`
    updates (JAX and TensorFlow).

    Small shadows of one dtype, kind and placement are packed into flat
    arrays of up to `CHUNK` elements; larger ones keep their own. A fused
    step then reads and writes a few arrays instead of one per weight: JAX
    pays for each array a jitted call takes and returns, XLA on CPU runs an
    elementwise kernel per array, TensorFlow runs every op of the update
    once per array, and the NaN/Inf guard checks the packed values, which it
    would otherwise concatenate. The chunks stay small because XLA on CPU
    splits a larger kernel over threads, which cost more than they saved in
    `benchmarks/` on 2 cores (JAX deep_mlp: 1.22x the built-in EMA with one
    flat array, 1.03x with chunks of 2**15). Large shadows are not packed:
    that would copy them every step, and gather a sharded one.

    Args:
        state: The `ShadowState`.
        placement: Maps a shadow to where it lives (a hashable), or to
            `None` where it must keep its own array.
    """

    def __init__(self, state, placement):
        from keras_ema.shadow import CHUNK

        groups: dict = {}
        sizes: dict = {}
        for index, (shadow, kind) in enumerate(
            zip(state.shadows, state.kinds, strict=True)
        ):
            size = math.prod(shadow.shape)
            where = placement(shadow) if size <= CHUNK else None
            key = index
            if where is not None:
                key = (shadow.dtype, int(kind), where, 0)
                while sizes.get(key, 0) + size > CHUNK:
                    key = (*key[:3], key[3] + 1)
                sizes[key] = sizes.get(key, 0) + size
            groups.setdefault(key, []).append(index)
        self.groups = list(groups.values())
        self.flat = [not isinstance(key, int) for key in groups]
        self.kinds = [state.kinds[group[0]] for group in self.groups]
        self.dtypes = [state.shadows[group[0]].dtype for group in self.groups]
        self.shapes = [tuple(shadow.shape) for shadow in state.shadows]
        self.shadow_dtypes = [shadow.dtype for shadow in state.shadows]

    def pack(self, values) -> list:
        """One value per group from values aligned with the shadows, each
        cast to its shadow's dtype."""
        packed = []
        for group, flat, dtype in zip(self.groups, self.flat, self.dtypes, strict=True):
            if flat:
                parts = [ops.reshape(ops.cast(values[i], dtype), (-1,)) for i in group]
                packed.append(ops.concatenate(parts))
            else:
                packed.append(ops.cast(values[group[0]], dtype))
        return packed

    def unpack(self, packed) -> list:
        """Values aligned with the shadows, from the packed values."""
        values = [None] * len(self.shapes)
        for group, flat, value in zip(self.groups, self.flat, packed, strict=True):
            if not flat:
                values[group[0]] = value
                continue
            offset = 0
            for index in group:
                size = math.prod(self.shapes[index])
                part = value[offset : offset + size]
                values[index] = ops.reshape(part, self.shapes[index])
                offset += size
        return values


def _jax_placement(shadow):
    sharding = shadow.value.sharding
    return sharding if sharding.is_fully_replicated else None


class _JaxLiveValues(LiveValues):
    """During a JAX `fit`, the EMA state lives in arrays the loop donates:
    the three counters, then the shadows packed by a `Packing`.

    With `update_every > 1` the steps that are not due may run Keras' own
    train step, decided on the host: they are counted in `pending` and added
    to the step counter by the next due step (or a sync).
    """

    def __init__(self, state):
        super().__init__(state)
        self._arrays = None
        self._packing = None
        self._unpack = None
        self.pending = 0
        self._host_step = None

    def advance_host_step(self) -> int:
        """The step counter before this step, then counts this step; the
        device counter is read once after the arrays are (re)made."""
        if self._host_step is None:
            import jax

            self._host_step = int(jax.device_get(self.arrays()[0])) + self.pending
        step = self._host_step
        self._host_step += 1
        return step

    @property
    def packing(self) -> Packing:
        if self._packing is None:
            import jax

            self._packing = Packing(self._state, _jax_placement)
            # One dispatch for all the slices; the outputs are new buffers.
            self._unpack = jax.jit(self._packing.unpack)
        return self._packing

    def arrays(self) -> list:
        if self._arrays is None:
            state = self._state
            counters = [_committed_copy(v.value) for v in state.counters]
            packing = self.packing
            packed = packing.pack([v.value for v in state.shadows])
            packed = [
                _committed(array) if flat else _committed_copy(array)
                for array, flat in zip(packed, packing.flat, strict=True)
            ]
            self._arrays = counters + packed
        return self._arrays

    def set_arrays(self, arrays: list) -> None:
        self._arrays = arrays

    def sync_to_variables(self) -> None:
        if self._arrays is None:
            return
        state = self._state
        counters, packed = self._arrays[:3], self._arrays[3:]
        # Copies: the arrays stay the loop's to donate.
        values = [counters[0] + self.pending]
        values += [fresh_copy(a, a.dtype) for a in counters[1:]]
        values += self._unpack(packed)
        for variable, value in zip(state.state_variables, values, strict=True):
            variable.assign(value)

    def invalidate(self) -> None:
        self._arrays = None
        self.pending = 0
        self._host_step = None


class _TensorFlowLiveValues(LiveValues):
    """During a TensorFlow `fit`, small shadows live in flat variables.

    One `tf.Variable` per packed group (see `Packing`), written by the fused
    step; the shadows that are not packed are updated in place. Not used
    under a `tf.distribute` strategy, where every shadow stays a mirrored
    variable of its own.
    """

    def __init__(self, state):
        super().__init__(state)
        self.packing = Packing(state, lambda shadow: "")
        self._flat = None
        self._current = False

    def ensure_current(self) -> None:
        """Creates the flat variables, or refreshes them from the shadow
        variables written since; eagerly, before a step runs."""
        import tensorflow as tf

        if self._current:
            return
        state, packing = self._state, self.packing
        with tf.init_scope():
            packed = packing.pack([s.value for s in state.shadows])
            if self._flat is None:
                self._flat = [
                    keras.Variable(
                        value,
                        trainable=False,
                        autocast=False,
                        name=f"ema_packed_{index}",
                    )
                    if flat
                    else None
                    for index, (value, flat) in enumerate(
                        zip(packed, packing.flat, strict=True)
                    )
                ]
            else:
                for variable, value in zip(self._flat, packed, strict=True):
                    if variable is not None:
                        variable.assign(value)
        self._current = True

    def targets(self) -> list:
        """The variable each group is updated in, flat or the shadow's own."""
        return [
            flat if flat is not None else self._state.shadows[group[0]]
            for flat, group in zip(self._flat, self.packing.groups, strict=True)
        ]

    def sync_to_variables(self) -> None:
        if self._flat is None or not self._current:
            return
        values = self.packing.unpack(
            [v.value if v is not None else None for v in self._flat]
        )
        for shadow, value in zip(self._state.shadows, values, strict=True):
            if value is not None:
                shadow.assign(value)

    def invalidate(self) -> None:
        self._current = False


class _TorchLiveValues(LiveValues):
    """On torch the counters live on the host, inside the `TorchKernel`."""

    def __init__(self, state):
        super().__init__(state)
        self.kernel = TorchKernel(state)

    def sync_to_variables(self) -> None:
        self._state.step.assign(self.kernel.step_value)
        self._state.initialized.assign(int(self.kernel.initialized))

    def invalidate(self) -> None:
        self.kernel.read_counters()


def live_values(state) -> LiveValues:
    if state.offload:
        return host_live_values(state)
    if BACKEND == "jax":
        return _JaxLiveValues(state)
    if BACKEND == "torch":
        return _TorchLiveValues(state)
    if BACKEND == "tensorflow" and _tf_packs(state):
        return _TensorFlowLiveValues(state)
    return LiveValues(state)


def _tf_packs(state) -> bool:
    """Whether the model trains outside any `tf.distribute` strategy (its
    strategy is TF's default one, and none is in scope)."""
    import tensorflow as tf

    if tf.distribute.has_strategy():
        return False
    return state.model.distribute_strategy is tf.distribute.get_strategy()


# --------------------------------------------------------------------------
# The fused update inside `fit`


def _optimizer_step_gate(optimizer):
    """How to tell, inside a train step, whether the weights really moved.

    Returns `(iterations_variable, accumulation_steps)`; the weights moved in
    a step when the iteration counter advanced and, under gradient
    accumulation, reached a multiple of the accumulation steps.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    accumulation = getattr(inner, "gradient_accumulation_steps", None)
    return _internals.raw_iterations(inner), accumulation


class _HostStepGate:
    """The optimizer's iteration counter mirrored on the host.

    Read once when training starts, then advanced per train step, so no step
    waits for the device to tell whether the weights moved. Under gradient
    accumulation the weights move when the counter reaches a multiple of the
    accumulation steps. A `LossScaleOptimizer` skips steps whose gradients
    overflow, which only the device knows: with one, every step reads the
    counter back (a device sync per step, the price of exact counting).
    """

    def __init__(self, optimizer):
        self.iterations, self.accumulation = _optimizer_step_gate(optimizer)
        self.reads_device = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.sync()

    def sync(self) -> None:
        """Re-reads the counter (once per `fit`: `train_on_batch` may have
        advanced it in between)."""
        self.count = int(ops.convert_to_numpy(self.iterations.value))

    def advance(self, iterations) -> bool:
        """Whether the step just run moved the weights, given the optimizer's
        counter after it (a device array, read only when it must be)."""
        if self.reads_device:
            before, self.count = self.count, int(iterations)
            if self.count == before:
                return False
        else:
            self.count += 1
        return not self.accumulation or self.count % self.accumulation == 0


def _optimizer_may_skip(optimizer) -> bool:
    """Whether a train step can leave the weights as they were: under
    gradient accumulation, or a LossScaleOptimizer's skipped step."""
    accumulation = _optimizer_step_gate(optimizer)[1]
    return bool(accumulation) or isinstance(
        optimizer, keras.optimizers.LossScaleOptimizer
    )


def _real_step(before, after, accumulation_steps):
    moved = ops.greater(after, before)
    if accumulation_steps:
        moved = ops.logical_and(moved, ops.equal(ops.mod(after, accumulation_steps), 0))
    return moved


def _ema_logs(logs, counters, decay) -> dict:
    logs = dict(logs)
    logs["ema_decay"] = decay
    logs["ema_skipped"] = counters[2]
    return logs


class _FusedTraining:
    """Installs the EMA update in a model's training and takes it out again."""

    # Whether a built train function may serve the next `fit` too. Tracing
    # (TF) or compiling (JAX) it again would cost every `fit` call far more
    # than the EMA itself; Keras keeps its own train function across fits.
    reusable = True

    def __init__(self, state):
        self.state = state
        self.model = state.model
        self._keras_train_function = None
        self._fused_train_function = None

    @property
    def installed(self) -> bool:
        return (
            self._fused_train_function is not None
            and self.model.train_function is self._fused_train_function
        )

    def install(self) -> None:
        current = self.model.train_function
        if current is self._fused_train_function and current is not None:
            return
        # `compile` resets the train function: then the fused one is stale.
        stale = current is not self._keras_train_function
        if stale or self._fused_train_function is None or not self.reusable:
            self._keras_train_function = current
            self._fused_train_function = self._build()
        self.model.train_function = self._fused_train_function

    def uninstall(self) -> None:
        if self.installed:
            self.model.train_function = self._keras_train_function
        self._restore_model()
        self.state.live.release()

    def start_epoch(self) -> None:
        """Called at each epoch's start, when Keras has reset its metrics."""

    def _build(self):
        raise NotImplementedError

    def _restore_model(self) -> None:
        pass


class _TensorFlowTraining(_FusedTraining):
    def _build(self):
        state, model = self.state, self.model
        iterations, accumulation = _optimizer_step_gate(model.optimizer)
        may_skip = _optimizer_may_skip(model.optimizer)
        keras_train_step = model.train_step
        # Keras resolves `jit_compile="auto"` to False on a CPU-only machine.
        xla = bool(model.jit_compile) and not model.run_eagerly
        branch = not xla and _mostly_large(state.shadows)
        live = state.live
        packed = live if isinstance(live, _TensorFlowLiveValues) else None
        if packed is not None:
            packed.ensure_current()

        def train_step(data):
            before = read(iterations) if may_skip else None
            logs = keras_train_step(data)
            real = None
            if may_skip:
                real = _real_step(before, read(iterations), accumulation)
            counters, decay = _assign_update(
                state, real, branch_on_scalars=branch, xla=xla, packed=packed
            )
            return _ema_logs(logs, counters, decay)

        fused = _keras_train_function_around(model, train_step)
        if packed is None:
            return fused

        def train_function(iterator):
            # The shadow variables may have been written since the last step
            # (a state loaded by `BackupAndRestore`, a swap): repack them.
            packed.ensure_current()
            return fused(iterator)

        return train_function


def _keras_train_function_around(model, train_step, jit_compile=None):
    """Keras' own TF train function, traced around `train_step` (once per
    inner step when `steps_per_execution > 1`), with the model's
    `jit_compile` set to `jit_compile` for the trace when given."""
    saved = model.jit_compile
    model.train_step = train_step
    if jit_compile is not None:
        model.jit_compile = jit_compile
    try:
        model.make_train_function(force=True)
    finally:
        del model.train_step
        if jit_compile is not None:
            model.jit_compile = saved
    return model.train_function


def _mostly_large(variables) -> bool:
    """Whether the variables average 2**16 elements or more.

    Without XLA, TF runs every op as a pass over memory: an elementwise
    select costs a pass over each tensor, while a `tf.cond` costs a fixed
    Switch/Merge per tensor. Measured on 2 CPU cores (benchmarks/), branching
    cut the update of an 11M-parameter MLP from about 77 to 10 ms a step,
    and doubled that of an MLP of 80 small weights.
    """
    sizes = [math.prod(v.shape) for v in variables]
    return sum(sizes) >= (1 << 16) * len(sizes)


def as_stored(values, dtypes) -> list:
    """`values` with each one narrower than its shadow's dtype read as stored.

    Inside one XLA computation, a bfloat16 or float16 weight that the
    optimizer has just computed in float32 and that the EMA casts back to
    float32 may skip its rounding (XLA allows excess precision), so the EMA
    would average values the model never held. An optimization barrier
    makes the update read the stored weight.
    """
    narrow = [
        i
        for i, (value, dtype) in enumerate(zip(values, dtypes, strict=True))
        if keras.backend.standardize_dtype(value.dtype) != dtype
    ]
    if not narrow:
        return list(values)
    values = list(values)
    if BACKEND == "jax":
        from jax.lax import optimization_barrier

        stored = optimization_barrier([values[i] for i in narrow])
    elif BACKEND == "tensorflow":
        # TF's own XLA op; it has no public name.
        from tensorflow.compiler.tf2xla.python.xla import optimization_barrier

        stored = optimization_barrier(*[values[i] for i in narrow])
    else:
        return values
    for i, value in zip(narrow, stored, strict=True):
        values[i] = value
    return values


def _assign_update(
    state, real, weights=None, branch_on_scalars=False, xla=False, packed=None
):
    """The fused update applied to the variables, for TF graphs and eager.

    `weights` are the online values, or a function returning them (called
    only on a due step); by default the tracked weights, read now. `xla`
    says the update is compiled with XLA together with the train step.
    `packed`, a `_TensorFlowLiveValues`, updates its packed variables
    instead of the shadows.
    """
    from keras_ema.shadow import fused_update

    targets, kinds = state.shadows, state.kinds
    if packed is not None:
        targets, kinds = packed.targets(), packed.packing.kinds
    counters = [read(v) for v in state.counters]
    shadows = [read(v) for v in targets]
    if weights is None:
        weights = [read(w) for w in state.weights]
        if xla:
            weights = as_stored(weights, [s.dtype for s in state.shadows])
        if packed is not None:
            weights = packed.packing.pack(weights)
    counters, shadows, decay = fused_update(
        state.schedule,
        kinds,
        counters,
        shadows,
        weights,
        real,
        branch_on_scalars=branch_on_scalars,
    )
    for variable, value in zip(
        [*state.counters, *targets], [*counters, *shadows], strict=True
    ):
        variable.assign(value)
    return counters, decay


class _JaxTraining(_FusedTraining):
    _first_step = True

    def start_epoch(self) -> None:
        self._first_step = True

    def _build(self):
        import jax

        from keras_ema.shadow import fused_update

        state, model = self.state, self.model
        iterations, accumulation = _optimizer_step_gate(model.optimizer)
        locate = _jax_state_locator(model, state.weights)
        iterations_index = _index_of(model.optimizer.variables, iterations)
        may_skip = _optimizer_may_skip(model.optimizer)
        keras_train_step = model.train_step
        packing = state.live.packing
        schedule = state.schedule
        # Without optimizer steps that may not move the weights, whether a
        # step is due is known on the host: the other steps run Keras' own
        # train step, with no EMA op at all.
        skip_on_host = schedule.update_every > 1 and not may_skip

        def fused_step(keras_state, ema_arrays, data, pending):
            before = keras_state[2][iterations_index]
            logs, keras_state = keras_train_step(keras_state, data)
            real = None
            if may_skip:
                after = keras_state[2][iterations_index]
                real = _real_step(before, after, accumulation)
            counters = [ema_arrays[0] + pending, *ema_arrays[1:3]]
            counters, shadows, decay = fused_update(
                schedule,
                packing.kinds,
                counters,
                ema_arrays[3:],
                packing.pack(as_stored(locate(keras_state), packing.shadow_dtypes)),
                real,
                known_due=skip_on_host,
            )
            logs = _ema_logs(logs, counters, decay)
            return logs, keras_state, [*counters, *shadows]

        keras_step = keras_train_step
        if not model.run_eagerly and model.jit_compile:
            keras_shardings = _internals.jax_train_out_shardings(model)
            out_shardings = keras_shardings
            if out_shardings is not None:
                ema_shardings = [a.sharding for a in state.live.arrays()]
                out_shardings = (*out_shardings, ema_shardings)
            fused_step = jax.jit(
                fused_step, donate_argnums=(0, 1), out_shardings=out_shardings
            )
            if skip_on_host:
                keras_step = jax.jit(
                    keras_train_step, donate_argnums=0, out_shardings=keras_shardings
                )
        steps_per_execution = model.steps_per_execution
        live = state.live

        def train_function(keras_state, iterator):
            if self._first_step:
                keras_state = _committed(keras_state)
                self._first_step = False
            logs = None
            for data in _batches(iterator, steps_per_execution):
                if skip_on_host:
                    step = live.advance_host_step()
                    if step % schedule.update_every:
                        logs, keras_state = keras_step(keras_state, data)
                        live.pending += 1
                        counters = (None, None, live.arrays()[2])
                        logs = _ema_logs(logs, counters, schedule.decay(step + 1))
                        continue
                arrays = live.arrays()
                logs, keras_state, arrays = fused_step(
                    keras_state, arrays, data, live.pending
                )
                live.pending = 0
                live.set_arrays(arrays)
            return logs, keras_state

        return train_function


def _batches(iterator, steps_per_execution: int):
    """The batches of one JAX `train_function` call, as Keras takes them: up
    to `steps_per_execution`, and a `StopIteration` (the epoch's end) only
    when there is not even one."""
    first = next(iterator)
    return itertools.chain([first], itertools.islice(iterator, steps_per_execution - 1))


def _index_of(variables, target) -> int:
    for index, variable in enumerate(variables):
        if variable is target:
            return index
    raise ValueError(f"Variable {target.path!r} is not among the optimizer's.")


def _jax_state_locator(model, weights):
    """Maps the tracked weights to their slots in Keras' JAX train state."""
    slots = {id(v): (0, i) for i, v in enumerate(model.trainable_variables)}
    slots.update({id(v): (1, i) for i, v in enumerate(model.non_trainable_variables)})
    positions = [slots[id(w)] for w in weights]

    def locate(keras_state):
        return [keras_state[group][index] for group, index in positions]

    return locate


class _TorchTraining(_FusedTraining):
    # Building is cheap here (no tracing), and it re-reads the optimizer's
    # counter, which `train_on_batch` may have advanced between fits.
    reusable = False

    def _build(self):
        model = self.model
        keras_train_function = self._keras_train_function
        kernel = self.state.live.kernel
        # With a LossScaleOptimizer the gate reads the counter every step, but
        # Keras' torch `cond` has already read the overflow flag on the host
        # to skip or apply the step, so that adds no new device sync.
        gate = _HostStepGate(model.optimizer)

        def train_function(data):
            logs = keras_train_function(data)
            decay = kernel.step(gate.advance(gate.iterations.value))
            return _ema_logs(logs, (None, None, self.state.skipped.value), decay)

        return train_function


class TorchKernel:
    """The article's `update()` on torch with the schedule kept on the host.

    Counters are mirrored as Python ints (written to the counter variables
    after each update, a host-to-device copy that never waits on the device);
    only the non-finite check is decided on the device.
    """

    def __init__(self, state):
        import torch

        from keras_ema.shadow import Kind

        self.torch = torch
        self.state = state
        self.read_counters()
        self.flat = _flat_shadows(state)
        # Same order as the flat buffer: grouped by kind.
        self.views = [state.weights[i].value.reshape(-1) for i in state.flat_order]
        kinds = state.kinds
        self.segments = {
            kind: _segment(self.flat, state, [k == kind for k in kinds])
            for kind in Kind
        }
        self.in_place = self._blends_in_place()
        if self.in_place:
            offsets = itertools.accumulate((v.numel() for v in self.views), initial=0)
            self.pairs = [
                (kinds[i], self.flat[start : start + view.numel()], view, weight)
                for i, start, view, weight in zip(
                    state.flat_order,
                    offsets,
                    self.views,
                    [state.weights[i].value for i in state.flat_order],
                    strict=False,
                )
            ]

    def _blends_in_place(self) -> bool:
        """Whether to blend each shadow in place from its weight (on the CPU,
        for models of 2**20 elements or more, all of the shadows' dtype).

        On the CPU, reading the NaN/Inf flag costs no device sync, so a
        skipped step can be decided on the host, and each shadow blended in
        place from its own weight: no flat copy of the weights, no
        temporary. For an 11M-parameter MLP that is five passes over 44 MB
        fewer per step. Small models keep the flat path: one op for all
        weights costs less than one per weight.
        """
        return (
            self.flat.device.type == "cpu"
            and self.flat.numel() >= 1 << 20
            and all(view.dtype == self.flat.dtype for view in self.views)
        )

    def read_counters(self) -> None:
        self.step_value = int(ops.convert_to_numpy(self.state.step))
        self.initialized = bool(ops.convert_to_numpy(self.state.initialized))

    def step(self, real: bool = True) -> float:
        from keras_ema.shadow import Kind

        schedule = self.state.schedule
        step = self.step_value
        if not real:
            return schedule.decay(step)
        self.step_value = step + 1
        due = step % schedule.update_every == 0
        if due:
            warm = step <= schedule.update_after_step
            copy_all = warm or not self.initialized
            decay = schedule.decay(step + 1)
            weights = {
                Kind.AVERAGE: 1.0 if copy_all else 1.0 - decay,
                Kind.COPY: 1.0,
                Kind.IGNORE: 1.0 if copy_all else 0.0,
            }
            self._blend(weights)
            if not warm:
                self.initialized = True
        return schedule.decay(self.step_value)

    def _blend(self, weights) -> None:
        if self.in_place:
            self._blend_in_place(weights)
            return
        with self.torch.no_grad():
            online = self.torch.cat(self.views).to(self.flat.dtype)
        self._blend_online(online, weights)

    def _blend_in_place(self, weights) -> None:
        from keras_ema.shadow import _is_finite

        with self.torch.no_grad():
            if not all(bool(_is_finite(weight)) for *_, weight in self.pairs):
                self.state.skipped.value.add_(1)
                return
            for kind, shadow, view, _ in self.pairs:
                if weights[kind]:
                    shadow.lerp_(view, weights[kind])

    def _blend_online(self, online, weights) -> None:
        """Blends `online` (the weights, flat, in buffer order) into `flat`."""
        torch = self.torch
        with torch.no_grad():
            finite = torch.isfinite(online).all()
            moved = torch.empty_like(self.flat)
            for kind, (start, stop) in self.segments.items():
                if start == stop:
                    continue
                torch.lerp(
                    self.flat[start:stop],
                    online[start:stop],
                    weights[kind],
                    out=moved[start:stop],
                )
            torch.where(finite, moved, self.flat, out=self.flat)
            self.state.skipped.value.add_((~finite).to(torch.int32))


def _flat_shadows(state):
    """Re-homes the shadows as views of one flat buffer, ordered by kind."""
    import torch

    order = sorted(range(len(state.shadows)), key=lambda i: int(state.kinds[i]))
    dtypes = {state.shadows[i].value.dtype for i in order}
    devices = {state.shadows[i].value.device for i in order}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(
            "On the torch backend all EMA shadows must share one dtype and "
            f"device. Received dtypes={dtypes}, devices={devices}."
        )
    flat = torch.cat([state.shadows[i].value.detach().reshape(-1) for i in order])
    offset = 0
    state.flat_order = order
    for i in order:
        shadow = state.shadows[i]
        size = shadow.value.numel()
        view = flat[offset : offset + size].view(shadow.value.shape)
        shadow._value = torch.nn.Parameter(view, requires_grad=False)
        offset += size
    return flat


def _segment(flat, state, mask) -> tuple[int, int]:
    sizes = [state.shadows[i].value.numel() for i in state.flat_order]
    chosen = [i for i, j in enumerate(state.flat_order) if mask[j]]
    if not chosen:
        return 0, 0
    start = sum(sizes[: chosen[0]])
    return start, start + sum(sizes[i] for i in chosen)


def start_when_built(model, start):
    """Calls `start()` once `model` is built, before its first train step.

    TensorFlow defers building a model that was never called to the first
    trace of its train function, which comes after `on_train_begin`. The
    train function is wrapped for its first call: the model (and its
    optimizer) is built symbolically from the data's element spec, as Keras
    does under a `tf.distribute` strategy, then `start()` installs the EMA,
    which then runs the step. Returns the function that undoes the wrapping
    if no step ran. Other backends build the model before `on_train_begin`.
    """
    if BACKEND != "tensorflow":
        raise ValueError(
            "The EMA needs a built model with floating-point weights. "
            f"Model {model.name!r} has none; build it (call it on data or "
            "`model.build(input_shape)`) before using the callback."
        )
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


def fused_training(state) -> _FusedTraining:
    if state.offload:
        return host_training(state)
    return {
        "tensorflow": _TensorFlowTraining,
        "jax": _JaxTraining,
        "torch": _TorchTraining,
    }[BACKEND](state)


# --------------------------------------------------------------------------
# One update outside `fit`


class EagerUpdater:
    """`EMA.update()`: one step outside `fit`, compiled once where possible."""

    def __init__(self, state):
        self.state = state
        self._function = None

    def __call__(self) -> None:
        if self._function is None:
            self._function = self._build()
        self._function()

    def _build(self):
        state = self.state
        if state.offload:
            return host_updater(state)
        if BACKEND == "torch":
            return state.live.kernel.step
        if BACKEND == "tensorflow":
            import tensorflow as tf

            update = tf.function(
                lambda: _assign_update(state, None, branch_on_scalars=True)[0],
                autograph=False,
            )

            def run():
                # It updates the shadow variables themselves.
                state.live.release()
                update()

            return run
        if BACKEND == "jax":
            import jax

            from keras_ema.shadow import fused_update

            def pure(arrays, weights):
                counters, shadows, _ = fused_update(
                    state.schedule, state.kinds, arrays[:3], arrays[3:], weights
                )
                return [*counters, *shadows]

            jitted = jax.jit(pure, donate_argnums=0)

            def run():
                state.live.release()
                weights = [w.value for w in state.weights]
                arrays = [
                    fresh_copy(v.value, keras.backend.standardize_dtype(v.dtype))
                    for v in state.state_variables
                ]
                new_arrays = jitted(arrays, weights)
                for variable, array in zip(
                    state.state_variables, new_arrays, strict=True
                ):
                    variable.assign(array)

            return run
        return lambda: _assign_update(state, None)


# --------------------------------------------------------------------------
# Shadows in host memory (`offload_to_host=True`)
#
# The shadows and counters live in host memory and the update runs on the
# CPU. A step that is not due transfers nothing: the schedule is decided on
# the host (JAX, torch) or inside the step's graph before any weight is read
# (TensorFlow). On a due step the device-to-host copy is started without
# waiting for the device where the backend allows it (JAX: asynchronous
# dispatch; torch: `non_blocking` copies into pinned memory, blended later).

HOST_DEVICE = "cpu:0"


def check_offload(model) -> None:
    """Raises where host shadows cannot follow the model's training."""
    if BACKEND != "tensorflow":
        return
    strategy = getattr(model, "distribute_strategy", None)
    replicas = getattr(strategy, "num_replicas_in_sync", 1)
    if replicas > 1:
        raise ValueError(
            "`offload_to_host=True` does not support a `tf.distribute` strategy "
            "with several replicas: every replica would write the same host "
            f"shadows. Received: strategy={type(strategy).__name__} with "
            f"{replicas} replicas."
        )


def host_scope():
    """The scope in which host shadows and counters are created."""
    return keras.device(HOST_DEVICE)


def host_layout():
    """A layout that keeps a variable in host memory through every `assign`.

    On JAX an `assign` stores whatever array it gets (a NumPy array from a
    state file would land on the default device); a variable with a layout
    puts each new value there first. Other backends assign in place.
    """
    if BACKEND == "jax":
        import jax

        return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return None


def host_copy(value, dtype: str):
    """A copy of `value` cast to `dtype` in host memory, sharing no buffer.

    The cast runs on the host, so no full-size copy is made on the device.
    """
    if BACKEND == "jax":
        import jax

        host = jax.device_put(value, jax.devices("cpu")[0], may_alias=False)
        return host.astype(dtype)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.device("/CPU:0"):
            return tf.identity(tf.cast(tf.convert_to_tensor(value), dtype))
    if BACKEND == "torch":
        import torch

        dtype = getattr(torch, dtype)
        return value.detach().to(device="cpu", dtype=dtype, copy=True)
    return fresh_copy(value, dtype)


def copy_for_weight(value, weight):
    """A fresh copy of a shadow value, cast to `weight`'s dtype and placed on
    its device (host shadows go back to the accelerator on a swap)."""
    copy = fresh_copy(value, keras.backend.standardize_dtype(weight.dtype))
    if BACKEND == "jax":
        import jax

        sharding = getattr(weight.value, "sharding", None)
        if sharding is not None and not copy.sharding.is_equivalent_to(
            sharding, copy.ndim
        ):
            copy = jax.device_put(copy, sharding)
    # TF and torch assignments copy across devices themselves.
    return copy


class _HostLiveValues(LiveValues):
    """JAX and torch: the counters are Python ints inside a host kernel."""

    def __init__(self, state):
        super().__init__(state)
        kernel_class = _TorchHostKernel if BACKEND == "torch" else _JaxHostKernel
        self.kernel = kernel_class(state)

    def sync_to_variables(self) -> None:
        self.kernel.finish()
        self._state.step.assign(self.kernel.step_value)
        self._state.initialized.assign(int(self.kernel.initialized))

    def invalidate(self) -> None:
        # The variables were written from outside (a loaded state): an update
        # still waiting for its copy belongs to the state they replaced.
        self.kernel.discard()
        self.kernel.read_counters()


def host_live_values(state) -> LiveValues:
    if BACKEND in ("jax", "torch"):
        return _HostLiveValues(state)
    return LiveValues(state)


def _host_schedule_step(kernel, real: bool, blend) -> float:
    """The article's counter logic on host ints; `blend(step)` on due steps."""
    schedule = kernel.state.schedule
    step = kernel.step_value
    if not real:
        return schedule.decay(step)
    kernel.step_value = step + 1
    if step % schedule.update_every == 0:
        blend(step)
        if step > schedule.update_after_step:
            kernel.initialized = True
    return schedule.decay(kernel.step_value)


class _JaxHostKernel:
    """JAX: on a due step, `device_put` the weights to the CPU and run the
    fused update there, jitted. Both calls are dispatched asynchronously, so
    the train loop goes on while the copy and the update run."""

    def __init__(self, state):
        import jax

        self.state = state
        self._cpu = jax.devices("cpu")[0]
        self._update = jax.jit(
            functools.partial(_host_fused_update, state.schedule, state.kinds)
        )
        self.read_counters()

    def read_counters(self) -> None:
        self.step_value = int(ops.convert_to_numpy(self.state.step))
        self.initialized = bool(ops.convert_to_numpy(self.state.initialized))

    def step(self, real: bool = True, weights=None) -> float:
        def blend(step):
            import jax
            import numpy as np

            online = weights or [w.value for w in self.state.weights]
            # `may_alias=False`: a CPU weight is copied too, since the next
            # train step donates (deletes) the weight's buffer.
            online = jax.device_put(list(online), self._cpu, may_alias=False)
            counters = (
                np.int32(step),
                np.int32(self.initialized),
                self.state.skipped.value,
            )
            shadows = [s.value for s in self.state.shadows]
            new_shadows, skipped = self._update(counters, shadows, online)
            for shadow, value in zip(self.state.shadows, new_shadows, strict=True):
                shadow.assign(value)
            self.state.skipped.assign(skipped)

        return _host_schedule_step(self, real, blend)

    def finish(self) -> None:
        pass  # JAX arrays are futures: readers wait for them.

    def discard(self) -> None:
        pass


def _host_fused_update(schedule, kinds, counters, shadows, weights):
    from keras_ema.shadow import fused_update

    (_, _, skipped), shadows, _ = fused_update(
        schedule, kinds, counters, shadows, weights
    )
    return shadows, skipped


class _TorchHostKernel(TorchKernel):
    """torch: `TorchKernel` over a flat host buffer, blended one due step late.

    A due step only starts copying the online weights into a pinned host
    buffer (`non_blocking`) and returns; the blend runs on the CPU at the
    next due step or when the shadows are read (`finish`), by which time the
    copy has long landed. Only the CUDA event of that copy is waited for.
    """

    def __init__(self, state):
        super().__init__(state)
        torch = self.torch
        self._pinned = torch.cuda.is_available() and any(
            view.is_cuda for view in self.views
        )
        self.staging = torch.empty(
            self.flat.shape, dtype=self.flat.dtype, pin_memory=self._pinned
        )
        offsets = itertools.accumulate((v.numel() for v in self.views), initial=0)
        self.slots = [
            self.staging[start : start + view.numel()]
            for start, view in zip(offsets, self.views, strict=False)
        ]
        self._pending = None
        self._copied = None

    def _blends_in_place(self) -> bool:
        # Always through the staging buffer: the weights may be on a device.
        return False

    def _blend(self, weights) -> None:
        self.finish()
        with self.torch.no_grad():
            for slot, view in zip(self.slots, self.views, strict=True):
                slot.copy_(view, non_blocking=True)
        if self._pinned:
            self._copied = self.torch.cuda.Event()
            self._copied.record()
        self._pending = weights

    def finish(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        self._blend_online(self.staging, pending)

    def discard(self) -> None:
        self._pending = None
        self._copied = None


class _TensorFlowHostTraining(_FusedTraining):
    """TF: the update stays in the step's graph, its ops placed on the CPU.

    XLA compiles a function for one device, so with `jit_compile` only Keras'
    own step is XLA-compiled (a nested `tf.function`), and the host update
    runs in the surrounding graph, which TF schedules across devices.
    """

    def _build(self):
        import tensorflow as tf

        state, model = self.state, self.model
        iterations, accumulation = _optimizer_step_gate(model.optimizer)
        keras_train_step = model.train_step
        jit_compile = model.jit_compile
        if jit_compile and not model.run_eagerly:
            keras_train_step = tf.function(
                keras_train_step, jit_compile=True, reduce_retracing=True
            )

        def train_step(data):
            before = read(iterations)
            logs = keras_train_step(data)
            real = _real_step(before, read(iterations), accumulation)
            counters, decay = _host_assign_update(state, real)
            return _ema_logs(logs, counters, decay)

        return _keras_train_function_around(model, train_step, jit_compile=False)


def _host_assign_update(state, real):
    """`_assign_update` with its ops on the CPU (TF graphs and eager).

    The weights are read inside the due branch, on their own device, so a
    step that is not due copies nothing to the host.
    """
    import tensorflow as tf

    def read_weights():
        with tf.device(None):
            return [read(w) for w in state.weights]

    with tf.device("/CPU:0"):
        return _assign_update(state, real, read_weights, branch_on_scalars=True)


class _JaxHostTraining(_FusedTraining):
    """JAX: Keras' own jitted step, then the host kernel per inner step."""

    _gate = None

    def install(self) -> None:
        super().install()
        self._gate.sync()

    def _build(self):
        import jax

        state, model = self.state, self.model
        kernel = state.live.kernel
        locate = _jax_state_locator(model, state.weights)
        self._gate = gate = _HostStepGate(model.optimizer)
        iterations_index = _index_of(model.optimizer.variables, gate.iterations)
        keras_train_step = model.train_step
        if not model.run_eagerly and model.jit_compile:
            keras_train_step = jax.jit(
                keras_train_step,
                donate_argnums=0,
                out_shardings=_internals.jax_train_out_shardings(model),
            )
        steps_per_execution = model.steps_per_execution

        def train_function(keras_state, iterator):
            logs = decay = None
            for data in _batches(iterator, steps_per_execution):
                logs, keras_state = keras_train_step(keras_state, data)
                real = gate.advance(keras_state[2][iterations_index])
                decay = kernel.step(real, locate(keras_state))
            counters = (None, None, state.skipped.value)
            return _ema_logs(logs, counters, decay), keras_state

        return train_function


def host_training(state) -> _FusedTraining:
    return {
        "tensorflow": _TensorFlowHostTraining,
        "jax": _JaxHostTraining,
        "torch": _TorchTraining,
    }[BACKEND](state)


def host_updater(state):
    """`EMA.update()` with host shadows."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda: _host_assign_update(state, None)[0], autograph=False)
    return state.live.kernel.step
