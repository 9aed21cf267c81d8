"""How shadows are laid out in the arrays or variables a `fit` updates.

Used by the JAX and TensorFlow engines. Small shadows of one dtype, kind and
placement are packed into flat arrays of up to `GROUP_ELEMENTS` elements;
larger ones keep their own. A fused step then reads and writes a few arrays
instead of one per weight: JAX pays for each array a jitted call takes and
returns, XLA on CPU runs an elementwise kernel per array, TensorFlow runs
every op of the update once per array, and the NaN/Inf guard checks the
packed values, which it would otherwise concatenate. Large shadows are not
packed: that would copy them every step, and gather a sharded one. Every
profile's shadows are packed the same way, and the weights once for all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Hashable

from keras import ops

from keras_ema.sizes import GROUP_ELEMENTS


class Packing:
    """The packed layout of one profile's shadows.

    Args:
        shadows: One profile's shadow variables.
        kinds: Their `Kind`s.
        placement: Maps a shadow to where it lives (a hashable), or to
            `None` where it must keep its own array.
    """

    def __init__(self, shadows, kinds, placement: Callable[[object], Hashable | None]):
        groups: dict = {}
        sizes: dict = {}
        for index, (shadow, kind) in enumerate(zip(shadows, kinds, strict=True)):
            size = math.prod(shadow.shape)
            where = placement(shadow) if size <= GROUP_ELEMENTS else None
            key = index
            if where is not None:
                key = (shadow.dtype, int(kind), where, 0)
                while sizes.get(key, 0) + size > GROUP_ELEMENTS:
                    key = (*key[:3], key[3] + 1)
                sizes[key] = sizes.get(key, 0) + size
            groups.setdefault(key, []).append(index)
        self.groups = list(groups.values())
        self.flat = [not isinstance(key, int) for key in groups]
        self.kinds = [kinds[group[0]] for group in self.groups]
        self.dtypes = [shadows[group[0]].dtype for group in self.groups]
        self.shapes = [tuple(shadow.shape) for shadow in shadows]
        self.shadow_dtypes = [shadow.dtype for shadow in shadows]

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

    def unpack(self, packed, reshape: Callable = ops.reshape) -> list:
        """Values aligned with the shadows, from the packed values: slices
        of each flat one, shaped by `reshape` (`numpy.reshape` for host
        arrays, whose slices are views)."""
        values = [None] * len(self.shapes)
        for group, flat, value in zip(self.groups, self.flat, packed, strict=True):
            if not flat:
                values[group[0]] = value
                continue
            offset = 0
            for index in group:
                size = math.prod(self.shapes[index])
                part = value[offset : offset + size]
                values[index] = reshape(part, self.shapes[index])
                offset += size
        return values
