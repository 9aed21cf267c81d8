"""The NaN/Inf guard: one device flag over all the values of an update, and
no update with a NaN or infinite weight reaches the shadows."""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import keras
import numpy as np
import pytest
from conftest import assert_bit_equal
from conftest import ema_values
from conftest import make_data
from conftest import make_model
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_ema
from keras_ema import backends  # noqa: F401 (registers the backend's own forms)
from keras_ema import guard as guard_
from keras_ema.guard import Guard
from keras_ema.sizes import GROUP_ELEMENTS as CHUNK

# Shapes that reach every path of the guard: 1-D and narrow values, grouped
# small ones, and values over `CHUNK` elements checked alone.
SHAPES = [(10,), (200, 4), (64, 64), (3, 5, 64), (CHUNK + 8,), (300, 128)]


# How the guard runs: each `Guard` form this backend runs, the XLA ones in
# the XLA computation they are written for (eagerly on torch, which has
# none); on torch also its own forms: the host-side check of the in-place
# path (CPU, large models) and the flat buffers' device flag.
FORMS = [form.value for form in guard_.forms()]


@functools.cache
def check_in_its_computation(kind: Guard):
    """`all_finite` in the form `kind`, compiled where `kind` is written for
    XLA: one function per form, which the backend compiles once for each
    dtype and shapes that it sees, not once per call."""
    check = lambda tensors: guard_.all_finite(tensors, kind)  # noqa: E731
    if kind != Guard.EAGER and keras.backend.backend() == "jax":
        import jax

        return jax.jit(check)
    if kind != Guard.EAGER and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(check, jit_compile=True)
    return check


def guard(values, dtype, form="eager") -> bool:
    tensors = [ops.cast(ops.convert_to_tensor(v), dtype) for v in values]
    check = check_in_its_computation(Guard(form))
    return bool(ops.convert_to_numpy(check(tensors)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    target=st.integers(0, len(SHAPES) - 1),
    position=st.floats(0.0, 1.0),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    seed=st.integers(0, 2**16),
    form=st.sampled_from(FORMS),
)
def test_one_non_finite_element_anywhere_is_found(
    dtype, target, position, bad, seed, form
):
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(shape).astype("float32") for shape in SHAPES]
    assert guard(values, dtype, form)
    flat = values[target].reshape(-1)
    flat[min(int(position * flat.size), flat.size - 1)] = bad
    assert not guard(values, dtype, form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype, scale", [("float32", 1e37), ("float16", 1e4)])
def test_huge_finite_values_are_finite(dtype, scale, form):
    # Summing them overflows to Inf; the guard must not take that for one.
    values = [np.full(shape, scale, dtype="float32") for shape in SHAPES]
    assert guard(values, dtype, form)
    values[-1][-1, -1] = np.nan
    assert not guard(values, dtype, form)


@pytest.mark.parametrize("form", FORMS)
def test_empty_values_are_finite(form):
    values = [np.zeros((0, 16), "float32"), np.zeros((4, 0), "float32")]
    assert guard(values, "float32", form)
    assert not guard([*values, np.array([[1.0, np.nan]], "float32")], "float32", form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float64_non_finite_is_found(form, bad):
    values = [np.ones((300, 128)), np.ones((64,))]
    assert guard(values, "float64", form)
    values[0][-1, -1] = bad
    assert not guard(values, "float64", form)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the JAX engine's choice")
def test_jax_engine_sums_first_on_a_cpu():
    from keras_ema.backends.jax import xla_guard

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert xla_guard(model.weights) == Guard.XLA_CPU


def test_the_torch_backend_registers_its_own_forms():
    torch_forms = {Guard.HOST, Guard.FLAT}
    on_torch = keras.backend.backend() == "torch"
    assert (torch_forms <= set(guard_.forms())) == on_torch
    assert {Guard.EAGER, Guard.XLA, Guard.XLA_CPU} <= set(guard_.forms())


def _skipped_after_a_nan_update(check_guard: bool) -> int:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    ema = keras_ema.EMA(update_after_step=0, update_every=1)
    ema.set_model(model)
    kernel = model.layers[0].kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))

    def assumed_finite(values, form=Guard.EAGER):
        return guard_.assumed_finite(form)

    with contextlib.ExitStack() as stack:
        if not check_guard:
            stack.enter_context(mock.patch.object(guard_, "all_finite", assumed_finite))
        ema.update()
    return ema.skipped_updates


def test_replacing_all_finite_removes_the_guard_from_the_update():
    # The one seam the benchmark's guard-less mode patches: every form of
    # every engine goes through `guard.all_finite`.
    assert _skipped_after_a_nan_update(check_guard=True) == 1
    assert _skipped_after_a_nan_update(check_guard=False) == 0


def test_nan_weights_never_enter_the_shadows():
    model = make_model()
    ema = keras_ema.EMA(beta=0.9, update_after_step=0, update_every=1)
    x, y = make_data(48)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    before = ema_values(ema)
    kernel = model.weights[0]
    poisoned = np.array(kernel.numpy())
    poisoned[0, 0] = np.nan
    kernel.assign(poisoned)
    ema.update()
    assert_bit_equal(before, ema_values(ema))
    assert ema.skipped_updates == 1
    poisoned[0, 0] = np.inf
    kernel.assign(poisoned)
    with pytest.warns(UserWarning, match="NaN or infinite"):
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    for value in ema_values(ema).values():
        assert np.isfinite(value).all()
    assert history.history["ema_skipped"][-1] >= 2
