"""Saving an EMA: every file `keras_ema` writes or reads for the state of an
`EMA` callback.

- `atomic`: the one atomic write (a new file beside the target, synced, then
  `os.replace`) and the one read that turns any failure into a `ValueError`
  naming the file; post-hoc EMA snapshots use both too;
- `npz_state`: the state file format of `EMA.save_state` (a NumPy `.npz`
  archive with a JSON header), its checks, and the pairing of its variables
  with a model's (by position, with `weight_paths`);
- `orbax_state`: the same state as a checkpointable of an Orbax checkpoint
  step, written as it is sharded, read back with each shadow's sharding;
- `sidecars`: the state files beside `model.save_weights` files
  (`BackupAndRestore`), and the state riding along with `OrbaxCheckpoint`
  saves and `model.load_weights` of Orbax checkpoints;
- `store`: `StateStore`, the part of an `EMA` that writes, reads and
  restores its state, through which all of the above go.
"""
