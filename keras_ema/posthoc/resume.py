"""A `PostHocEMA` run taking over its snapshot folder, at its start or when
it resumes: the folder must hold this run's snapshots only, and those after
the step the run goes on from are deleted, so that the run writes what an
uninterrupted one would."""

from __future__ import annotations

import os

from keras_ema.posthoc.folder import snapshot_paths
from keras_ema.posthoc.reader import read_header


def take_over_folder(
    directory: str,
    step: int,
    verified: set,
    *,
    run_id: str,
    fingerprint: str,
    sigma_rels: tuple,
) -> int:
    """Checks that `directory` holds only the snapshots of the run
    (`run_id`, `fingerprint`, `sigma_rels`) and deletes those after `step`.

    Args:
        directory: The snapshot folder.
        step: The step the run goes on from.
        verified: The paths already checked, updated here.
        run_id: The run's id.
        fingerprint: The model's fingerprint.
        sigma_rels: The tracked `sigma_rel`s.

    Returns:
        The step of the newest snapshot kept, 0 if none.
    """
    files = snapshot_paths(directory)
    for _, path in files:
        if path not in verified:
            header = read_header(path)
            _check_same_run(header, path, directory, run_id, fingerprint, sigma_rels)
            verified.add(path)
    for file_step, path in files:
        if file_step > step:
            os.remove(path)
            verified.discard(path)
    return max((s for s, _ in files if s <= step), default=0)


def _check_same_run(header, path, directory, run_id, fingerprint, sigma_rels):
    differences = []
    if header["run_id"] != run_id:
        differences.append(f"run id {header['run_id']!r} (this run: {run_id!r})")
    if header["fingerprint"] != fingerprint:
        differences.append(
            "model fingerprint (the paths, shapes or dtypes of the model's "
            "variables differ: another architecture, or unnamed layers "
            "numbered anew)"
        )
    if tuple(header["sigma_rels"]) != sigma_rels:
        differences.append(
            f"sigma_rels {header['sigma_rels']} (this run: {list(sigma_rels)})"
        )
    if differences:
        raise ValueError(
            "`directory` must be new, empty or hold the snapshots of this "
            "run (a run resumed from its saved EMA state keeps its run id), "
            f"but {path!r} is a snapshot of another run: its "
            + "; its ".join(differences)
            + f". Received: directory={directory!r}"
        )
