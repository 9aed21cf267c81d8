"""Which averages an `EMA` keeps: its arguments resolved into named
schedules, and back into a config."""

from __future__ import annotations

from collections.abc import Mapping

from keras_ema import schedule as schedules
from keras_ema.schedule import Schedule
from keras_ema.schedule import WarmupSchedule

# The warm-up arguments of `EMA` and their defaults.
WARMUP_DEFAULTS = {
    name: field.default for name, field in WarmupSchedule.__dataclass_fields__.items()
}


def profile_index(names: list[str], profile: str | None) -> int:
    """The position of `profile` among `names`; `None` is the first."""
    if profile is None:
        return 0
    if profile not in names or not profile:
        raise ValueError(
            f"`profile` must be one of {[n for n in names if n]} or None. "
            f"Received: profile={profile!r}"
        )
    return names.index(profile)


def from_arguments(warmup: dict, schedule, profiles) -> list:
    """`(name, schedule)` pairs from `EMA`'s arguments, validated."""
    if schedule is None and profiles is None:
        return [("", WarmupSchedule(**warmup))]
    given = "schedule" if profiles is None else "profiles"
    if schedule is not None and profiles is not None:
        raise ValueError(
            "Pass `schedule` or `profiles`, not both. "
            f"Received: schedule={schedule!r}, profiles={profiles!r}"
        )
    for name, value in warmup.items():
        if value != WARMUP_DEFAULTS[name]:
            raise ValueError(
                f"`{name}` belongs to the default warm-up schedule and cannot "
                f"be combined with `{given}`: pass "
                f"`keras_ema.WarmupSchedule({name}=...)` there instead. "
                f"Received: {name}={value!r}, {given}=..."
            )
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise ValueError(
                "`schedule` must be a schedule object such as "
                "`keras_ema.PowerFunctionSchedule(sigma_rel=0.05)`. "
                f"Received: schedule={schedule!r}"
            )
        return [("", schedule)]
    if not isinstance(profiles, Mapping) or not profiles:
        raise ValueError(
            "`profiles` must be a non-empty dict of name to schedule. "
            f"Received: profiles={profiles!r}"
        )
    for name, value in profiles.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                "`profiles` names must be Python identifiers (they become log "
                f"keys such as `val_ema_<name>_loss`). Received: profile name "
                f"{name!r} in profiles={profiles!r}"
            )
        if not isinstance(value, Schedule):
            raise ValueError(
                f"`profiles` values must be schedule objects. Received: "
                f"profiles[{name!r}]={value!r}"
            )
    return list(profiles.items())


def to_config(profiles: list) -> dict:
    """The averaging part of `EMA.get_config()`: the warm-up arguments as
    today for the default schedule, else `schedule` or `profiles`."""
    (first_name, first), *_ = profiles
    if first_name:
        return {"profiles": {name: schedules.serialize(s) for name, s in profiles}}
    if isinstance(first, WarmupSchedule):
        return first.get_config()
    return {"schedule": schedules.serialize(first)}


def from_config(config: dict) -> dict:
    """`EMA` arguments from `EMA.get_config()`, schedules rebuilt."""
    config = dict(config)
    if "schedule" in config:
        config["schedule"] = schedules.deserialize(config["schedule"])
    if "profiles" in config:
        config["profiles"] = {
            name: schedules.deserialize(value)
            for name, value in config["profiles"].items()
        }
    return config
