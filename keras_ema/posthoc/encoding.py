"""How snapshot files store values: the snapshot dtypes, bfloat16 as its raw
bits in uint16 (NumPy has no bfloat16), and the dtype checks of the
writer."""

from __future__ import annotations

import numpy as np

SNAPSHOT_DTYPES = ("float32", "float16", "bfloat16")
# Stored dtype of each `snapshot_dtype` (NumPy has no bfloat16: its bits).
STORAGE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


def dtype_name(dtype) -> str:
    """The name of a NumPy or Keras dtype, `"bfloat16"` included."""
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype)


def is_float(dtype) -> bool:
    """Whether `dtype` is a floating-point dtype, bfloat16 included."""
    return dtype_name(dtype) == "bfloat16" or np.dtype(dtype).kind == "f"


def is_numeric(dtype) -> bool:
    """Whether `dtype` is a bool, integer or floating-point dtype."""
    return dtype_name(dtype) == "bfloat16" or np.dtype(dtype).kind in "biuf"


def encode_averaged(path: str, value, dtype: str) -> np.ndarray:
    """An averaged value as stored in the snapshot dtype `dtype`; raises a
    `ValueError` naming `path` if a finite value overflows it."""
    value32 = np.ascontiguousarray(value, dtype=np.float32)
    if dtype == "float32":
        return value32
    if dtype == "float16":
        with np.errstate(over="ignore"):
            stored = value32.astype(np.float16)
    else:
        stored = _bfloat16_bits(value32)
    overflow = ~np.isfinite(decode_averaged(stored, dtype)) & np.isfinite(value32)
    if overflow.any():
        raise ValueError(
            f"`dtype` must represent every averaged value: {path!r} holds "
            f"{value32[overflow].flat[0]!r}, which overflows {dtype}. "
            f"Received: dtype={dtype!r}"
        )
    return stored


def encode_buffer(value: np.ndarray) -> np.ndarray:
    """A buffer as stored: in its own dtype, bfloat16 as uint16 bits."""
    if dtype_name(value.dtype) == "bfloat16":
        return _bfloat16_bits(np.asarray(value, dtype=np.float32))
    return np.ascontiguousarray(value)


def _bfloat16_bits(value32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(value32, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    quiet_nan = (bits >> 16) | np.uint32(0x0040)
    return np.where(np.isnan(value32), quiet_nan, rounded).astype(np.uint16)


def decode_averaged(stored: np.ndarray, snapshot_dtype: str) -> np.ndarray:
    """A stored averaged value as a new float32 array."""
    if snapshot_dtype == "bfloat16":
        return _bfloat16_to_float32(stored)
    return stored.astype(np.float32)


def decode_buffer(stored: np.ndarray, dtype: str) -> np.ndarray:
    """A stored buffer as a new array of its own dtype (bfloat16: float32)."""
    if dtype == "bfloat16":
        return _bfloat16_to_float32(stored)
    return stored.copy()


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)
