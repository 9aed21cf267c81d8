"""Post-hoc EMA (Karras et al. 2024, EDM2): `PostHocEMA` tracks
power-function EMAs during training and saves snapshots of them
(`callback`); `PostHocRun` synthesizes the EMA of any length from them after
training (`run`); the snapshot files are described in `snapshot_io`."""

from keras_ema.posthoc.run import PostHocRun
from keras_ema.posthoc.run import SweepResult
from keras_ema.posthoc.run import reconstruction_error
from keras_ema.posthoc.run import solve_coefficients
from keras_ema.posthoc.snapshot_io import Snapshot
from keras_ema.posthoc.snapshot_io import model_fingerprint
from keras_ema.posthoc.snapshot_io import read_snapshot
from keras_ema.posthoc.snapshot_io import snapshot_filename
from keras_ema.posthoc.snapshot_io import write_snapshot
from keras_ema.schedule import gamma_to_sigma_rel
from keras_ema.schedule import sigma_rel_to_gamma

__all__ = [
    "PostHocRun",
    "Snapshot",
    "SweepResult",
    "gamma_to_sigma_rel",
    "model_fingerprint",
    "read_snapshot",
    "reconstruction_error",
    "sigma_rel_to_gamma",
    "snapshot_filename",
    "solve_coefficients",
    "write_snapshot",
]
