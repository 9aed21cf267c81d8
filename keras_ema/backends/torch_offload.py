"""The EMA on torch with its shadows in host memory (`offload_to_host=True`):
the flat buffers live on the host and are blended one due step late."""

from __future__ import annotations

import keras
import torch

from keras_ema.backends.torch import Engine
from keras_ema.backends.torch import Placement


class HostPlacement(Placement):
    def scope(self, model):
        return keras.device("cpu:0")

    def initial_value(self, weight, dtype):
        return weight.value.detach().to(
            device="cpu", dtype=getattr(torch, dtype), copy=True
        )


class HostEngine(Engine):
    """`Engine` over flat host buffers, blended one due step late.

    A due step only starts copying the online weights into a pinned host
    buffer (`non_blocking`) and returns; the blend runs on the CPU at the
    next due step or when the shadows are read (`flush`), by which time the
    copy has long landed. Only the CUDA event of that copy is waited for.
    """

    def __init__(self, state):
        super().__init__(state)
        groups = self.blender.groups
        self._pinned = torch.cuda.is_available() and any(
            view.is_cuda for g in groups for view in g.views
        )
        self.staging = [
            torch.empty(g.flats[0].shape, dtype=g.dtype, pin_memory=self._pinned)
            for g in groups
        ]
        self._pending = None
        self._copied = None

    def _blends_in_place(self) -> bool:
        # Always through the staging buffer: the weights may be on a device.
        return False

    def _blend(self, weights_per_profile) -> None:
        self.finish()
        with torch.no_grad():
            for group, staging in zip(self.blender.groups, self.staging, strict=True):
                for view, start, size in zip(
                    group.views, group.offsets, group.sizes, strict=False
                ):
                    staging[start : start + size].copy_(view, non_blocking=True)
        if self._pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._pending = weights_per_profile

    def finish(self) -> None:
        """Blends the pending due step, once its copy has landed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        self.blender.blend_online(self.staging, pending)

    def flush(self) -> None:
        self.finish()
        super().flush()

    def end_epoch(self, logs: dict) -> None:
        # The last batch's log does not count the due step still pending.
        if "ema_skipped" in logs:
            self.flush()
            logs["ema_skipped"] = int(keras.ops.convert_to_numpy(self.state.skipped))

    def reload(self) -> None:
        # The variables were written from outside (a loaded state): an update
        # still waiting for its copy belongs to the state they replaced.
        self._pending = None
        self._copied = None
        super().reload()
