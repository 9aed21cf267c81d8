"""The math of post-hoc EMA (Karras et al. 2024, EDM2): the coefficients that
mix power-function EMA snapshots into the EMA of another relative width, and
the error of that mix. NumPy only, in float64.

The power-function EMA at time `t` weights the past weights by
`p(tau) = (g + 1) / t * (tau / t) ** g` on `[0, t]`, `g = gamma`. The target
profile `p_r` (time `t_r`, `sigma_rel_r`) is approximated by `sum_i x_i p_i`
over the snapshots with `t_i <= t_r`, least squares in L2:
`A[i, j] = <p_i, p_j>`, `b[i] = <p_i, p_r>`, `x = lstsq(A, b)`, then
`x /= sum(x)` so that a constant weight stays constant. The inner products
have a closed form, computed as a ratio `(t_a / t_b) ** gamma` (never
`t ** gamma`, which overflows). `A` is badly conditioned (its condition
number grows like the fourth power of the number of snapshots), hence float64
and a least-squares solve.

References:
    - Karras et al., 2024, "Analyzing and Improving the Training Dynamics of
      Diffusion Models", section 3 and appendix C.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from keras_ema.checks import is_int
from keras_ema.schedule import check_sigma_rel
from keras_ema.schedule import sigma_rel_to_gamma


def solve_coefficients(
    in_steps: Sequence[int],
    in_sigma_rels: Sequence[float],
    out_step: int,
    out_sigma_rel: float,
) -> np.ndarray:
    """Coefficients that mix power-function EMA snapshots into another one.

    The EMA of relative width `out_sigma_rel` at step `out_step` is
    approximately `sum_i x[i] * snapshot_i`, where snapshot `i` is the EMA of
    relative width `in_sigma_rels[i]` at step `in_steps[i]`. Only snapshots
    at or before `out_step` take part (the others get 0); the coefficients
    minimise the L2 distance between the averaging profiles and are then
    normalised to sum to 1. Computed in float64.

    Example:

    >>> steps = [s for s in range(4096, 32769, 4096) for _ in range(2)]
    >>> x = solve_coefficients(steps, [0.05, 0.10] * 8, 32768, 0.07)
    >>> round(float(x.sum()), 12)
    1.0

    Args:
        in_steps: The step of each snapshot, positive integers (a NumPy
            float array of integral values, as EDM2 passes them, too).
        in_sigma_rels: The `sigma_rel` of each snapshot, in
            `(0, 12**-0.5)`.
        out_step: The step of the target, a positive integer.
        out_sigma_rel: The `sigma_rel` of the target, in `(0, 12**-0.5)`.

    Returns:
        A float64 array with one coefficient per snapshot, in input order.

    References:
        - Karras et al., 2024, "Analyzing and Improving the Training Dynamics
          of Diffusion Models", appendix C.3 (Algorithm 3).
    """
    return _solve(in_steps, in_sigma_rels, out_step, out_sigma_rel).coefficients


def reconstruction_error(
    in_steps: Sequence[int],
    in_sigma_rels: Sequence[float],
    out_step: int,
    out_sigma_rel: float,
) -> float:
    """The relative L2 error of the profile that `solve_coefficients` builds.

    With the normalised coefficients `x`, the target profile `p`, and `A`,
    `b` as in `solve_coefficients`, it is
    `sqrt((<p, p> - 2 x.b + x.A x) / <p, p>)`: the distance between the
    synthesized averaging profile and the exact one, relative to the exact
    one. For any weights `theta(tau)`, the synthesized EMA differs from the
    exact one by at most this error times `||p||` times the L2 norm of
    `theta` over training (Cauchy-Schwarz).

    Example:

    >>> steps = [s for s in range(4096, 32769, 4096) for _ in range(2)]
    >>> error = reconstruction_error(steps, [0.05, 0.10] * 8, 32768, 0.07)

    Args:
        in_steps: The step of each snapshot, positive integers (a NumPy
            float array of integral values too).
        in_sigma_rels: The `sigma_rel` of each snapshot, in
            `(0, 12**-0.5)`.
        out_step: The step of the target, a positive integer.
        out_sigma_rel: The `sigma_rel` of the target, in `(0, 12**-0.5)`.

    Returns:
        The relative error, a float >= 0.
    """
    return _solve(in_steps, in_sigma_rels, out_step, out_sigma_rel).error


@dataclasses.dataclass(frozen=True)
class _Solution:
    coefficients: np.ndarray
    error: float


def _solve(in_steps, in_sigma_rels, out_step, out_sigma_rel) -> _Solution:
    steps = _steps("in_steps", in_steps)
    gammas = _gammas("in_sigma_rels", in_sigma_rels)
    if len(steps) != len(gammas):
        raise ValueError(
            "`in_steps` and `in_sigma_rels` must have the same length. "
            f"Received: len(in_steps)={len(steps)}, "
            f"len(in_sigma_rels)={len(gammas)}"
        )
    if not is_int(out_step) or out_step < 1:
        raise ValueError(
            f"`out_step` must be a positive integer. Received: out_step={out_step!r}"
        )
    check_sigma_rel("out_sigma_rel", out_sigma_rel)
    used = steps <= out_step
    if not used.any():
        raise ValueError(
            "`out_step` must not precede every snapshot: no snapshot is at or "
            f"before it. Received: out_step={out_step!r}, earliest snapshot "
            f"step={int(steps.min())}"
        )
    t = steps[used].astype(np.float64)
    g = gammas[used]
    t_out = np.float64(out_step)
    g_out = np.float64(sigma_rel_to_gamma(float(out_sigma_rel)))
    a = _inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = _inner(t, g, t_out, g_out)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    x = x / x.sum()
    norm = (g_out + 1) ** 2 / ((2 * g_out + 1) * t_out)
    squared = (norm - 2 * x @ b + x @ a @ x) / norm
    coefficients = np.zeros(len(steps))
    coefficients[used] = x
    # Rounding can take an exact reconstruction a hair below zero.
    return _Solution(coefficients, float(np.sqrt(max(squared, 0.0))))


def _inner(t_a, g_a, t_b, g_b):
    """`<p_a, p_b>` of two power-function profiles, as a ratio of times."""
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, g_b, -g_a)
    return (
        (g_a + 1)
        * (g_b + 1)
        * ratio**exponent
        / ((g_a + g_b + 1) * np.maximum(t_a, t_b))
    )


def _steps(name: str, values) -> np.ndarray:
    # EDM2 passes its steps as a float array (`np.repeat(steps, 2) * 1.0`):
    # a NumPy float array holding integral values is taken as integers.
    floats = isinstance(values, np.ndarray) and values.dtype.kind == "f"
    values = list(values) if not isinstance(values, np.ndarray) else values.tolist()
    if not values:
        raise ValueError(f"`{name}` must not be empty. Received: {name}={values!r}")
    for index, value in enumerate(values):
        integral = is_int(value) or (
            floats and math.isfinite(value) and value.is_integer()
        )
        if not integral or value < 1:
            raise ValueError(
                f"`{name}` must hold positive integers. "
                f"Received: {name}[{index}]={value!r}"
            )
    return np.array([int(v) for v in values], dtype=np.int64)


def _gammas(name: str, values) -> np.ndarray:
    values = list(values) if not isinstance(values, np.ndarray) else values.tolist()
    for index, value in enumerate(values):
        check_sigma_rel(f"{name}[{index}]", value)
    return np.array([sigma_rel_to_gamma(float(v)) for v in values], np.float64)
