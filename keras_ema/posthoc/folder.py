"""The snapshot files of a folder: listed by step; for `PostHocRun`, with
their headers checked to belong to one run; for `PostHocEMA`, taken over by
a run at its start or when it resumes: the folder must hold this run's
snapshots only, and those after the step the run goes on from are deleted,
so that the run writes what an uninterrupted one would."""

from __future__ import annotations

import dataclasses
import os

from keras_ema.posthoc.format import snapshot_step
from keras_ema.posthoc.reader import read_header


@dataclasses.dataclass(frozen=True)
class SnapshotFile:
    """One snapshot file, its step and its checked header."""

    path: str
    step: int
    header: dict


def snapshot_paths(directory: str) -> list:
    """`(step, path)` of the snapshot files in `directory`, by step (none if
    `directory` is not a folder)."""
    if not os.path.isdir(directory):
        return []
    files = []
    for name in os.listdir(directory):
        step = snapshot_step(directory, name)
        if step is not None:
            files.append((step, os.path.join(directory, name)))
    return sorted(files)


def read_run(directory: str) -> list[SnapshotFile]:
    """The snapshot files of `directory`, by step, with their headers read
    and checked: each file's step is the one its name says, and every file
    belongs to the same run as the first."""
    files = []
    for name in sorted(os.listdir(directory)):
        step = snapshot_step(directory, name)
        if step is None:
            continue
        path = os.path.join(directory, name)
        header = read_header(path)
        if header["step"] != step:
            raise ValueError(
                f"{path!r} is not a valid keras_ema post-hoc EMA snapshot: "
                f"its header holds step {header['step']}, its name step "
                f"{step}."
            )
        files.append(SnapshotFile(path, header["step"], header))
    if not files:
        raise ValueError(
            "`directory` must hold post-hoc EMA snapshots "
            f"(`snapshot-<step>.npz` files). Received: "
            f"directory={directory!r}, which holds none"
        )
    files = sorted(files, key=lambda file: file.step)
    reference = files[0]
    for file in files[1:]:
        _check_same_run(file, reference)
    return files


def _check_same_run(file: SnapshotFile, reference: SnapshotFile) -> None:
    for key, what in (
        ("run_id", "run"),
        ("fingerprint", "model fingerprint"),
        ("sigma_rels", "tracked sigma_rels"),
        ("variables", "variables"),
    ):
        if file.header[key] != reference.header[key]:
            shown = (
                ""
                if key == "variables"
                else (f" ({file.header[key]!r} vs {reference.header[key]!r})")
            )
            raise ValueError(
                f"{file.path!r} does not belong with {reference.path!r}: "
                f"its {what} differ{shown}. A folder must hold the snapshots "
                "of one run only."
            )


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
            _check_run_of(header, path, directory, run_id, fingerprint, sigma_rels)
            verified.add(path)
    for file_step, path in files:
        if file_step > step:
            os.remove(path)
            verified.discard(path)
    return max((s for s, _ in files if s <= step), default=0)


def _check_run_of(header, path, directory, run_id, fingerprint, sigma_rels):
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
