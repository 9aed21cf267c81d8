"""An independent NumPy transcription of the article's `EMA` class.

It works on dicts of `path -> array` and follows the article's `update()`
line by line: float64 decay, float32 shadows, `lerp` with `1 - decay`.
"""

from __future__ import annotations

import numpy as np


class ArticleEMA:
    def __init__(
        self,
        online: dict,
        beta=0.9999,
        update_after_step=100,
        update_every=10,
        inv_gamma=1.0,
        power=2 / 3,
        min_value=0.0,
        param_or_buffer_names_no_ema=(),
        ignore_names=(),
        ignore_startswith_names=(),
    ):
        self.beta = beta
        self.update_after_step = update_after_step
        self.update_every = update_every
        self.inv_gamma = inv_gamma
        self.power = power
        self.min_value = min_value
        self.no_ema = set(param_or_buffer_names_no_ema)
        self.ignore = set(ignore_names)
        self.ignore_prefixes = tuple(ignore_startswith_names)
        self.ema = {k: np.array(v, dtype=np.float32) for k, v in online.items()}
        self.step = 0
        self.initted = False

    def get_current_decay(self) -> float:
        epoch = max(self.step - self.update_after_step - 1, 0.0)
        value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
        if epoch <= 0:
            return 0.0
        return min(max(value, self.min_value), self.beta)

    def _copy(self, online):
        for k in self.ema:
            self.ema[k] = np.array(online[k], dtype=np.float32)

    def update(self, online: dict) -> None:
        step = self.step
        self.step += 1
        if step % self.update_every != 0:
            return
        if step <= self.update_after_step:
            self._copy(online)
            return
        if not self.initted:
            self._copy(online)
            self.initted = True
        weight = np.float32(1.0 - self.get_current_decay())
        for k, ema in self.ema.items():
            if k in self.ignore or k.startswith(self.ignore_prefixes or ("\0",)):
                continue
            value = np.asarray(online[k], dtype=np.float32)
            if k in self.no_ema:
                self.ema[k] = value.copy()
                continue
            self.ema[k] = ema + weight * (value - ema)
