"""Independent NumPy transcriptions of the averaging rules.

`ArticleEMA` is the article's `EMA` class. It works on dicts of
`path -> array` and follows the article's `update()` line by line: float64
decay, float32 shadows, `lerp` with `1 - decay`.

`ScheduledEMA` replays the schedules that update after every
`update_every`-th step, first copying, with one of the rules below: each
rule gives the weight of the n-th update from the formula of its source, in
float64, and none calls keras_ema.
"""

from __future__ import annotations

import math

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
        # float64 weights keep float64 shadows; every other float is float32.
        self.ema = {k: np.array(v, dtype=_shadow_dtype(v)) for k, v in online.items()}
        self.step = 0
        self.initted = False

    def get_current_decay(self) -> float:
        epoch = max(self.step - self.update_after_step - 1, 0.0)
        value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
        if epoch <= 0:
            return 0.0
        return min(max(value, self.min_value), self.beta)

    def _copy(self, online):
        for k, ema in self.ema.items():
            self.ema[k] = np.array(online[k], dtype=ema.dtype)

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
        weight = 1.0 - self.get_current_decay()
        for k, ema in self.ema.items():
            if k in self.ignore or k.startswith(self.ignore_prefixes or ("\0",)):
                continue
            value = np.asarray(online[k], dtype=ema.dtype)
            if k in self.no_ema:
                self.ema[k] = value.copy()
                continue
            self.ema[k] = ema + ema.dtype.type(weight) * (value - ema)


# Rules: `rule(n, t_n, delta_n) -> float64 weight` of the n-th update (n >= 2),
# made after step `t_n`, `delta_n` steps after the previous one.


def bias_corrected_rule(beta: float):
    """The article's section 2.2: the zero-started EMA divided by
    `1 - beta**n`, as a lerp of the corrected value."""

    def rule(n, t_n, delta_n):
        return (1.0 - beta) / (1.0 - beta**n)

    return rule


def power_function_rule(gamma: float):
    """EDM2's `power_function_beta`: `beta = (1 - delta / t) ** (gamma + 1)`."""

    def rule(n, t_n, delta_n):
        return 1.0 - (1.0 - delta_n / t_n) ** (gamma + 1.0)

    return rule


def half_life_rule(half_life_steps: float):
    """Composer's half-life: `beta = 0.5 ** (delta / h)`."""

    def rule(n, t_n, delta_n):
        return 1.0 - 0.5 ** (delta_n / half_life_steps)

    return rule


def constant_rule(beta: float):
    """Polyak averaging, `target = (1 - tau) * target + tau * online`:
    `tau = 1 - beta` at every update."""

    def rule(n, t_n, delta_n):
        return 1.0 - beta

    return rule


def cosine_rule(start: float, end: float, total_steps: int):
    """BYOL's momentum at step k of K,
    `end - (end - start) * (cos(pi * k / K) + 1) / 2`, held from step K on."""

    def rule(n, t_n, delta_n):
        k = min(t_n, total_steps)
        rising = (math.cos(math.pi * k / total_steps) + 1.0) / 2.0
        return 1.0 - (end - (end - start) * rising)

    return rule


def sigma_rel_to_gamma_by_bisection(sigma_rel: float) -> float:
    """`gamma` with `sqrt((g + 1) / ((g + 2)**2 (g + 3))) == sigma_rel`, by
    bisection on that decreasing function (EDM2 solves a cubic instead)."""

    def sigma(g):
        return math.sqrt((g + 1) / (g + 3)) / (g + 2)

    low, high = 0.0, 1.0
    while sigma(high) > sigma_rel:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2
        if sigma(middle) > sigma_rel:
            low = middle
        else:
            high = middle
    return (low + high) / 2


class ScheduledEMA:
    """An EMA updated after every `update_every`-th step with `rule`.

    `update(online)` is called once after each optimizer step. The n-th
    update, after step `t_n = n * update_every`, copies every tracked array
    when `n == 1` (the filters aside, as the article's first copies do);
    afterwards it lerps with the rule's float64 weight cast to float32,
    leaving `ignore_names` / `ignore_startswith_names` alone and copying
    `param_or_buffer_names_no_ema`. `decay` is that of the latest update
    (`0.0` until the second).
    """

    def __init__(
        self,
        online: dict,
        rule,
        update_every: int = 1,
        param_or_buffer_names_no_ema=(),
        ignore_names=(),
        ignore_startswith_names=(),
    ):
        self.rule = rule
        self.update_every = update_every
        self.no_ema = set(param_or_buffer_names_no_ema)
        self.ignore = set(ignore_names)
        self.ignore_prefixes = tuple(ignore_startswith_names)
        # float64 weights keep float64 shadows; every other float is float32.
        self.ema = {k: np.array(v, dtype=_shadow_dtype(v)) for k, v in online.items()}
        self.step = 0
        self.updates = 0
        self.last_update_step = 0
        self.decay = 0.0

    def get_current_decay(self) -> float:
        return self.decay

    def update(self, online: dict) -> None:
        self.step += 1
        if self.step % self.update_every != 0:
            return
        self.updates += 1
        delta = self.step - self.last_update_step
        self.last_update_step = self.step
        if self.updates == 1:
            for k, ema in self.ema.items():
                self.ema[k] = np.array(online[k], dtype=ema.dtype)
            self.decay = 0.0
            return
        weight = self.rule(self.updates, self.step, delta)
        self.decay = 1.0 - weight
        for k, ema in self.ema.items():
            if k in self.ignore or k.startswith(self.ignore_prefixes or ("\0",)):
                continue
            value = np.asarray(online[k], dtype=ema.dtype)
            if k in self.no_ema:
                self.ema[k] = value.copy()
                continue
            self.ema[k] = ema + ema.dtype.type(weight) * (value - ema)


def _shadow_dtype(value):
    return np.float64 if np.asarray(value).dtype == np.float64 else np.float32
