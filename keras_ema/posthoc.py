"""Post-hoc EMA: snapshots of power-function EMAs, and the EMA of any length
synthesized from them after training (Karras et al. 2024, EDM2).

During training a few power-function EMAs (EDM2: `sigma_rel` 0.05 and 0.10)
are tracked and saved together every so often, one snapshot file per step.
Afterwards `PostHocRun` mixes the snapshots linearly into the EMA of any other
relative width `sigma_rel`, at any snapshot step. Everything here runs on the
host with NumPy; the math is in float64.

The math. The power-function EMA at time `t` weights the past weights by
`p(tau) = (g + 1) / t * (tau / t) ** g` on `[0, t]`, `g = gamma`. The target
profile `p_r` (time `t_r`, `sigma_rel_r`) is approximated by `sum_i x_i p_i`
over the snapshots with `t_i <= t_r`, least squares in L2:
`A[i, j] = <p_i, p_j>`, `b[i] = <p_i, p_r>`, `x = lstsq(A, b)`, then
`x /= sum(x)` so that a constant weight stays constant. The inner products
have a closed form, computed as a ratio `(t_a / t_b) ** gamma` (never
`t ** gamma`, which overflows). `A` is badly conditioned (its condition
number grows like the fourth power of the number of snapshots), hence float64
and a least-squares solve.

The snapshot files (one `.npz` per step, JSON header, no pickle) are
described in `keras_ema.snapshot_io`; `write_snapshot`, `read_snapshot` and
`model_fingerprint` are re-exported here.

References:
    - Karras et al., 2024, "Analyzing and Improving the Training Dynamics of
      Diffusion Models", section 3 and appendix C.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence

import numpy as np

from keras_ema import snapshot_io
from keras_ema.schedule import _is_int
from keras_ema.schedule import check_sigma_rel
from keras_ema.schedule import gamma_to_sigma_rel
from keras_ema.schedule import sigma_rel_to_gamma
from keras_ema.snapshot_io import Snapshot
from keras_ema.snapshot_io import model_fingerprint
from keras_ema.snapshot_io import read_snapshot
from keras_ema.snapshot_io import snapshot_filename
from keras_ema.snapshot_io import write_snapshot
from keras_ema.state_io import _same_weight

__all__ = [
    "PostHocRun",
    "Snapshot",
    "SweepResult",
    "gamma_to_sigma_rel",
    "model_fingerprint",
    "read_snapshot",
    "reconstruction_error",
    "sigma_rel_to_gamma",
    "snapshot_filename",
    "solve_coefficients",
    "write_snapshot",
]


# ----------------------------------------------------------------------------
# The math


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
        in_steps: The step of each snapshot, positive integers.
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
        in_steps: The step of each snapshot, positive integers.
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
    if not _is_int(out_step) or out_step < 1:
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
    values = list(values) if not isinstance(values, np.ndarray) else values.tolist()
    if not values:
        raise ValueError(f"`{name}` must not be empty. Received: {name}={values!r}")
    for index, value in enumerate(values):
        if not _is_int(value) or value < 1:
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


# ----------------------------------------------------------------------------
# Synthesis


@dataclasses.dataclass(frozen=True)
class _File:
    path: str
    step: int
    header: dict


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Scores of synthesized EMAs, as returned by `PostHocRun.sweep`.

    Attributes:
        sigma_rels: The targets, in the order given.
        scores: The score of each target.
        mode: `"min"` or `"max"`: which score is best.
        step: The snapshot step synthesized.
    """

    sigma_rels: tuple
    scores: tuple
    mode: str
    step: int

    @property
    def best(self) -> float | None:
        """The `sigma_rel` of the best score (`None` if every score is NaN)."""
        index = _best_index(self.scores, self.mode)
        return None if index is None else self.sigma_rels[index]

    @property
    def best_score(self) -> float | None:
        index = _best_index(self.scores, self.mode)
        return None if index is None else self.scores[index]


def _best_index(scores, mode) -> int | None:
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).all():
        return None
    return int(np.nanargmin(scores) if mode == "min" else np.nanargmax(scores))


class PostHocRun:
    """A directory of post-hoc EMA snapshots, synthesizing EMAs of any length.

    The snapshots hold power-function EMAs of a few relative widths
    `sigma_rel` (the tracked ones), saved at several steps of one training
    run. `synthesize` mixes them into the EMA of another `sigma_rel` at any
    snapshot step: a least-squares fit of the averaging profiles, in float64
    (Karras et al. 2024, EDM2). Targets between the smallest and the largest
    tracked `sigma_rel` are reconstructed best; outside that range a warning
    (once per target) gives the reconstruction error. More snapshots, evenly
    spaced over training, make the synthesis more accurate (the squared error
    falls like the fourth power of their number).

    Averaged variables come back as float32 arrays, whatever the model's
    dtype (the arithmetic is float64). Buffers (non-trainable variables such
    as BatchNormalization statistics) come back as stored at the step
    synthesized, never mixed, in their own dtype (bfloat16 ones as float32).

    The run needs no model: it reads the files with NumPy and uses no Keras
    backend state. Constructing it lists the directory and checks every
    file's header and layout; the arrays are read, and their checksums
    checked, when synthesizing. Every file that cannot be used raises a
    `ValueError` naming it, as does a file of another run, another model or
    other tracked `sigma_rel`s.

    Example:

    >>> run = keras_ema.PostHocRun("snapshots")
    >>> run.steps[-1], run.sigma_rels
    (100000, (0.05, 0.1))
    >>> weights = run.synthesize(0.07)  # path -> numpy array
    >>> run.synthesize_into(model, 0.07)
    >>> result = run.sweep([0.03, 0.05, 0.07, 0.1, 0.15], evaluate=my_loss)
    >>> run.plot(result.sigma_rels, result.scores)
    >>> result.best
    0.07

    Args:
        directory: The folder written during training, holding one
            `snapshot-<step>.npz` file per snapshot. Other files are
            ignored.

    References:
        - Karras et al., 2024, "Analyzing and Improving the Training Dynamics
          of Diffusion Models", section 3 and appendix C.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise ValueError(
                "`directory` must be an existing folder of post-hoc EMA "
                f"snapshots. Received: directory={self.directory!r}"
            )
        self._files = self._list_files()
        reference = self._files[0]
        for file in self._files[1:]:
            _check_same_run(file, reference)
        header = self._files[-1].header
        self._variables = header["variables"]
        self._warned = set()

    def __repr__(self) -> str:
        steps = self.steps
        return (
            f"PostHocRun({self.directory!r}, {len(steps)} snapshots from step "
            f"{steps[0]} to {steps[-1]}, sigma_rels={self.sigma_rels})"
        )

    @property
    def steps(self) -> list[int]:
        """The steps of the snapshots, in increasing order."""
        return [file.step for file in self._files]

    @property
    def sigma_rels(self) -> tuple[float, ...]:
        """The tracked `sigma_rel`s, in the order the files store them."""
        return tuple(self._files[0].header["sigma_rels"])

    @property
    def run_id(self) -> str:
        return self._files[0].header["run_id"]

    @property
    def fingerprint(self) -> str:
        return self._files[0].header["fingerprint"]

    @property
    def update_every(self) -> int:
        """`update_every` of the latest snapshot (metadata only: the
        snapshot times are their steps)."""
        return self._files[-1].header["update_every"]

    @property
    def paths(self) -> list[str]:
        """The path of every variable in the snapshots, averaged or buffer."""
        return [spec["path"] for spec in self._variables]

    def coefficients(self, sigma_rel: float, step: int | None = None) -> np.ndarray:
        """The mix that synthesizes `sigma_rel` at `step`.

        Args:
            sigma_rel: The target `sigma_rel`, in `(0, 12**-0.5)`.
            step: A snapshot step. Defaults to `None`: the last one.

        Returns:
            A float64 array of shape `(len(steps), len(sigma_rels))`: the
            weight of each tracked profile in each snapshot (0 after `step`).
        """
        step = self._check_step(step)
        check_sigma_rel("sigma_rel", sigma_rel)
        in_steps, in_sigma_rels = self._inputs(step)
        x = solve_coefficients(in_steps, in_sigma_rels, step, sigma_rel)
        full = np.zeros((len(self._files), len(self.sigma_rels)))
        full[: len(x) // len(self.sigma_rels)] = x.reshape(-1, len(self.sigma_rels))
        return full

    def reconstruction_error(self, sigma_rel: float, step: int | None = None) -> float:
        """The relative L2 error of the synthesized averaging profile.

        It is `sqrt((<p, p> - 2 x.b + x.A x) / <p, p>)` for the target
        profile `p` and the normalised coefficients `x` (see
        `keras_ema.posthoc.reconstruction_error`).

        Args:
            sigma_rel: The target `sigma_rel`, in `(0, 12**-0.5)`.
            step: A snapshot step. Defaults to `None`: the last one.
        """
        step = self._check_step(step)
        check_sigma_rel("sigma_rel", sigma_rel)
        return reconstruction_error(*self._inputs(step), step, sigma_rel)

    def synthesize(self, sigma_rel: float, step: int | None = None) -> dict:
        """The EMA of relative width `sigma_rel` at `step`.

        Args:
            sigma_rel: The target `sigma_rel`, in `(0, 12**-0.5)`.
            step: A snapshot step. Defaults to `None`: the last one.

        Returns:
            A dict from variable path to NumPy array: averaged variables in
            float32, buffers as stored at `step`.
        """
        check_sigma_rel("sigma_rel", sigma_rel)
        step = self._check_step(step)
        return next(self._synthesize_all([sigma_rel], step))

    def synthesize_into(self, model, sigma_rel: float, step: int | None = None) -> None:
        """Assigns the EMA of relative width `sigma_rel` to a Keras model.

        Variables are matched by path, up to a leading model name (as
        `keras.models.load_model` may add or drop it). Every variable of the
        snapshots must be in the model with the same shape, and every
        floating-point variable of the model in the snapshots; otherwise a
        `ValueError` names the variable and nothing is assigned.

        Args:
            model: A built Keras model with the architecture of the run.
            sigma_rel: The target `sigma_rel`, in `(0, 12**-0.5)`.
            step: A snapshot step. Defaults to `None`: the last one.
        """
        pairs = self._match(model)
        weights = self.synthesize(sigma_rel, step)
        for path, variable in pairs:
            variable.assign(weights[path])

    def sweep(
        self,
        sigma_rels: Iterable[float],
        evaluate: Callable[[dict], float],
        step: int | None = None,
        mode: str = "min",
    ) -> SweepResult:
        """Scores the EMAs of several `sigma_rel`s, reading each file once.

        All targets are synthesized in one pass over the files (memory: one
        float64 copy of the averaged weights per target), then
        `evaluate(weights)` scores each, with `weights` as `synthesize`
        returns it.

        Example:

        >>> def evaluate(weights):
        ...     for variable in model.weights:
        ...         variable.assign(weights[variable.path])
        ...     return model.evaluate(x_val, y_val, verbose=0)[0]
        >>> result = run.sweep(np.linspace(0.03, 0.2, 18), evaluate)
        >>> result.best

        Args:
            sigma_rels: The target `sigma_rel`s, each in `(0, 12**-0.5)`.
            evaluate: A function of a weights dict returning a number.
            step: A snapshot step. Defaults to `None`: the last one.
            mode: `"min"` if the lowest score is best, `"max"` if the
                highest is. Defaults to `"min"`.

        Returns:
            A `SweepResult` with `sigma_rels`, `scores` and `best`.
        """
        targets = _targets(sigma_rels)
        if not callable(evaluate):
            raise ValueError(
                f"`evaluate` must be callable. Received: evaluate={evaluate!r}"
            )
        _check_mode(mode)
        step = self._check_step(step)
        scores = []
        for target, weights in zip(
            targets, self._synthesize_all(targets, step), strict=True
        ):
            score = evaluate(weights)
            try:
                if isinstance(score, (str, bytes)):
                    raise TypeError
                scores.append(float(score))
            except (TypeError, ValueError):
                raise ValueError(
                    "`evaluate` must return a number. Received: "
                    f"{score!r} for sigma_rel={target!r}"
                ) from None
        return SweepResult(tuple(targets), tuple(scores), mode, step)

    def plot(
        self,
        sigma_rels: Sequence[float],
        scores: Sequence[float],
        ax=None,
        mode: str = "min",
        label: str | None = None,
    ):
        """Draws scores against `sigma_rel`, marking the tracked ones and the
        best.

        Needs matplotlib (imported only here).

        Example:

        >>> result = run.sweep(np.linspace(0.03, 0.2, 18), evaluate)
        >>> ax = run.plot(result.sigma_rels, result.scores)
        >>> ax.figure.savefig("sweep.png")

        Args:
            sigma_rels: The targets.
            scores: Their scores.
            ax: A matplotlib `Axes`. Defaults to `None`: a new figure.
            mode: `"min"` if the lowest score is best, `"max"` if the
                highest is. Defaults to `"min"`.
            label: The legend entry of the curve. Defaults to `None`:
                `"score"`.

        Returns:
            The `Axes`.
        """
        sigma_rels = np.asarray(sigma_rels, dtype=np.float64)
        scores = np.asarray(scores, dtype=np.float64)
        if sigma_rels.ndim != 1 or sigma_rels.shape != scores.shape:
            raise ValueError(
                "`sigma_rels` and `scores` must be 1-D and of the same length. "
                f"Received: shapes {sigma_rels.shape} and {scores.shape}"
            )
        _check_mode(mode)
        if ax is None:
            try:
                import matplotlib.pyplot as plt
            except ImportError as error:
                raise ImportError(
                    "`PostHocRun.plot` needs matplotlib: `pip install matplotlib`."
                ) from error
            _, ax = plt.subplots()
        order = np.argsort(sigma_rels)
        ax.plot(sigma_rels[order], scores[order], marker="o", label=label or "score")
        for index, tracked in enumerate(self.sigma_rels):
            ax.axvline(
                tracked,
                color="0.5",
                linestyle="--",
                linewidth=1,
                label="tracked sigma_rel" if index == 0 else None,
            )
        best = _best_index(scores, mode)
        if best is not None:
            ax.plot(
                sigma_rels[best],
                scores[best],
                marker="*",
                markersize=14,
                linestyle="none",
                color="C3",
                label=f"best: sigma_rel={sigma_rels[best]:.4g}",
            )
        ax.set_xlabel("sigma_rel")
        ax.set_ylabel("score")
        ax.legend()
        return ax

    # ------------------------------------------------------------------

    def _list_files(self) -> list:
        files = []
        for name in sorted(os.listdir(self.directory)):
            if not (name.startswith("snapshot-") and name.endswith(".npz")):
                continue
            path = os.path.join(self.directory, name)
            match = snapshot_io.NAME_PATTERN.fullmatch(name)
            if not match or snapshot_filename(int(match.group(1))) != name:
                raise ValueError(
                    f"{path!r} is not a valid keras_ema post-hoc EMA snapshot: "
                    "its name is not `snapshot-<step, 12 digits>.npz`."
                )
            header = snapshot_io.read_header(path)
            if header["step"] != int(match.group(1)):
                raise ValueError(
                    f"{path!r} is not a valid keras_ema post-hoc EMA snapshot: "
                    f"its header holds step {header['step']}, its name step "
                    f"{int(match.group(1))}."
                )
            files.append(_File(path, header["step"], header))
        if not files:
            raise ValueError(
                "`directory` must hold post-hoc EMA snapshots "
                f"(`snapshot-<step>.npz` files). Received: "
                f"directory={self.directory!r}, which holds none"
            )
        return sorted(files, key=lambda file: file.step)

    def _check_step(self, step) -> int:
        if step is None:
            return self._files[-1].step
        if not _is_int(step) or step not in self.steps:
            steps = self.steps
            shown = steps if len(steps) <= 6 else [*steps[:3], "...", *steps[-3:]]
            raise ValueError(
                f"`step` must be one of the snapshot steps {shown}. "
                f"Received: step={step!r}"
            )
        return int(step)

    def _inputs(self, step) -> tuple[list, list]:
        in_steps, in_sigma_rels = [], []
        for file in self._files:
            if file.step <= step:
                in_steps += [file.step] * len(self.sigma_rels)
                in_sigma_rels += list(self.sigma_rels)
        return in_steps, in_sigma_rels

    def _warn_outside_range(self, targets, step) -> None:
        low, high = min(self.sigma_rels), max(self.sigma_rels)
        for target in targets:
            if low <= target <= high or target in self._warned:
                continue
            self._warned.add(target)
            error = self.reconstruction_error(target, step)
            warnings.warn(
                f"sigma_rel={target!r} is outside the tracked range "
                f"[{low:g}, {high:g}]: its synthesized averaging profile has a "
                f"relative L2 error of {error:.3g} at step {step}. More "
                "snapshots, or tracking a wider range, reduce it.",
                stacklevel=4,
            )

    def _synthesize_all(self, targets, step):
        """Yields the weights of each target, after one pass over the files."""
        self._warn_outside_range(targets, step)
        profiles = len(self.sigma_rels)
        in_steps, in_sigma_rels = self._inputs(step)
        mixes = np.stack(
            [solve_coefficients(in_steps, in_sigma_rels, step, t) for t in targets],
            axis=-1,
        ).reshape(-1, profiles, len(targets))
        files = [file for file in self._files if file.step <= step]
        sums = [{} for _ in targets]
        buffers = {}
        for file, mix in zip(files, mixes, strict=True):
            self._accumulate(file, mix, sums, buffers if file.step == step else None)
        for target_sums in sums:
            weights = {}
            for spec in self._variables:
                path = spec["path"]
                if spec["kind"] == "averaged":
                    weights[path] = target_sums.pop(path).astype(np.float32)
                else:
                    weights[path] = buffers[path].copy()
            yield weights

    def _accumulate(self, file, mix, sums, buffers) -> None:
        """Adds one file's averaged values, weighted, to every target's sums
        (and reads its buffers if `buffers` is a dict)."""
        with (
            snapshot_io.reading(file.path),
            snapshot_io.open_archive(file.path) as archive,
        ):
            if snapshot_io.checked_header(archive) != file.header:
                raise ValueError("it changed since the directory was listed")
            for index, spec in enumerate(file.header["variables"]):
                path = spec["path"]
                if spec["kind"] == "buffer":
                    if buffers is not None:
                        buffers[path] = snapshot_io.read_buffer(
                            archive, file.header, index
                        )
                    continue
                for profile in range(mix.shape[0]):
                    value = snapshot_io.read_averaged(
                        archive, file.header, index, profile
                    ).astype(np.float64)
                    for target_sums, weight in zip(sums, mix[profile], strict=True):
                        if path in target_sums:
                            target_sums[path] += weight * value
                        else:
                            target_sums[path] = weight * value

    def _match(self, model) -> list:
        """Pairs each variable of the run with the model's; raises, naming
        the variable, on any mismatch."""
        variables = list(model.weights)
        pairs, used = [], set()
        for spec in self._variables:
            path = spec["path"]
            exact = [v for v in variables if v.path == path]
            found = exact or [v for v in variables if _same_weight(path, v.path)]
            if len(found) != 1:
                problem = "no variable" if not found else "several variables"
                raise ValueError(
                    f"`model` does not fit the snapshots in {self.directory!r}: it "
                    f"has {problem} matching {path!r}."
                )
            (variable,) = found
            if id(variable) in used:
                raise ValueError(
                    f"`model` does not fit the snapshots in {self.directory!r}: "
                    f"its variable {variable.path!r} matches several snapshot "
                    "variables."
                )
            used.add(id(variable))
            if tuple(variable.shape) != tuple(spec["shape"]):
                raise ValueError(
                    f"`model` does not fit the snapshots in {self.directory!r}: "
                    f"variable {variable.path!r} has shape {tuple(variable.shape)} "
                    f"but the snapshots hold {tuple(spec['shape'])}."
                )
            pairs.append((path, variable))
        missing = [
            v.path
            for v in variables
            if id(v) not in used and "float" in snapshot_io.dtype_name(v.dtype)
        ]
        if missing:
            raise ValueError(
                f"`model` does not fit the snapshots in {self.directory!r}: its "
                f"variables {missing[:10]} are not in the snapshots."
            )
        return pairs


def _check_same_run(file: _File, reference: _File) -> None:
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


def _targets(sigma_rels) -> list:
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Iterable):
        raise ValueError(
            "`sigma_rels` must be a sequence of numbers. "
            f"Received: sigma_rels={sigma_rels!r}"
        )
    targets = [s.item() if isinstance(s, np.generic) else s for s in sigma_rels]
    if not targets:
        raise ValueError("`sigma_rels` must not be empty. Received: sigma_rels=[]")
    for index, target in enumerate(targets):
        check_sigma_rel(f"sigma_rels[{index}]", target)
    return targets


def _check_mode(mode) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` must be 'min' or 'max'. Received: mode={mode!r}")
