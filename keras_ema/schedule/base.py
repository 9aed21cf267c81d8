"""The `Schedule` base class: when the EMA updates, and by how much.

A schedule is a pure function of `t`, the number of optimizer steps taken,
counting the one just taken (so `t >= 1` when an update is considered). It
answers, for the update considered after step `t`:

- `is_due(t)`: whether an update happens at all;
- `copies_all(t)`: whether that update copies every tracked weight into the
  shadow (those left alone by `ignore_names` too), as a warm-up does;
- `weight(t)`: the interpolation weight `1 - decay` of that update
  (`1` copies), in float64 on the host; an update that `copies_all` copies
  whatever its weight;
- `decay(t)`: the decay reported in logs and by `get_current_decay()`.

`compiled_is_due`, `compiled_copies_all` and `compiled_weight` are the same
three with `keras.ops` on an int32 scalar tensor, for compiled train steps
(float32).
"""

from __future__ import annotations

import dataclasses


class Schedule:
    """Base class of the averaging schedules; see the module docstring."""

    update_every: int

    def is_due(self, t: int) -> bool:
        raise NotImplementedError

    def copies_all(self, t: int) -> bool:
        raise NotImplementedError

    def weight(self, t: int) -> float:
        raise NotImplementedError

    def decay(self, t: int) -> float:
        raise NotImplementedError

    def compiled_is_due(self, t):
        raise NotImplementedError

    def compiled_copies_all(self, t):
        raise NotImplementedError

    def compiled_weight(self, t):
        raise NotImplementedError

    def first_averaging_step(self) -> int:
        """The first step `t` whose update averages rather than copies:
        before it, the EMA is a copy of the weights."""
        raise NotImplementedError

    def in_steps(
        self,
        steps_per_epoch: int | None = None,
        batch_size: int | None = None,
        epochs: int | None = None,
    ) -> Schedule:
        """The schedule with every length in optimizer steps, given what a
        `fit` knows (`None` where it cannot say); most schedules are
        already."""
        return self

    def get_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)
