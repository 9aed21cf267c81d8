"""Which weights the EMA tracks, and the shadows and counters that hold it.

`ShadowState` owns, for each averaging profile, one shadow `keras.Variable`
per tracked model weight (every floating-point weight, trainable or not, or
with `trainable_only` the trainable ones),
and two int32 counters shared by the profiles: the optimizer steps taken and
the updates skipped because a weight was NaN or infinite. Where and how the
variables are laid out is the backend's business: it comes in as a
`placement` (see `keras_ema.backends`); this module imports no backend.
"""

from __future__ import annotations

import dataclasses
import enum
import weakref
from collections.abc import Iterable
from collections.abc import Sequence

import keras

from keras_ema.schedule import Schedule


class Kind(enum.IntEnum):
    """How a tracked weight is treated once the warm-up is over."""

    AVERAGE = 0
    COPY = 1  # `param_or_buffer_names_no_ema`: copied, never averaged.
    IGNORE = 2  # `ignore_names` / `ignore_startswith_names`: left as is.


def shadow_dtype(dtype: str) -> str:
    """float64 weights keep float64 shadows; every other float gets float32.

    A bfloat16 shadow with beta 0.999 would never move (its 8-bit mantissa
    rounds `(1 - beta) * delta` away), so low-precision weights are averaged
    in float32 and cast back on a swap.
    """
    return "float64" if dtype == "float64" else "float32"


def check_names(name: str, value) -> tuple[str, ...]:
    """Validates a name filter argument: a collection of strings."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(
            f"`{name}` must be a collection of strings (variable paths). "
            f"Received: {name}={value!r}"
        )
    names = tuple(value)
    for item in names:
        if not isinstance(item, str):
            raise ValueError(
                f"`{name}` must contain only strings. Received: {name}={value!r}"
            )
    return names


def check_offload(offload_to_host) -> bool:
    """Checks `EMA`'s `offload_to_host` argument."""
    if not isinstance(offload_to_host, bool):
        raise ValueError(
            "`offload_to_host` must be a boolean. "
            f"Received: offload_to_host={offload_to_host!r}"
        )
    return offload_to_host


# Every EMA's shadow variables, by id: an averaged model held by a model is
# made of them, and no EMA averages another's (or its own) averages.
_SHADOWS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def is_shadow(variable) -> bool:
    """Whether `variable` is the shadow of some EMA."""
    return _SHADOWS.get(id(variable)) is variable


def tracked_weights(model, trainable_only: bool = False) -> list:
    """The floating-point weights of `model` (only the trainable ones with
    `trainable_only`), in `model.weights` order, leaving out the shadows of
    any EMA (those of an averaged model the model holds)."""
    return [
        w
        for w in model.weights
        if keras.backend.is_float_dtype(w.dtype)
        and (w.trainable or not trainable_only)
        and not is_shadow(w)
    ]


def classify(
    paths: Sequence[str],
    no_ema: Sequence[str],
    ignore: Sequence[str],
    ignore_prefixes: Sequence[str],
) -> list[Kind]:
    """Assigns a `Kind` to each path; a filter that matches nothing raises."""
    for arg, names, matches in (
        ("param_or_buffer_names_no_ema", no_ema, str.__eq__),
        ("ignore_names", ignore, str.__eq__),
        ("ignore_startswith_names", ignore_prefixes, str.startswith),
    ):
        for name in names:
            if not any(matches(path, name) for path in paths):
                raise ValueError(
                    f"`{arg}` contains {name!r}, which matches no "
                    "floating-point weight of the model. Weight paths are: "
                    f"{list(paths)}"
                )
    kinds = []
    for path in paths:
        if path in ignore or any(path.startswith(p) for p in ignore_prefixes):
            kinds.append(Kind.IGNORE)
        elif path in no_ema:
            kinds.append(Kind.COPY)
        else:
            kinds.append(Kind.AVERAGE)
    return kinds


def weights_signature(weights) -> tuple:
    return tuple(
        (tuple(w.shape), keras.backend.standardize_dtype(w.dtype), id(w))
        for w in weights
    )


@dataclasses.dataclass(frozen=True)
class Filters:
    """The three name filters of ema-pytorch's `EMA` class."""

    no_ema: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    ignore_prefixes: tuple[str, ...] = ()


@dataclasses.dataclass
class Profile:
    """One average of the tracked weights: its name and one shadow per
    tracked weight (its schedule is `ShadowState.schedules`' entry)."""

    name: str
    shadows: list

    @property
    def decay_key(self) -> str:
        """The log key of this profile's decay."""
        return f"ema_{self.name}_decay" if self.name else "ema_decay"


class ShadowState:
    """The shadow variables of one model and the counters of its EMA.

    Args:
        model: A built Keras model.
        profiles: `(name, schedule)` pairs, one average each.
        filters: The name filters.
        offload: Whether the shadows and counters live in host memory.
        placement: The backend's `Placement` for these variables.
        trainable_only: Whether to track the trainable weights only (no
            shadow for BatchNormalization statistics and other
            non-trainable weights). Defaults to `False`.
    """

    def __init__(
        self,
        model,
        profiles: Sequence[tuple[str, Schedule]],
        filters: Filters,
        offload: bool,
        placement,
        trainable_only: bool = False,
    ):
        self.model = model
        # The model whose `fit` runs the updates (`model`, or a model that
        # contains it), and the averaged models by profile index.
        self.fit_model = model
        self.averaged_models: dict[int, keras.Model] = {}
        self.offload = offload
        self.trainable_only = trainable_only
        self.weights = tracked_weights(model, trainable_only)
        if not self.weights:
            kind = "trainable floating-point" if trainable_only else "floating-point"
            raise ValueError(
                f"The EMA needs a built model with {kind} weights. "
                f"Model {model.name!r} has none; build it (call it on data "
                "or `model.build(input_shape)`) before using the callback."
            )
        self.paths = [w.path for w in self.weights]
        self.kinds = classify(
            self.paths, filters.no_ema, filters.ignore, filters.ignore_prefixes
        )
        self.signature = weights_signature(self.weights)
        self.placement = placement
        placement.check(model, self.weights)
        # Each profile's schedule in steps (`use_schedules`).
        self.schedules = [schedule for _, schedule in profiles]
        with placement.scope(model):
            self.profiles = [
                Profile(name, self._make_shadows(placement, name))
                for name, _ in profiles
            ]
            counter_layout = placement.counter_layout(self.weights)
            self.step = _counter("ema_step", placement, counter_layout)
            self.skipped = _counter("ema_skipped", placement, counter_layout)

    def _make_shadows(self, placement, profile: str) -> list:
        prefix = f"ema_{profile}_" if profile else "ema_"
        shadows = []
        for index, weight in enumerate(self.weights):
            dtype = shadow_dtype(keras.backend.standardize_dtype(weight.dtype))
            shadow = keras.Variable(
                placement.initial_value(weight, dtype),
                dtype=dtype,
                trainable=False,
                name=f"{prefix}{index}_" + weight.path.replace("/", "_"),
                autocast=False,
                aggregation=placement.aggregation,
                layout=placement.shadow_layout(weight),
            )
            shadows.append(shadow)
            _SHADOWS[id(shadow)] = shadow
        return shadows

    @property
    def shadows(self) -> list:
        """The first profile's shadows."""
        return self.profiles[0].shadows

    def use_schedules(self, schedules: Sequence[Schedule]) -> None:
        """Sets each profile's schedule in steps (those of one `fit`, where a
        half-life is given in epochs or samples): the one place an engine
        reads them from, so an engine is made again after this."""
        self.schedules = list(schedules)

    @property
    def counters(self) -> list:
        return [self.step, self.skipped]

    def check_model_unchanged(self) -> None:
        """Raises if the model's float weights differ from those shadowed."""
        current = tracked_weights(self.model, self.trainable_only)
        if weights_signature(current) == self.signature:
            return
        before = {p: s for p, s in zip(self.paths, self.signature, strict=True)}
        after = {
            w.path: s for w, s in zip(current, weights_signature(current), strict=True)
        }
        changes = sorted(set(before.items()) ^ set(after.items()))
        raise ValueError(
            f"The weights of model {self.model.name!r} changed after the EMA "
            "started tracking them (weights added, removed or reshaped"
            f"{', or made trainable or not' if self.trainable_only else ''}). "
            f"Differences (path, (shape, dtype, id)): {changes[:10]}. Create "
            "a new `EMA` callback for the changed model."
        )


def _counter(name: str, placement, layout):
    return keras.Variable(
        0,
        dtype="int32",
        trainable=False,
        name=name,
        aggregation=placement.aggregation,
        layout=layout,
    )
