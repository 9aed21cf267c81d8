"""Where a ``PostHocEMA``'s snapshots spend their time in a timed ``fit``."""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any

import keras


class SnapshotTimer:
    """Where a ``PostHocEMA``'s snapshots spend their time during the timed
    ``fit``: its blocking part on the training thread (``block``), of which
    waiting for the device to finish the steps queued so far (``device``:
    JAX dispatches ahead; TensorFlow and torch on CPU have nothing queued),
    waiting for the previous file (``wait``), bringing the model's variables
    up to date (``sync``: on JAX, Keras' train state written back into the
    model), copying the averages to the host (``averages``) and copying the
    other weights, the buffers (``buffers``); and writing the file, on the
    writer thread (``write``). A patch of the benchmark around the
    callback's own methods; inactive for the other modes."""

    PARTS = ("block", "device", "wait", "sync", "averages", "buffers", "write")
    # Parts that other hooks of the callback also run: counted only inside
    # a snapshot.
    INSIDE_ONLY = ("wait", "sync", "averages")

    def __init__(self, callbacks: list[keras.callbacks.Callback]) -> None:
        from keras_ema import PostHocEMA

        found = [c for c in callbacks if isinstance(c, PostHocEMA)]
        self.callback = found[0] if found else None
        self.active = self.callback is not None
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.count = 0
        self._inside = False
        self._stack = contextlib.ExitStack()

    def _timed(self, part: str, function: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            counted = part not in self.INSIDE_ONLY or self._inside
            if part == "block":
                self._inside = True
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if counted:
                    self.seconds[part] += time.perf_counter() - start
                if part == "block":
                    self.count += 1
                    self._inside = False

        return timed

    def __enter__(self) -> SnapshotTimer:
        if not self.active:
            return self
        from unittest import mock

        from keras_ema.posthoc import snapshots as posthoc_snapshots

        c = self.callback
        snapshots = c._snapshots
        patch = self._stack.enter_context
        drain = self._timed("device", self._drain)
        take_snapshot = snapshots.take

        def drained_snapshot(step: int) -> None:
            drain()
            take_snapshot(step)

        patch(
            mock.patch.object(snapshots, "take", self._timed("block", drained_snapshot))
        )
        patch(
            mock.patch.object(snapshots, "write", self._timed("write", snapshots.write))
        )
        engine = c._engine
        patch(
            mock.patch.object(
                engine, "host_shadows", self._timed("averages", engine.host_shadows)
            )
        )
        model = inspect.getattr_static(c, "model")
        patch(
            mock.patch.object(
                type(c),
                "model",
                property(self._timed("sync", model.fget), model.fset),
            )
        )
        patch(
            mock.patch.object(
                snapshots.writer,
                "finish",
                self._timed("wait", snapshots.writer.finish),
            )
        )
        patch(
            mock.patch.object(
                posthoc_snapshots,
                "snapshot_values",
                self._timed("buffers", posthoc_snapshots.snapshot_values),
            )
        )
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.active:
            # The last file is written before the counts are read.
            self.callback.wait()
        self._stack.close()

    def _drain(self) -> None:
        """Blocks until the steps queued on the device are done: the
        update's own arrays are the last thing each step writes."""
        if keras.backend.backend() != "jax":
            return
        import jax

        arrays = getattr(self.callback._engine, "_arrays", None)
        jax.block_until_ready(jax.tree_util.tree_leaves(arrays))

    def per_snapshot(self) -> dict[str, float]:
        """Milliseconds per snapshot of each part, and the count."""
        n = max(self.count, 1)
        timed = {part: 1000.0 * s / n for part, s in self.seconds.items()}
        return {**timed, "count": self.count}
