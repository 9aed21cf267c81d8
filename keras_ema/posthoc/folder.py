"""The snapshot files of a folder: listed by step, and, for `PostHocRun`,
with their headers checked to belong to one run."""

from __future__ import annotations

import dataclasses
import os

from keras_ema.posthoc.layout import snapshot_step
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
