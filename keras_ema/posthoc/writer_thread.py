"""The background thread that writes `PostHocEMA`'s snapshot files, and the
writes in flight to each folder, across callbacks."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable

# Snapshot writes not finished yet, by real path of their folder, across
# callbacks: a callback that takes over a folder (a run resumed in the same
# process) first waits for the writes of the one it replaces.
_IN_FLIGHT: dict[str, set] = {}
_IN_FLIGHT_LOCK = threading.Lock()


class WriterThread:
    """One thread that runs the writes handed to it, in order; the thread
    starts with the first write and ends with `close`."""

    def __init__(self) -> None:
        self._executor = None
        self._pending = []

    def submit(self, directory: str, write: Callable, *args) -> None:
        """Runs `write(*args)` in the thread, as a write to `directory`."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="keras_ema_snapshots"
            )
        future = self._executor.submit(write, *args)
        self._pending.append(future)
        _track(directory, future)

    def finish(self) -> None:
        """Waits for the writes handed over so far; raises the first error."""
        pending, self._pending = self._pending, []
        error = None
        for future in pending:
            try:
                future.result()
            except BaseException as exception:
                error = error or exception
        if error is not None:
            raise error

    def close(self) -> None:
        """`finish`, then ends the thread (a later `submit` starts another)."""
        try:
            self.finish()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def wait_for_folder(directory: str) -> None:
    """Waits for every write in flight to `directory` (their errors are
    their callbacks' to raise)."""
    with _IN_FLIGHT_LOCK:
        futures = list(_IN_FLIGHT.get(_folder_key(directory), ()))
    concurrent.futures.wait(futures)


def _folder_key(directory: str) -> str:
    return os.path.realpath(directory)


def _track(directory: str, future) -> None:
    key = _folder_key(directory)
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.setdefault(key, set()).add(future)

    def done(finished) -> None:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.get(key, set()).discard(finished)

    future.add_done_callback(done)
