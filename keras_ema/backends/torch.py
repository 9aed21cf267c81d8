"""The EMA on torch.

Keras' torch train step is eager, so the update runs right after it. The
shadows of each dtype are views into one flat buffer per profile, ordered by
kind (averaged, copied, ignored), so an update is a handful of whole-buffer
ops whatever the number of weights. The schedule is decided on the host from
Python counters (`HostCounters`), so no step waits for the device. On a GPU
the NaN/Inf guard is decided on the device (`torch.where`); on the CPU its
flag costs no sync to read, so the skip is decided on the host and the
shadows are blended in place (for large models, each from its own weight,
without the flat copy of the weights). `HostEngine`
keeps the flat buffers in host memory and blends one due step late, after a
`non_blocking` copy of the weights into a pinned buffer.
"""

from __future__ import annotations

import itertools
import math

import keras
import torch

from keras_ema import _internals
from keras_ema import guard
from keras_ema.backends import base
from keras_ema.guard import Guard
from keras_ema.sizes import IN_PLACE_ELEMENTS
from keras_ema.state import Kind
from keras_ema.steps import HostCounters
from keras_ema.steps import OptimizerSteps
from keras_ema.steps import step_rule

# --------------------------------------------------------------------------
# Buffers and layouts


def fresh_copy(value, dtype):
    """A copy of `value` cast to `dtype` that shares no buffer with it."""
    return value.detach().to(dtype=getattr(torch, dtype), copy=True)


class Placement(base.Placement):
    def check(self, model, weights) -> None:
        """Keras' torch trainer runs on one device and ignores
        `keras.distribution` (the weights stay unsharded, every process
        trains alone); the update also keeps each dtype's shadows in one flat
        buffer, on one device."""
        distribution = keras.distribution.distribution()
        if distribution is not None:
            raise ValueError(
                "`keras_ema.EMA` does not support `keras.distribution` on the "
                "torch backend: Keras' torch trainer ignores it and trains on "
                "one device. Use the JAX backend for `keras.distribution`, or "
                "unset the distribution "
                "(`keras.distribution.set_distribution(None)`). "
                f"Received: distribution={distribution}"
            )
        devices = {str(w.value.device) for w in weights}
        if len(devices) > 1:
            raise ValueError(
                "On the torch backend `keras_ema.EMA` needs all floating-point "
                "weights of the model on one device. Received weights on "
                f"devices={sorted(devices)}"
            )

    def initial_value(self, weight, dtype):
        return fresh_copy(weight.value, dtype)


def finite_on_host(values) -> bool:
    """`Guard.HOST`: whether every element of every value is finite, read on
    the host (for a CPU's tensors, where reading costs no device sync).

    An Inf or NaN anywhere makes a sum Inf or NaN, so a finite sum decides;
    a sum is the fastest reduction here, faster than `aminmax` or a
    matrix-vector product with zeros, and `isfinite(x).all()` first writes a
    boolean array. A sum that is not finite may also be an overflow of huge
    finite values: only then are the elements checked one by one.
    """
    for value in values:
        # `item()` and `math.isfinite` cost a microsecond; `torch.isfinite`
        # on the 0-d sum, an op dispatch of about twenty.
        if math.isfinite(value.sum().item()):
            continue
        if not bool(torch.isfinite(value).all()):
            return False
    return True


def finite_flat(onlines):
    """`Guard.FLAT`: whether every element of every flat buffer is finite, as
    one device flag (`isfinite(x).all()`: one op per buffer, no sync)."""
    finite = None
    for online in onlines:
        check = torch.isfinite(online).all()
        finite = check if finite is None else finite & check
    return finite


guard.register_form(Guard.HOST, finite_on_host)
guard.register_form(Guard.FLAT, finite_flat)


# --------------------------------------------------------------------------
# Flat buffers


class _Group:
    """The tracked weights whose shadows share one dtype: one flat buffer of
    them per profile, ordered by kind, each shadow a view into it.

    Args:
        state: The `ShadowState`.
        indices: The positions (in `state.weights`) of this group's weights.
    """

    def __init__(self, state, indices):
        self.order = sorted(indices, key=lambda i: int(state.kinds[i]))
        self.kinds = [state.kinds[i] for i in self.order]
        self.dtype = state.shadows[self.order[0]].value.dtype
        self.sizes = [state.shadows[i].value.numel() for i in self.order]
        self.offsets = list(itertools.accumulate(self.sizes, initial=0))
        self.views = [state.weights[i].value.reshape(-1) for i in self.order]
        self.flats = [self._rehome(p.shadows) for p in state.profiles]
        # Each profile's shadows as flat views, made once: a step that
        # blends in place reuses them.
        self.shadow_views = [self._shadow_views(flat) for flat in self.flats]
        self.segments = {}
        for kind in Kind:
            chosen = [j for j, k in enumerate(self.kinds) if k == kind]
            if chosen:
                self.segments[kind] = (
                    self.offsets[chosen[0]],
                    self.offsets[chosen[-1] + 1],
                )

    def _rehome(self, shadows):
        """One flat buffer with the shadows' values; each shadow becomes a
        view into it."""
        flat = torch.cat([shadows[i].value.detach().reshape(-1) for i in self.order])
        for i, start, size in zip(self.order, self.offsets, self.sizes, strict=False):
            view = flat[start : start + size].view(shadows[i].value.shape)
            _internals.torch_variable_storage(shadows[i], view)
        return flat

    def _shadow_views(self, flat) -> list:
        return [
            flat[start : start + size]
            for start, size in zip(self.offsets, self.sizes, strict=False)
        ]

    def online(self):
        """The group's weights, flat, in buffer order (a copy)."""
        return torch.cat(self.views).to(self.dtype)

    def blend(self, profile: int, online, weights, finite) -> None:
        """`flat = lerp(flat, online, weight of each kind)` where `finite`
        (a device flag)."""
        flat = self.flats[profile]
        moved = torch.empty_like(flat)
        for kind, (start, stop) in self.segments.items():
            torch.lerp(
                flat[start:stop],
                online[start:stop],
                weights[kind],
                out=moved[start:stop],
            )
        torch.where(finite, moved, flat, out=flat)

    def blend_in_place(self, profile: int, online, weights) -> None:
        """`flat = lerp(flat, online, weight of each kind)`, for weights known
        to be finite; a kind of weight 0 is left as it is."""
        flat = self.flats[profile]
        for kind, (start, stop) in self.segments.items():
            if weights[kind]:
                flat[start:stop].lerp_(online[start:stop], weights[kind])

    def blend_each_in_place(self, profile: int, weights) -> None:
        """Each shadow `lerp`ed in place from its own weight, for weights
        known to be finite; a kind of weight 0 is left as it is."""
        shadows = self.shadow_views[profile]
        for kind, shadow, view in zip(self.kinds, shadows, self.views, strict=True):
            if weights[kind]:
                shadow.lerp_(view, weights[kind])


def _groups(state) -> list[_Group]:
    by_dtype: dict = {}
    for index, shadow in enumerate(state.shadows):
        by_dtype.setdefault(shadow.value.dtype, []).append(index)
    return [_Group(state, indices) for indices in by_dtype.values()]


def reads_flags_on_host(groups) -> bool:
    """Whether the guard's flag is read on the host: where every flat buffer
    lives in host memory, reading it costs no device sync."""
    return all(g.flats[0].device.type == "cpu" for g in groups)


class _Blender:
    """Blends every profile's flat buffers from the weights."""

    def __init__(self, state):
        self.state = state
        self.groups = _groups(state)
        self.on_host = reads_flags_on_host(self.groups)

    def blend_online(self, onlines, weights_per_profile) -> None:
        """Blends from `onlines` (each group's weights, flat)."""
        with torch.no_grad():
            if self.on_host:
                for profile, weights in self.due_or_count_skipped(
                    onlines, weights_per_profile
                ):
                    for group, online in zip(self.groups, onlines, strict=True):
                        group.blend_in_place(profile, online, weights)
                return
            finite = guard.all_finite(onlines, Guard.FLAT)
            for profile, weights in enumerate(weights_per_profile):
                if weights is None:
                    continue
                for group, online in zip(self.groups, onlines, strict=True):
                    group.blend(profile, online, weights, finite)
            self.state.skipped.value.add_((~finite).to(torch.int32))

    def due_or_count_skipped(self, checked, weights_per_profile) -> list:
        """Each due profile's `(index, weights)` where every value of
        `checked` is finite (read on the host); otherwise none, and the step
        is counted in `skipped` here."""
        if not guard.all_finite(checked, Guard.HOST):
            self.state.skipped.value.add_(1)
            return []
        return [
            (profile, weights)
            for profile, weights in enumerate(weights_per_profile)
            if weights is not None
        ]


# --------------------------------------------------------------------------
# Engines


class Engine(base.Engine):
    """The update after Keras' eager train step, decided on the host."""

    # Building is cheap here (no tracing), and it re-reads the optimizer's
    # counter, which `train_on_batch` may have advanced between fits.
    reusable = False

    def __init__(self, state):
        super().__init__(state)
        self.counters = HostCounters(state.schedules)
        self.counters.read(state.step)
        self.blender = _Blender(state)
        self.in_place = self._blends_in_place()

    def _blends_in_place(self) -> bool:
        """Whether to blend each shadow in place from its own weight: on the
        CPU, for models of `IN_PLACE_ELEMENTS` or more, with every weight of
        its shadow's dtype.

        Each shadow then blends from its weight directly: no flat copy of
        the weights. Small models keep the flat copy: one op for all weights
        costs less than one per weight.
        """
        groups = self.blender.groups
        return (
            self.blender.on_host
            and sum(g.flats[0].numel() for g in groups) >= IN_PLACE_ELEMENTS
            and all(view.dtype == g.dtype for g in groups for view in g.views)
        )

    def flush(self) -> None:
        self.state.step.assign(self.counters.step)

    def reload(self) -> None:
        self.counters.read(self.state.step)

    def step(self, moved: bool = True) -> list:
        """Counts one optimizer step, updates the shadows if it is due, and
        returns each profile's decay."""
        flags = self.counters.count_step(moved)
        if flags is not None:
            self._blend([f.kind_weights() if f.due else None for f in flags])
        return self.counters.decays()

    def update(self) -> None:
        self.step()

    def _blend(self, weights_per_profile) -> None:
        if self.in_place:
            self._blend_in_place(weights_per_profile)
            return
        with torch.no_grad():
            onlines = [group.online() for group in self.blender.groups]
        self.blender.blend_online(onlines, weights_per_profile)

    def _blend_in_place(self, weights_per_profile) -> None:
        groups = self.blender.groups
        # The groups' views of the weights: the same tensors as
        # `weight.value`, without a property lookup per weight.
        views = (view for group in groups for view in group.views)
        with torch.no_grad():
            for profile, weights in self.blender.due_or_count_skipped(
                views, weights_per_profile
            ):
                for group in groups:
                    group.blend_each_in_place(profile, weights)

    def build_train_function(self):
        keras_train_function = self._keras_train_function
        state = self.state
        # With a LossScaleOptimizer the optimizer's counter is read every
        # step, but Keras' torch `cond` has already read the overflow flag on
        # the host to skip or apply the step: no new device sync. A model's
        # own `train_step` costs one sync per step where its optimizers
        # live on a GPU.
        steps = OptimizerSteps(step_rule(self.model))

        def train_function(data):
            logs = keras_train_function(data)
            decays = self.step(steps.follow([i.value for i in steps.iterations]))
            return base.ema_logs(logs, state, decays, state.skipped.value)

        return train_function

    # -- for measurement -----------------------------------------------------

    def update_timer(self):
        """The engine's step, which the train function runs after Keras'
        train step (`EMA.update()` also checks the model)."""

        def run() -> None:
            self.step()

        return run


class Backend(base.Backend):
    """The torch backend's buffer operations (see `base.Backend`)."""

    def fresh_copy(self, value, dtype):
        return fresh_copy(value, dtype)
