"""Schedules to and from JSON-compatible configs: `{"class_name", "config"}`,
as `EMA.get_config()` stores them."""

from __future__ import annotations

from keras_ema.schedule.base import Schedule
from keras_ema.schedule.momentum import ConstantSchedule
from keras_ema.schedule.momentum import CosineSchedule
from keras_ema.schedule.periodic import BiasCorrectedSchedule
from keras_ema.schedule.periodic import HalfLifeSchedule
from keras_ema.schedule.periodic import PowerFunctionSchedule
from keras_ema.schedule.warmup import WarmupSchedule


def serialize(schedule: Schedule) -> dict:
    """`{"class_name", "config"}` of a schedule, JSON-compatible."""
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize(config) -> Schedule:
    """The schedule that `serialize` described."""
    classes = {
        cls.__name__: cls
        for cls in (
            WarmupSchedule,
            BiasCorrectedSchedule,
            PowerFunctionSchedule,
            HalfLifeSchedule,
            ConstantSchedule,
            CosineSchedule,
        )
    }
    if isinstance(config, Schedule):
        return config
    if not isinstance(config, dict) or config.get("class_name") not in classes:
        raise ValueError(
            "A schedule's config must be a dict with a `class_name` among "
            f"{sorted(classes)} and a `config`. Received: {config!r}"
        )
    return classes[config["class_name"]].from_config(config.get("config", {}))
