"""keras-ema: an exponential moving average of Keras 3 weights, as a callback."""

from keras_ema.callback import EMA
from keras_ema.checkpoint import EMAModelCheckpoint
from keras_ema.checkpoint import EMAOrbaxCheckpoint
from keras_ema.posthoc import PostHocRun
from keras_ema.posthoc.callback import PostHocEMA
from keras_ema.schedule import BiasCorrectedSchedule
from keras_ema.schedule import ConstantSchedule
from keras_ema.schedule import CosineSchedule
from keras_ema.schedule import HalfLifeSchedule
from keras_ema.schedule import PowerFunctionSchedule
from keras_ema.schedule import Schedule
from keras_ema.schedule import WarmupSchedule

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "BiasCorrectedSchedule",
    "ConstantSchedule",
    "CosineSchedule",
    "EMAModelCheckpoint",
    "EMAOrbaxCheckpoint",
    "HalfLifeSchedule",
    "PostHocEMA",
    "PostHocRun",
    "PowerFunctionSchedule",
    "Schedule",
    "WarmupSchedule",
    "__version__",
]
