"""Post-hoc EMA: snapshots of power-function EMAs, and the EMA of any length
synthesized from them after training (Karras et al. 2024, EDM2).

During training a few power-function EMAs (EDM2: `sigma_rel` 0.05 and 0.10)
are tracked and saved together every so often, one snapshot file per step.
Afterwards `PostHocRun` mixes the snapshots linearly into the EMA of any other
relative width `sigma_rel`, at any snapshot step.

- `callback`: `PostHocEMA`, which tracks the EMAs and writes the snapshots,
  with `setup_checks` (its refusals) and `snapshots` (which steps get a
  snapshot, taking, writing and thinning them);
- `format`: the snapshot files: names, header and entries, the stored dtypes,
  `model_fingerprint`, the disk space they take;
- `writer`: `write_snapshot`, and the host copies and background thread of
  `PostHocEMA`'s writes; `reader`: `read_snapshot` and the checked reads;
- `folder`: the snapshot files of a folder, checked to be of one run, and a
  run taking over its folder when it starts or resumes;
- `coefficients`: the math: the mix of snapshots and its error;
- `run`: `PostHocRun`, synthesis from a folder, with `sweep` (scores over
  several `sigma_rel`s, and their plot) and `model_weights` (the snapshot
  variables paired with a model's, and a model holding synthesized weights
  for a block).

References:
    - Karras et al., 2024, "Analyzing and Improving the Training Dynamics of
      Diffusion Models", section 3 and appendix C.
"""

from keras_ema.posthoc.coefficients import reconstruction_error
from keras_ema.posthoc.coefficients import solve_coefficients
from keras_ema.posthoc.format import model_fingerprint
from keras_ema.posthoc.format import snapshot_filename
from keras_ema.posthoc.reader import Snapshot
from keras_ema.posthoc.reader import read_snapshot
from keras_ema.posthoc.run import PostHocRun
from keras_ema.posthoc.sweep import SweepResult
from keras_ema.posthoc.writer import write_snapshot
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
