"""Peak resident-set growth of one measurement, in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.overhead.environment import strategy_in_use
from benchmarks.overhead.shapes import Shape

# The folder `python -m benchmarks.overhead` runs from, for the child.
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def current_rss_kib() -> int:
    """The process's resident set now, in KiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def measure_rss(shape: Shape, mode: str, steps: int) -> float:
    """Peak-RSS growth in MiB of one measurement, run in a fresh process
    (``--rss-child``, `warm.rss_child`)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.overhead",
        "--rss-child",
        f"{shape.name}:{mode}:{steps}",
    ]
    if strategy_in_use():
        cmd += ["--strategy", "mirrored"]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd=REPOSITORY
    ).stdout
    line = [s for s in out.splitlines() if s.startswith("{")][-1]
    return json.loads(line)["rss_growth_kib"] / 1024.0
