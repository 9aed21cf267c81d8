"""Online weights vs. EMA weights on a small synthetic regression task.

A Keras 3 version of the experiment in sections 3-4 of the article this
library follows: an MLP trained on ``make_regression`` data with Adam, while
``keras_ema.EMA`` keeps an exponential moving average of its weights. The
learning-rate schedule and early stopping both watch the EMA validation loss
(``val_ema_loss``), as in the article. After training, the online and the EMA
weights are scored on the validation set with scikit-learn.

The script only uses ``keras`` and ``keras.ops``, so it runs on every Keras
backend::

    KERAS_BACKEND=jax python examples/regression.py --seeds 0 1 2 --out results/

It prints the article's tables (progress every 10 epochs, final comparison,
mean over seeds) and writes ``results.json`` (final scores and per-epoch
histories) and ``training_curves.png`` to the output folder.

With ``--profiles`` the same run keeps four averages of the weights in one
callback (``keras_ema.EMA(profiles=...)``): the article's warm-up EMA, the
bias-corrected EMA of the article's section 2.2 at the same beta, and the
power-function EMAs of Karras et al. (2024) at ``sigma_rel`` 0.05 and 0.10.
The learning-rate schedule and early stopping watch the warm-up profile
(``val_ema_warmup_loss``), so training is the same as without the option;
every profile is scored and drawn. It writes ``profiles.json`` and
``profile_curves.png``.

Where Keras and PyTorch differ, the settings below follow the article's
PyTorch behaviour:

* ``weight_decay=1e-5`` in ``torch.optim.Adam`` is an L2 term added to the
  gradient of every parameter before the moment estimates, not Keras'
  decoupled weight decay; ``CoupledL2Adam`` does exactly that.
* ``nn.init.xavier_normal_`` samples an untruncated normal, while Keras'
  ``glorot_normal`` truncates; the equivalent ``VarianceScaling`` is used.
* torch's ``ReduceLROnPlateau(patience=10)`` lowers the rate on the 11th
  epoch without a (relative 1e-4) improvement; Keras' lowers it on the
  ``patience``-th epoch and uses an absolute ``min_delta`` (1e-4 by default,
  2% of a 0.005 loss). Hence ``patience=11, min_delta=0`` here.
* torch's Adam uses ``eps=1e-8`` (Keras: 1e-7).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers
from keras import ops
from sklearn.datasets import make_regression
from sklearn.metrics import mean_absolute_error
from sklearn.metrics import mean_squared_error
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import keras_ema

BATCH_SIZE = 32
LEARNING_RATE = 1e-3
L2 = 1e-5
EMA_KWARGS: dict[str, Any] = {
    "beta": 0.999,
    "update_after_step": 100,
    "update_every": 1,
    "power": 2 / 3,
}
LR_FACTOR = 0.5
LR_PATIENCE = 11  # = torch ReduceLROnPlateau(patience=10), see docstring
STOP_PATIENCE = 20
MONITOR = "val_ema_loss"
PROFILES: dict[str, keras_ema.Schedule] = {
    "warmup": keras_ema.WarmupSchedule(**EMA_KWARGS),
    "bias_corrected": keras_ema.BiasCorrectedSchedule(beta=EMA_KWARGS["beta"]),
    "power_0_05": keras_ema.PowerFunctionSchedule(sigma_rel=0.05),
    "power_0_10": keras_ema.PowerFunctionSchedule(sigma_rel=0.10),
}


@dataclass
class Data:
    """Standardized train/validation split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


@dataclass
class RunResult:
    """Everything one seed produces."""

    seed: int
    history: dict[str, list[float]]
    online: dict[str, float]
    ema: dict[str, float]
    seconds: float
    # With profiles: each profile's final scores (`ema` is the first's).
    profiles: dict[str, dict[str, float]] | None = None

    @property
    def epochs(self) -> int:
        return len(self.history["loss"])

    @property
    def ema_key(self) -> str:
        """The history key of the (first) EMA's validation loss."""
        return f"val_ema_{next(iter(PROFILES))}_loss" if self.profiles else MONITOR

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epochs": self.epochs,
            "online": self.online,
            "ema": self.ema,
            "val_loss_std": {
                "online": float(np.std(self.history["val_loss"])),
                "ema": float(np.std(self.history[self.ema_key])),
            },
            "seconds": round(self.seconds, 2),
            "profiles": self.profiles,
            "history": self.history,
        }


@keras.saving.register_keras_serializable(package="keras_ema_examples")
class CoupledL2Adam(keras.optimizers.Adam):
    """Adam with PyTorch-style L2 weight decay.

    ``torch.optim.Adam(weight_decay=wd)`` adds ``wd * param`` to the gradient
    of every parameter (kernels and biases) before updating the moments.
    Keras' ``weight_decay`` argument instead shrinks the weights directly
    (decoupled, AdamW-style), so it is left unset here.
    """

    def __init__(self, l2: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.l2 = l2

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if self.l2:
            gradient = ops.add(
                ops.cast(gradient, variable.dtype),
                ops.multiply(ops.cast(self.l2, variable.dtype), variable),
            )
        super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "l2": self.l2}


def load_data() -> Data:
    """The article's data: 2000 x 20, both X and y standardized, 80/20 split."""
    x, y = make_regression(n_samples=2000, n_features=20, noise=0.1, random_state=42)
    x = StandardScaler().fit_transform(x).astype("float32")
    y = StandardScaler().fit_transform(y.reshape(-1, 1)).astype("float32")
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, random_state=42
    )
    return Data(x_train, y_train, x_val, y_val)


def build_model(n_features: int) -> keras.Model:
    """20 -> 64 ReLU -> Dropout -> 32 ReLU -> Dropout -> 1, Xavier-normal."""

    def dense(units: int, activation: str | None = None) -> layers.Dense:
        # Untruncated Glorot normal, like torch.nn.init.xavier_normal_.
        init = keras.initializers.VarianceScaling(
            scale=1.0, mode="fan_avg", distribution="untruncated_normal"
        )
        return layers.Dense(
            units,
            activation=activation,
            kernel_initializer=init,
            bias_initializer="zeros",
        )

    return keras.Sequential(
        [
            keras.Input(shape=(n_features,)),
            dense(64, "relu"),
            layers.Dropout(0.2),
            dense(32, "relu"),
            layers.Dropout(0.2),
            dense(1),
        ],
        name="mlp",
    )


def train(data: Data, seed: int, epochs: int, profiles: bool = False) -> RunResult:
    """Train one model with EMA and score online and EMA weights (every
    profile's, with `profiles`)."""
    # Seeds Python, NumPy (fit's shuffling) and the backend (init, dropout).
    keras.utils.set_random_seed(seed)
    model = build_model(data.x_train.shape[1])
    model.compile(
        optimizer=CoupledL2Adam(l2=L2, learning_rate=LEARNING_RATE, epsilon=1e-8),
        loss="mse",
        metrics=["mae"],
    )
    ema = keras_ema.EMA(profiles=PROFILES) if profiles else keras_ema.EMA(**EMA_KWARGS)
    monitor = f"val_ema_{next(iter(PROFILES))}_loss" if profiles else MONITOR
    callbacks = [
        ema,
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor,
            mode="min",
            factor=LR_FACTOR,
            patience=LR_PATIENCE,
            min_delta=0.0,
        ),
        keras.callbacks.EarlyStopping(
            monitor=monitor, mode="min", patience=STOP_PATIENCE
        ),
    ]
    start = time.perf_counter()
    history = model.fit(
        data.x_train,
        data.y_train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=True,
        validation_data=(data.x_val, data.y_val),
        callbacks=callbacks,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    online_pred = model.predict(data.x_val, batch_size=BATCH_SIZE, verbose=0)
    ema_pred = model.predict(
        data.x_val, batch_size=BATCH_SIZE, verbose=0, callbacks=[ema]
    )
    scores = None
    if profiles:
        scores = {}
        for name in PROFILES:
            with ema.swap_weights(profile=name):
                pred = model.predict(data.x_val, batch_size=BATCH_SIZE, verbose=0)
            scores[name] = score(data.y_val, pred)
    return RunResult(
        seed=seed,
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        online=score(data.y_val, online_pred),
        ema=score(data.y_val, ema_pred),
        seconds=seconds,
        profiles=scores,
    )


def score(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Validation MSE, MAE and R^2 (scikit-learn)."""
    return {
        "mse": float(mean_squared_error(y_true, y_pred)),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "r2": float(r2_score(y_true, y_pred)),
    }


def r2_from_mse(mse: list[float], y_val: np.ndarray) -> np.ndarray:
    """R^2 from a validation MSE: 1 - MSE / Var(y_val), the r2_score formula."""
    return 1.0 - np.asarray(mse) / float(np.var(y_val))


def improvement(online: float, ema: float, higher_is_better: bool = False) -> float:
    """Relative gain of EMA over online, in percent (positive = EMA better)."""
    gain = ema - online if higher_is_better else online - ema
    return 100.0 * gain / abs(online)


def print_progress(result: RunResult, y_val: np.ndarray) -> None:
    """Every 10th epoch, as in the article's table 4.1."""
    h = result.history
    r2_online = r2_from_mse(h["val_loss"], y_val)
    r2_ema = r2_from_mse(h[result.ema_key], y_val)
    print(
        f"\n--- seed {result.seed}: stopped after {result.epochs} epochs "
        f"({result.seconds:.1f} s)"
    )
    print(
        f"{'Epoch':>5} | {'Train':>7} | {'Online val':>10} | {'Online R2':>9} | "
        f"{'EMA val':>7} | {'EMA R2':>6}"
    )
    for i in range(9, result.epochs, 10):
        print(
            f"{i + 1:>5} | {h['loss'][i]:7.4f} | {h['val_loss'][i]:10.4f} | "
            f"{r2_online[i]:9.4f} | {h[result.ema_key][i]:7.4f} | {r2_ema[i]:6.4f}"
        )


def print_comparison(
    online: dict[str, float], ema: dict[str, float], title: str
) -> None:
    """Online vs EMA with the relative improvement, as in table 4.3."""
    print(f"\n{title}")
    print(f"{'Metric':>6} | {'Online':>8} | {'EMA':>8} | {'Improvement':>11}")
    for name in ("mse", "mae", "r2"):
        gain = improvement(online[name], ema[name], higher_is_better=name == "r2")
        print(
            f"{name.upper():>6} | {online[name]:8.4f} | {ema[name]:8.4f} "
            f"| {gain:10.2f}%"
        )


def print_profiles(result: RunResult) -> None:
    """The final comparison for every profile of one seed."""
    for name, scores in (result.profiles or {}).items():
        print_comparison(
            result.online, scores, f"=== Final results, seed {result.seed}, {name} ==="
        )


def print_profile_summary(results: list[RunResult]) -> None:
    """Mean final scores over seeds, per profile, and its wins over online."""
    names = ("mse", "mae", "r2")
    print(f"\n=== Profiles, mean over {len(results)} seed(s) ===")
    print(
        f"{'profile':>15} | {'MSE':>8} | {'MAE':>8} | {'R2':>7} | "
        f"{'vs online MSE':>13} | {'wins':>5}"
    )
    online = {n: float(np.mean([r.online[n] for r in results])) for n in names}
    print(
        f"{'online':>15} | {online['mse']:8.5f} | {online['mae']:8.5f} | "
        f"{online['r2']:7.4f} | {'':>13} | {'':>5}"
    )
    for profile in PROFILES:
        mean = {
            n: float(np.mean([r.profiles[profile][n] for r in results])) for n in names
        }
        wins = sum(r.profiles[profile]["mse"] < r.online["mse"] for r in results)
        gain = improvement(online["mse"], mean["mse"])
        print(
            f"{profile:>15} | {mean['mse']:8.5f} | {mean['mae']:8.5f} | "
            f"{mean['r2']:7.4f} | {gain:12.2f}% | {wins:>2}/{len(results)}"
        )


def plot_profiles(results: list[RunResult], path: Path) -> None:
    """Every profile's validation loss, and the online one; one panel per
    seed (at most four)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = results[:4]
    fig, axes = plt.subplots(
        1, len(shown), figsize=(5 * len(shown), 4.5), squeeze=False
    )
    for ax, result in zip(axes[0], shown, strict=True):
        epochs = np.arange(1, result.epochs + 1)
        ax.plot(epochs, result.history["val_loss"], label="online", color="black")
        for name in PROFILES:
            ax.plot(epochs, result.history[f"val_ema_{name}_loss"], label=name)
        ax.set(
            xlabel="Epoch",
            ylabel="validation MSE",
            yscale="log",
            title=f"seed {result.seed}",
        )
        ax.grid(True)
        ax.legend()
    fig.suptitle(f"EMA profiles, Keras backend: {keras.backend.backend()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(results: list[RunResult]) -> None:
    """Mean over seeds, and on how many seeds EMA had the lower MSE."""

    def mean(kind: str, name: str) -> float:
        return float(np.mean([getattr(r, kind)[name] for r in results]))

    names = ("mse", "mae", "r2")
    print_comparison(
        {n: mean("online", n) for n in names},
        {n: mean("ema", n) for n in names},
        f"=== Mean over {len(results)} seed(s) ===",
    )
    wins = sum(r.ema["mse"] < r.online["mse"] for r in results)
    epochs = [r.epochs for r in results]
    print(
        f"EMA lower MSE on {wins} of {len(results)} seed(s); "
        f"epochs run {min(epochs)}-{max(epochs)}"
    )


def plot(results: list[RunResult], y_val: np.ndarray, path: Path) -> None:
    """Loss curves (left) and R^2 curves (right); the first seed is drawn solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_r2) = plt.subplots(1, 2, figsize=(15, 5))
    series = [
        (ax_loss, "loss", "Train loss", "tab:blue"),
        (ax_loss, "val_loss", "Online val loss", "tab:red"),
        (ax_loss, results[0].ema_key, "EMA val loss", "tab:green"),
        (ax_r2, "val_loss", "Online R2", "tab:red"),
        (ax_r2, results[0].ema_key, "EMA R2", "tab:green"),
    ]
    for i, result in enumerate(results):
        epochs = np.arange(1, result.epochs + 1)
        for ax, key, label, color in series:
            values = np.asarray(result.history[key])
            if ax is ax_r2:
                values = r2_from_mse(result.history[key], y_val)
            ax.plot(
                epochs,
                values,
                color=color,
                alpha=1.0 if i == 0 else 0.25,
                linewidth=1.2 if i == 0 else 0.8,
                label=f"{label} (seed {result.seed})" if i == 0 else None,
            )
    ax_loss.set(
        xlabel="Epoch",
        ylabel="MSE",
        yscale="log",
        title="Training and validation losses",
    )
    ax_r2.set(xlabel="Epoch", ylabel="R2", ylim=(0.95, 1.0), title="Validation R2")
    title = f"Keras backend: {keras.backend.backend()}"
    if len(results) > 1:
        others = ", ".join(str(r.seed) for r in results[1:])
        title += f"; faint lines: seed(s) {others}"
    fig.suptitle(title)
    for ax in (ax_loss, ax_r2):
        ax.grid(True)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--epochs", type=int, default=500, help="maximum epochs")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--profiles",
        action="store_true",
        help="keep the four profiles of PROFILES in the same run and score each",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_data()
    print(f"Keras {keras.version()}, backend {keras.backend.backend()}")

    results = []
    for seed in args.seeds:
        result = train(data, seed, args.epochs, profiles=args.profiles)
        print_progress(result, data.y_val)
        print_comparison(
            result.online, result.ema, f"=== Final results, seed {seed} ==="
        )
        print_profiles(result)
        results.append(result)
    print_summary(results)
    if args.profiles:
        print_profile_summary(results)

    report = {
        "backend": keras.backend.backend(),
        "runs": [r.to_json() for r in results],
    }
    name = "profiles" if args.profiles else "results"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWrote {args.out / f'{name}.json'}")
    if not args.no_plot:
        plot(results, data.y_val, args.out / "training_curves.png")
        print(f"Wrote {args.out / 'training_curves.png'}")
        if args.profiles:
            plot_profiles(results, args.out / "profile_curves.png")
            print(f"Wrote {args.out / 'profile_curves.png'}")


if __name__ == "__main__":
    main()
