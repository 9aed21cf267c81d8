"""The NaN/Inf guard: one device flag over all the values of an update."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_ema.sizes import GROUP_ELEMENTS as CHUNK
from keras_ema.update import all_finite as _all_finite

# Shapes that reach every path of the guard: 1-D and narrow values, grouped
# small ones, and values over `CHUNK` elements checked alone (matrix-vector).
SHAPES = [(10,), (200, 4), (64, 64), (3, 5, 64), (CHUNK + 8,), (300, 128)]


def guard(values, dtype, xla=False) -> bool:
    """The guard eagerly, or with `xla` in the XLA computation it is written
    for (eagerly on torch, which has none)."""
    tensors = [ops.cast(ops.convert_to_tensor(v), dtype) for v in values]
    check = lambda tensors: _all_finite(tensors, xla)  # noqa: E731
    if xla and keras.backend.backend() == "jax":
        import jax

        check = jax.jit(check)
    elif xla and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        check = tf.function(check, jit_compile=True)
    return bool(ops.convert_to_numpy(check(tensors)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    target=st.integers(0, len(SHAPES) - 1),
    position=st.floats(0.0, 1.0),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    seed=st.integers(0, 2**16),
    xla=st.booleans(),
)
def test_one_non_finite_element_anywhere_is_found(
    dtype, target, position, bad, seed, xla
):
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(shape).astype("float32") for shape in SHAPES]
    assert guard(values, dtype, xla)
    flat = values[target].reshape(-1)
    flat[min(int(position * flat.size), flat.size - 1)] = bad
    assert not guard(values, dtype, xla)


@pytest.mark.parametrize("xla", [False, True])
@pytest.mark.parametrize("dtype, scale", [("float32", 1e37), ("float16", 1e4)])
def test_huge_finite_values_are_finite(dtype, scale, xla):
    # Summing them would overflow to Inf; the guard must not.
    values = [np.full(shape, scale, dtype="float32") for shape in SHAPES]
    assert guard(values, dtype, xla)


@pytest.mark.parametrize("xla", [False, True])
def test_empty_values_are_finite(xla):
    values = [np.zeros((0, 16), "float32"), np.zeros((4, 0), "float32")]
    assert guard(values, "float32", xla)
    assert not guard([*values, np.array([[1.0, np.nan]], "float32")], "float32", xla)


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="the torch engine's host-side guard"
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(["float32", "bfloat16", "float16", "float64"]),
    target=st.integers(0, len(SHAPES) - 1),
    position=st.floats(0.0, 1.0),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    seed=st.integers(0, 2**16),
)
def test_torch_in_place_guard_finds_one_non_finite_element(
    dtype, target, position, bad, seed
):
    # On the CPU, for large models, torch blends each shadow in place after
    # checking every weight with `aminmax`, on the host.
    from keras_ema.backends.torch import all_finite

    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(shape).astype("float32") for shape in SHAPES]

    def check(values) -> bool:
        return all_finite([ops.cast(ops.convert_to_tensor(v), dtype) for v in values])

    assert check(values)
    flat = values[target].reshape(-1)
    flat[min(int(position * flat.size), flat.size - 1)] = bad
    assert not check(values)


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="the torch engine's host-side guard"
)
def test_torch_in_place_guard_takes_huge_and_empty_values():
    from keras_ema.backends.torch import all_finite

    huge = [np.full(shape, 1e37, dtype="float32") for shape in SHAPES]
    empty = [np.zeros((0, 4), dtype="float32")]
    assert all_finite([ops.convert_to_tensor(v) for v in huge + empty])
    near_max = ops.cast(np.full((8, 8), 6e4, "float32"), "float16")
    assert all_finite([near_max])
