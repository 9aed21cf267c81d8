"""Starting the processes of a multi-process test on this machine.

Each process runs a harness script with its own arguments, its output
going to a log file; the launch waits for all of them within a time limit,
and on the first failure stops the others (which may wait forever for a
collective) and reports every process's output.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclasses.dataclass
class Launch:
    """What the processes of one launch did."""

    failures: list[str]
    outputs: list[str]
    seconds: float

    def report(self, what: str) -> str:
        """The failures, then the tail of every process's output."""
        tails = "\n".join(
            f"----- {what}, process {i} -----\n{tail(output)}"
            for i, output in enumerate(self.outputs)
        )
        return f"{what} failed: {'; '.join(self.failures)}\n{tails}"


def launch(script: str, arguments: list[list[str]], logs: list[str], timeout: float):
    """Runs `python script *arguments[i]` for every `i` at once, each writing
    to `logs[i]`, and returns a `Launch` once all have exited or one has
    failed or `timeout` seconds have passed."""
    start = time.monotonic()
    processes = []
    for argv, log in zip(arguments, logs, strict=True):
        with open(log, "w") as file:
            processes.append(
                subprocess.Popen(
                    [sys.executable, script, *argv],
                    stdout=file,
                    stderr=subprocess.STDOUT,
                )
            )
    failures = []
    for i, process in enumerate(processes):
        left = max(1.0, timeout - (time.monotonic() - start))
        try:
            code = process.wait(timeout=left)
        except subprocess.TimeoutExpired:
            failures.append(f"process {i} ran over {timeout} s")
            code = None
        if code != 0:
            if code is not None:
                failures.append(f"process {i} exited with {code}")
            _stop(processes)
            break
    outputs = []
    for log in logs:
        with open(log, errors="replace") as file:
            outputs.append(file.read())
    return Launch(failures, outputs, time.monotonic() - start)


def _stop(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def tail(text: str, lines: int = 60) -> str:
    return "".join(text.splitlines(keepends=True)[-lines:])
