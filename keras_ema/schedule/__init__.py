"""Averaging schedules: when the EMA updates, and by how much.

- `base`: the `Schedule` interface, a pure function of the step;
- `conversions`: `sigma_rel` <-> `gamma` of the power-function EMA;
- `warmup`: `WarmupSchedule`, ema-pytorch's warm-up;
- `periodic`: `BiasCorrectedSchedule`, `PowerFunctionSchedule`,
  `HalfLifeSchedule`, which update after every `update_every`-th step;
- `momentum`: `ConstantSchedule`, `CosineSchedule`, the momentum of target
  networks and teachers, in the same rhythm;
- `serialization`: schedules to and from configs.
"""

from keras_ema.schedule.base import Schedule
from keras_ema.schedule.conversions import SIGMA_REL_MAX
from keras_ema.schedule.conversions import check_gamma
from keras_ema.schedule.conversions import check_sigma_rel
from keras_ema.schedule.conversions import checked_sigma_rels
from keras_ema.schedule.conversions import gamma_to_sigma_rel
from keras_ema.schedule.conversions import sigma_rel_to_gamma
from keras_ema.schedule.momentum import ConstantSchedule
from keras_ema.schedule.momentum import CosineSchedule
from keras_ema.schedule.periodic import BiasCorrectedSchedule
from keras_ema.schedule.periodic import HalfLifeSchedule
from keras_ema.schedule.periodic import PowerFunctionSchedule
from keras_ema.schedule.serialization import deserialize
from keras_ema.schedule.serialization import serialize
from keras_ema.schedule.warmup import WarmupSchedule

__all__ = [
    "SIGMA_REL_MAX",
    "BiasCorrectedSchedule",
    "ConstantSchedule",
    "CosineSchedule",
    "HalfLifeSchedule",
    "PowerFunctionSchedule",
    "Schedule",
    "WarmupSchedule",
    "check_gamma",
    "check_sigma_rel",
    "checked_sigma_rels",
    "deserialize",
    "gamma_to_sigma_rel",
    "serialize",
    "sigma_rel_to_gamma",
]
