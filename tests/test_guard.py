"""The NaN/Inf guard: one device flag over all the values of an update."""

from __future__ import annotations

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


def guard(values, dtype) -> bool:
    tensors = [ops.cast(ops.convert_to_tensor(v), dtype) for v in values]
    return bool(ops.convert_to_numpy(_all_finite(tensors)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    target=st.integers(0, len(SHAPES) - 1),
    position=st.floats(0.0, 1.0),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    seed=st.integers(0, 2**16),
)
def test_one_non_finite_element_anywhere_is_found(dtype, target, position, bad, seed):
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(shape).astype("float32") for shape in SHAPES]
    assert guard(values, dtype)
    flat = values[target].reshape(-1)
    flat[min(int(position * flat.size), flat.size - 1)] = bad
    assert not guard(values, dtype)


@pytest.mark.parametrize("dtype, scale", [("float32", 1e37), ("float16", 1e4)])
def test_huge_finite_values_are_finite(dtype, scale):
    # Summing them would overflow to Inf; the guard must not.
    values = [np.full(shape, scale, dtype="float32") for shape in SHAPES]
    assert guard(values, dtype)
