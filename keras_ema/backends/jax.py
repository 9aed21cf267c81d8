"""The EMA on JAX.

Keras' JAX train step is a pure function of an explicit state that its loop
donates. `Engine` installs a train function that runs one `jax.jit` of
(Keras' `train_step`, then the update of every profile) on Keras' state and
the EMA's own arrays, both donated, so that no shadow ever aliases a model
buffer and nothing is synced per step; where the update is due only every
few steps, Keras' own jitted step runs at every step, and a jitted update
after it on due steps. `HostEngine` keeps the shadows in host memory: Keras'
own jitted step runs, and on due steps the weights are copied to the CPU,
where a jitted update runs; both are dispatched asynchronously.
"""

from __future__ import annotations

import jax
import numpy as np

from keras_ema import _internals
from keras_ema import update
from keras_ema.backends import base
from keras_ema.backends.jax_arrays import Backend  # noqa: F401 (this backend's)
from keras_ema.backends.jax_arrays import Placement  # noqa: F401 (this backend's)
from keras_ema.backends.jax_arrays import as_stored
from keras_ema.backends.jax_arrays import as_vector
from keras_ema.backends.jax_arrays import committed
from keras_ema.backends.jax_arrays import committed_copy
from keras_ema.backends.jax_arrays import fresh_copy
from keras_ema.backends.jax_arrays import on_host
from keras_ema.backends.jax_arrays import replicated
from keras_ema.backends.jax_arrays import xla_guard
from keras_ema.guard import Guard
from keras_ema.packing import Packing
from keras_ema.steps import HostCounters
from keras_ema.steps import any_optimizer_moved
from keras_ema.steps import counters_before
from keras_ema.steps import every_step_due
from keras_ema.steps import step_rule


class Engine(base.Engine):
    """During `fit` the EMA lives in arrays the loop donates: `(step,
    skipped)` and, per profile, the shadows packed by a `Packing`.

    With every profile updating only every few steps (and an optimizer that
    moves the weights at every step), whether a step is due is known on the
    host: every step runs Keras' own train step, and a due one then runs the
    update alone, in a jitted function of its own. The steps in between are
    counted in `pending` and added to the step counter by the next due step
    (or a flush).
    """

    def __init__(self, state):
        super().__init__(state)
        # An averaged model computes with the shadow variables themselves:
        # one array each, which the variables hold between steps.
        self.averaged = bool(state.averaged_models)
        placement = (lambda shadow: None) if self.averaged else replicated
        self.packing = Packing(state.shadows, state.kinds, placement)
        # Whether the model `fit` trains holds every averaged model: then
        # the shadows are in Keras' state, which keeps them between steps
        # (the EMA's arrays hold the counters only).
        self._held = False
        self._arrays = None
        self._pending = 0
        self._host = None
        self._first_step = True
        self._eager_update = None

    # -- the EMA outside its variables ---------------------------------------

    def arrays(self):
        """`(counters, shadows per profile)`, made from the variables when
        they are not live."""
        if self._arrays is None:
            state = self.state
            counters = [committed_copy(v.value) for v in state.counters]
            shadows = None
            if not self._held:
                shadows = [self._packed(p.shadows) for p in state.profiles]
            self._arrays = (counters, shadows)
        return self._arrays

    def _packed(self, shadows) -> list:
        """One profile's shadows packed, compiling nothing: packed groups
        (small by construction) are concatenated on the host and placed like
        their shadows, the others copied on their own devices. Eager packing
        would compile a reshape per shape and a concatenate per group."""
        packed = []
        for group, flat in zip(self.packing.groups, self.packing.flat, strict=True):
            first = shadows[group[0]].value
            if not flat:
                packed.append(committed_copy(first))
                continue
            parts = [np.asarray(jax.device_get(shadows[i].value)) for i in group]
            flat_value = np.concatenate([part.reshape(-1) for part in parts])
            packed.append(jax.device_put(flat_value, as_vector(first.sharding)))
        return packed

    def flush(self) -> None:
        if self._arrays is None:
            return
        state = self.state
        (step, skipped), shadows = self._arrays
        # Copies: the arrays stay the loop's to donate.
        state.step.assign(int(jax.device_get(step)) + self._pending)
        state.skipped.assign(committed_copy(skipped))
        if shadows is None:
            return  # Held in Keras' state, which the variables follow.
        for profile, packed in zip(state.profiles, shadows, strict=True):
            values = self._unpacked(packed, committed_copy, on_host)
            for shadow, value in zip(profile.shadows, values, strict=True):
                shadow.assign(value)

    def host_shadows(self) -> list[list]:
        # Straight from the live arrays: writing them into the variables
        # first (`flush`) costs a transfer back to the device per variable.
        if self._arrays is None or self._arrays[1] is None:
            return super().host_shadows()
        _, shadows = self._arrays
        copy = base.host_copy
        return [self._unpacked(packed, copy, copy) for packed in shadows]

    def _unpacked(self, packed, whole, flat_on_host) -> list:
        """Each shadow's value from one profile's packed arrays, compiling
        nothing: packed groups (small by construction) are brought to the
        host by `flat_on_host` and sliced there, the others copied by
        `whole`. A jitted unpack would be compiled at the end of every
        model's first `fit`."""
        arrays = [
            flat_on_host(array) if flat else whole(array)
            for flat, array in zip(self.packing.flat, packed, strict=True)
        ]
        return self.packing.unpack(arrays, reshape=np.reshape)

    def reload(self) -> None:
        self._arrays = None
        self._pending = 0
        self._host = None

    def _host_step(self) -> HostCounters:
        """The step counter mirrored on the host, read once after the arrays
        are (re)made."""
        if self._host is None:
            self._host = HostCounters(self.state.schedules)
            self._host.step = int(jax.device_get(self.arrays()[0][0])) + self._pending
        return self._host

    # -- around `fit` -------------------------------------------------------

    def start_epoch(self) -> None:
        self._first_step = True
        if self.averaged:
            # Made now, from the variables: an averaged model held by the
            # model is among its variables, which Keras' first step of an
            # epoch empties until the epoch's end.
            self.arrays()

    def build_train_function(self):
        model = self.model
        jitted = not model.run_eagerly and model.jit_compile
        guard = xla_guard(self.state.weights) if jitted else Guard.EAGER
        keras_shardings = None
        if jitted:
            keras_shardings = _internals.jax_train_out_shardings(model)
        ema_shardings = None
        if keras_shardings is not None:
            ema_shardings = jax.tree.map(lambda a: a.sharding, self.arrays())
        self._hold_in_keras_state(self.averaged and self._all_held(model))
        # Keras' train state holds the model's optimizer only.
        rule = step_rule(model, in_train_state_only=True)
        if rule.per_step or every_step_due(self.state.schedules) or self.averaged:
            fused_step = self._fused_step(guard, rule)
            if jitted:
                out_shardings = keras_shardings
                if out_shardings is not None:
                    out_shardings = (*out_shardings, ema_shardings)
                fused_step = jax.jit(
                    fused_step, donate_argnums=(0, 1), out_shardings=out_shardings
                )
            return self._every_step_train_function(fused_step)
        due_update = self._due_update(guard)
        if jitted:
            due_update = jax.jit(
                due_update, donate_argnums=0, out_shardings=ema_shardings
            )
        return self._due_steps_train_function(due_update)

    def _fused_step(self, guard, rule):
        """Keras' train step and the update of every profile, as one pure
        function of Keras' state, the EMA's arrays, a batch, and the steps
        still to add to the EMA's counter. `rule`: the `steps.StepRule` that
        tells whether a step moved the weights."""
        state, model = self.state, self.model
        locate = _internals.jax_state_weights(model, state.weights)
        keras_train_step = self._with_shadows_read(model.train_step)
        run = update.update_when_due if base.gated(state, rule) else update.update_all
        updated = self._profiles_updated(run, guard)
        dtypes = self.packing.shadow_dtypes

        def counter_in(keras_state):
            """Reads an optimizer variable from Keras' state."""
            return lambda variable: _internals.jax_state_optimizer_variable(
                model, variable
            )(keras_state)

        def fused_step(keras_state, ema, data, pending):
            if self._held:
                ema = (ema[0], self._per_profile(read_shadows(keras_state)))
            before = counters_before(rule, counter_in(keras_state))
            if self.averaged:
                logs, keras_state = keras_train_step(keras_state, data, ema)
            else:
                logs, keras_state = keras_train_step(keras_state, data)
            stepped = any_optimizer_moved(rule, counter_in(keras_state), before)
            counters, shadows, decays = updated(
                ema, pending, lambda: as_stored(locate(keras_state), dtypes), stepped
            )
            logs = base.ema_logs(logs, state, decays, counters[1])
            if self.averaged:
                keras_state = write_shadows(keras_state, self._each_shadow(shadows))
            return logs, keras_state, (counters, None if self._held else shadows)

        write_shadows = _internals.jax_state_writer(model, self._shadow_variables())
        if self._held:
            read_shadows = _internals.jax_state_weights(model, self._shadow_variables())
        return fused_step

    def _all_held(self, model) -> bool:
        held = {id(v) for v in model.non_trainable_variables}
        return all(id(shadow) in held for shadow in self._shadow_variables())

    def _hold_in_keras_state(self, held: bool) -> None:
        if held != self._held:
            self.flush()
            self.reload()
            self._held = held

    def _per_profile(self, values) -> list:
        """`values` (one per shadow variable, profile after profile) as each
        profile's arrays (one per shadow: an averaged model's shadows are
        not packed)."""
        count = len(self.state.weights)
        return [values[i : i + count] for i in range(0, len(values), count)]

    def _shadow_variables(self) -> list:
        return [shadow for profile in self.state.profiles for shadow in profile.shadows]

    def _each_shadow(self, shadows) -> list:
        """Every profile's shadow values, one per shadow variable, from the
        EMA's packed arrays."""
        return [value for packed in shadows for value in self.packing.unpack(packed)]

    def _with_shadows_read(self, keras_train_step):
        """Keras' train step, reading the shadows from the EMA's arrays where
        an averaged model calls them: from Keras' state where the averaged
        model is a sublayer of the model (Keras maps it there), from the
        variables themselves otherwise."""
        if not self.averaged:
            return keras_train_step
        variables = self._shadow_variables()
        write_shadows = _internals.jax_state_writer(self.model, variables)

        def train_step(keras_state, data, ema):
            current = self._each_shadow(ema[1])
            keras_state = write_shadows(keras_state, current)
            with _internals.jax_values_while_tracing(variables, current):
                return keras_train_step(keras_state, data)

        return train_step

    def _profiles_updated(self, run_update, guard):
        """`run_update` (`update.update_all` or `update.update_when_due`) on
        the EMA's packed arrays, as a pure function of those arrays, the steps
        still to add to the EMA's counter, a function that reads the weights
        (called only where a profile is due), and whether the optimizer
        moved them. Returns the new counters, shadows and decays."""
        schedules, packing = self.state.schedules, self.packing

        def updated(ema, pending, read_weights, stepped=None):
            (step, skipped), shadows = ema
            counters, shadows, decays = run_update(
                schedules,
                packing.kinds,
                (step + pending, skipped),
                shadows,
                lambda: packing.pack(read_weights()),
                stepped,
                guard=guard,
            )
            return list(counters), shadows, decays

        return updated

    def _every_step_train_function(self, fused_step):
        """Runs the fused step at every step."""
        steps_per_execution = self.model.steps_per_execution

        def train_function(keras_state, iterator):
            keras_state = self._committed_at_first_step(keras_state)
            logs = None
            for data in _internals.batches(iterator, steps_per_execution):
                logs, keras_state, self._arrays = fused_step(
                    keras_state, self.arrays(), data, self._pending
                )
                self._pending = 0
            if self.averaged:
                self._shadows_hold_arrays(keras_state)
            return logs, keras_state

        return train_function

    def _shadows_hold_arrays(self, keras_state) -> None:
        """Points the shadow variables at the arrays of the latest average
        (the EMA's, or Keras' state where it holds them; no copy), so that
        an averaged model called between steps (in a callback) computes with
        it. Like Keras' own synced variables, they hold arrays the next step
        donates, and get the new ones after it."""
        variables = self._shadow_variables()
        if self._held:
            values = _internals.jax_state_weights(self.model, variables)(keras_state)
        else:
            values = self._each_shadow(self._arrays[1])
        _internals.jax_hold_arrays(variables, values)

    def uninstall(self) -> None:
        super().uninstall()
        self.refresh_readers()

    def refresh_readers(self) -> None:
        """Keras' jitted test and predict steps read a variable that is not
        the model's as a constant captured when they were traced: an
        averaged model that a model does not hold (called through a
        closure) would stay as it was then. Those steps are made again for
        the next `evaluate` or `predict`."""
        if not self.averaged:
            return
        shadows = self._shadow_variables()
        for model in {id(m): m for m in (self.model, self.state.model)}.values():
            held = {id(v) for v in model.variables}
            if all(id(shadow) in held for shadow in shadows):
                continue
            if getattr(model, "compiled", False):
                model.make_test_function(force=True)
            model.make_predict_function(force=True)

    def _due_update(self, guard):
        """The update alone, as a pure function of the EMA's arrays, the
        weights Keras' step has just computed, and the steps still to add to
        the EMA's counter."""
        updated = self._profiles_updated(update.update_all, guard)

        def due_update(ema, weights, pending):
            counters, shadows, _ = updated(ema, pending, lambda: weights)
            return counters, shadows

        return due_update

    def _due_steps_train_function(self, due_update):
        """Where every profile updates only every few steps, and every step
        moves the weights: whether a step is due is known on the host. Every
        step runs Keras' own train step, and a due one then runs the update
        alone. A `fit` compiles Keras' step and a small update, not Keras'
        step twice (alone, and fused with the update), which would double
        the first `fit`'s compile time."""
        state, model = self.state, self.model
        locate = _internals.jax_state_weights(model, state.weights)
        keras_step = _internals.jit_keras_train_step(model)
        steps_per_execution = model.steps_per_execution

        def train_function(keras_state, iterator):
            keras_state = self._committed_at_first_step(keras_state)
            logs = None
            for data in _internals.batches(iterator, steps_per_execution):
                host = self._host_step()
                logs, keras_state = keras_step(keras_state, data)
                if host.count_step() is None:
                    self._pending += 1
                else:
                    self._arrays = due_update(
                        self.arrays(), locate(keras_state), self._pending
                    )
                    self._pending = 0
                skipped = self.arrays()[0][1]
                logs = base.ema_logs(logs, state, host.decays(), skipped)
            return logs, keras_state

        return train_function

    def _committed_at_first_step(self, keras_state):
        if self._first_step:
            self._first_step = False
            return committed(keras_state)
        return keras_state

    # -- outside `fit` -------------------------------------------------------

    def update(self) -> None:
        state = self.state
        self.flush()
        self.reload()
        if self._eager_update is None:
            guard = xla_guard(state.weights)

            def pure(counters, shadows, weights):
                counters, shadows, _ = update.update_when_due(
                    state.schedules,
                    state.kinds,
                    counters,
                    shadows,
                    lambda: weights,
                    guard=guard,
                )
                return list(counters), shadows

            self._eager_update = jax.jit(pure, donate_argnums=(0, 1))
        counters = [fresh_copy(v.value, v.value.dtype) for v in state.counters]
        shadows = [
            [fresh_copy(s.value, s.value.dtype) for s in profile.shadows]
            for profile in state.profiles
        ]
        counters, shadows = self._eager_update(
            counters, shadows, [w.value for w in state.weights]
        )
        for variable, value in zip(state.counters, counters, strict=True):
            variable.assign(value)
        for profile, values in zip(state.profiles, shadows, strict=True):
            for shadow, value in zip(profile.shadows, values, strict=True):
                shadow.assign(value)
        self.refresh_readers()

    # -- for measurement -----------------------------------------------------

    def update_timer(self):
        """The update alone of a due step (`_due_update`), jitted and donated
        as `build_train_function` jits it (the shadows' shardings as its
        output's under a distribution), on the live packed arrays and the
        model's current weights; the function waits for it to finish. The
        variables are current again after a `flush()`."""
        guard = xla_guard(self.state.weights)
        shardings = None
        if _internals.jax_train_out_shardings(self.model) is not None:
            shardings = jax.tree.map(lambda a: a.sharding, self.arrays())
        due_update = jax.jit(
            self._due_update(guard), donate_argnums=0, out_shardings=shardings
        )
        weights = self.state.weights

        def run() -> None:
            values = [w.value for w in weights]
            self._arrays = due_update(self.arrays(), values, 0)
            jax.block_until_ready(self._arrays)

        return run
