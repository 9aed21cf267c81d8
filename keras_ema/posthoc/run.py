"""`PostHocRun`: a folder of post-hoc EMA snapshots, from which it
synthesizes the EMA of any relative width `sigma_rel` after training
(Karras et al. 2024, EDM2). Everything here runs on the host with NumPy;
putting the weights into a model is `keras_ema.posthoc.model_weights`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

from keras_ema.checks import is_int
from keras_ema.posthoc import reader
from keras_ema.posthoc.coefficients import reconstruction_error
from keras_ema.posthoc.coefficients import solve_coefficients
from keras_ema.posthoc.folder import read_run
from keras_ema.posthoc.model_weights import holding
from keras_ema.posthoc.model_weights import pair_with_model
from keras_ema.posthoc.sweep import SweepResult
from keras_ema.posthoc.sweep import check_evaluate
from keras_ema.posthoc.sweep import check_mode
from keras_ema.posthoc.sweep import checked_targets
from keras_ema.posthoc.sweep import plot_scores
from keras_ema.posthoc.sweep import scores_of
from keras_ema.posthoc.writer import wait_for_folder
from keras_ema.schedule import check_sigma_rel


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
    backend state. Constructing it first waits for the snapshots that a
    `PostHocEMA` of this process handed to its background writer for this
    directory (a custom loop may call `update()` and then open the run),
    then lists the directory and checks every
    file's header and layout; the arrays are read, and their checksums
    checked, when synthesizing. Every file that cannot be used raises a
    `ValueError` naming it, as does a file of another run, another model or
    other tracked `sigma_rel`s.

    Example:

    >>> run = keras_ema.PostHocRun("snapshots")  # written by PostHocEMA
    >>> run.sigma_rels
    (0.05, 0.1)
    >>> weights = run.synthesize(0.07)  # path -> numpy array
    >>> run.synthesize_into(model, 0.07)
    >>> with run.swap_weights(model, 0.07):  # the model's own weights after
    ...     loss = model.evaluate(x_val, y_val, verbose=0, return_dict=True)
    >>> def val_loss(weights):  # `model` holds `weights` during the call
    ...     return model.evaluate(x_val, y_val, verbose=0, return_dict=True)["loss"]
    >>> result = run.sweep([0.03, 0.05, 0.07, 0.1, 0.15], val_loss, model=model)
    >>> ax = run.plot(result.sigma_rels, result.scores)
    >>> result.best in result.sigma_rels
    True

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
        # A run opened by the process writing the folder (a custom loop's
        # `update()` just handed a snapshot over) sees that snapshot too.
        wait_for_folder(self.directory)
        self._files = read_run(self.directory)
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

        The snapshot variables are paired with the model's by position, as
        Keras' `.weights.h5` files and `load_state` pair weights: the
        averaged ones with the model's trainable floating-point variables,
        the others (buffers) with the model's other variables, each in
        `model.weights` order (integer variables the snapshots lack, such as
        seed-generator states, are left as they are). Each pair must name
        the same weight up to Keras' `_<n>` numbering of names and a leading
        model name, so the same architecture built again in one process
        fits, with the same shape. Otherwise a `ValueError` says what
        differs (the variable, and its path, shape or dtype in the model and
        in the snapshots), and nothing is assigned.

        Example:

        >>> run = keras_ema.PostHocRun("snapshots")
        >>> run.synthesize_into(model, 0.07)

        Args:
            model: A built Keras model with the architecture of the run.
            sigma_rel: The target `sigma_rel`, in `(0, 12**-0.5)`.
            step: A snapshot step. Defaults to `None`: the last one.
        """
        pairs = pair_with_model(self._variables, model, self.directory)
        weights = self.synthesize(sigma_rel, step)
        for path, variable in pairs:
            variable.assign(weights[path])

    @contextlib.contextmanager
    def swap_weights(
        self, model, sigma_rel: float, step: int | None = None
    ) -> Iterator:
        """A context with the EMA of relative width `sigma_rel` in a model.

        On entry the synthesized weights are assigned as `synthesize_into`
        assigns them; on exit, also through an exception, the model gets its
        own weights back, bit for bit. For scoring several `sigma_rel`s,
        `sweep(..., model=model)` does the same for each, reading each file
        once.

        Example:

        >>> run = keras_ema.PostHocRun("snapshots")
        >>> with run.swap_weights(model, 0.07):
        ...     loss = model.evaluate(x_val, y_val, verbose=0, return_dict=True)
        >>> sorted(loss)
        ['loss', 'mae']

        Args:
            model: A built Keras model with the architecture of the run.
            sigma_rel: The target `sigma_rel`, in `(0, 12**-0.5)`.
            step: A snapshot step. Defaults to `None`: the last one.

        Yields:
            `model`, holding the synthesized weights.
        """
        pairs = pair_with_model(self._variables, model, self.directory)
        weights = self.synthesize(sigma_rel, step)
        with holding(pairs, weights):
            yield model

    def sweep(
        self,
        sigma_rels: Iterable[float],
        evaluate: Callable[[dict], float],
        step: int | None = None,
        mode: str = "min",
        model=None,
    ) -> SweepResult:
        """Scores the EMAs of several `sigma_rel`s, reading each file once.

        All targets are synthesized in one pass over the files (memory: one
        float64 copy of the averaged weights per target), then
        `evaluate(weights)` scores each, with `weights` as `synthesize`
        returns it. With `model`, the model holds each target's weights
        while `evaluate` scores them (paired as `synthesize_into` pairs
        them) and gets its own weights back, bit for bit, after each score,
        also through an exception. A NaN score warns, naming its
        `sigma_rel`; `best` leaves it out.

        Example:

        >>> run = keras_ema.PostHocRun("snapshots")
        >>> def val_loss(weights):  # `model` holds `weights` during the call
        ...     return model.evaluate(x_val, y_val, verbose=0, return_dict=True)["loss"]
        >>> result = run.sweep(np.linspace(0.03, 0.2, 18), val_loss, model=model)
        >>> len(result.scores)
        18

        Args:
            sigma_rels: The target `sigma_rel`s, each in `(0, 12**-0.5)`.
            evaluate: A function of a weights dict returning a number.
            step: A snapshot step. Defaults to `None`: the last one.
            mode: `"min"` if the lowest score is best, `"max"` if the
                highest is. Defaults to `"min"`.
            model: A built Keras model with the architecture of the run, to
                hold each target's weights while `evaluate` runs, or `None`
                to leave every model alone. Defaults to `None`.

        Returns:
            A `SweepResult` with `sigma_rels`, `scores` and `best`.
        """
        targets = checked_targets(sigma_rels)
        check_evaluate(evaluate)
        check_mode(mode)
        step = self._check_step(step)
        hold = None
        if model is not None:
            pairs = pair_with_model(self._variables, model, self.directory)

            def hold(weights):
                return holding(pairs, weights)

        weights = self._synthesize_all(targets, step)
        scores = scores_of(targets, weights, evaluate, hold)
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

        >>> run = keras_ema.PostHocRun("snapshots")
        >>> ax = run.plot([0.05, 0.07, 0.1], [0.31, 0.29, 0.30])
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
        return plot_scores(
            sigma_rels, scores, self.sigma_rels, ax=ax, mode=mode, label=label
        )

    # ------------------------------------------------------------------

    def _check_step(self, step) -> int:
        if step is None:
            return self._files[-1].step
        if not is_int(step) or step not in self.steps:
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
            reader.reading(file.path),
            reader.open_archive(file.path) as archive,
        ):
            if reader.checked_header(archive) != file.header:
                raise ValueError("it changed since the directory was listed")
            for index, spec in enumerate(file.header["variables"]):
                path = spec["path"]
                if spec["kind"] == "buffer":
                    if buffers is not None:
                        buffers[path] = reader.read_buffer(archive, file.header, index)
                    continue
                for profile in range(mix.shape[0]):
                    value = reader.read_averaged(
                        archive, file.header, index, profile
                    ).astype(np.float64)
                    for target_sums, weight in zip(sums, mix[profile], strict=True):
                        if path in target_sums:
                            target_sums[path] += weight * value
                        else:
                            target_sums[path] = weight * value
