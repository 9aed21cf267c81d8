"""Post-hoc EMA on the article's experiment: choose the EMA's length after
training.

Per seed, the article's experiment (``examples/regression.py``: its data,
model, optimizer, and learning-rate schedule and early stopping on the
article's warm-up EMA) runs first and gives the two reference scores: the
online weights and the article's EMA. The same training then runs again with
``keras_ema.PostHocEMA`` in place of the article's EMA, replaying the first
run's learning rate at every epoch and its number of epochs, so that the
online weights follow the same trajectory (checked: the two runs' online
scores must agree). ``PostHocEMA`` tracks power-function EMAs of
``sigma_rel`` 0.05 and 0.10 and saves a snapshot of them every epoch; after
training, ``keras_ema.PostHocRun`` synthesizes the EMA of every
``sigma_rel`` from 0.01 to 0.28 from those snapshots, and each is scored by
its validation MSE. (One `fit` runs one ``keras_ema`` callback, hence the
two runs.)

It prints, per seed and as a mean over seeds, the online weights' MSE, the
article's EMA's, and the best post-hoc EMA's with its ``sigma_rel``; it writes
``posthoc.json`` and ``posthoc_sweep.png`` (validation MSE against
``sigma_rel``, the article's EMA and the online weights as reference lines)::

    KERAS_BACKEND=jax python examples/posthoc.py --seeds 0 1 2 --out results/

The best ``sigma_rel`` is chosen on the same validation set that scores it,
so its MSE is an optimistic estimate; the fixed ``sigma_rel`` columns are not.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import regression as article

import keras_ema

SIGMA_RELS = (0.05, 0.10)
TARGETS = np.round(np.linspace(0.01, 0.28, 28), 4)


def train(data: article.Data, seed: int, epochs: int, folder: Path) -> dict[str, Any]:
    """One seed: the article's run, then the same training with post-hoc EMA."""
    reference = article.train(data, seed, epochs)
    rates = reference.history["learning_rate"]
    keras.utils.set_random_seed(seed)
    model = article.build_model(data.x_train.shape[1])
    model.compile(
        optimizer=article.CoupledL2Adam(
            l2=article.L2, learning_rate=article.LEARNING_RATE, epsilon=1e-8
        ),
        loss="mse",
    )
    steps_per_epoch = int(np.ceil(len(data.x_train) / article.BATCH_SIZE))
    # Two validation passes per epoch, as in the first run: on torch every
    # pass draws from the global random generator (its DataLoader's seed),
    # which the dropout of the next epoch draws from too.
    posthoc = keras_ema.PostHocEMA(
        folder,
        sigma_rels=SIGMA_RELS,
        snapshot_every=steps_per_epoch,
        validate="ema",
        verbose=0,
    )
    start = time.perf_counter()
    model.fit(
        data.x_train,
        data.y_train,
        batch_size=article.BATCH_SIZE,
        epochs=reference.epochs,
        shuffle=True,
        validation_data=(data.x_val, data.y_val),
        callbacks=[
            posthoc,
            keras.callbacks.LearningRateScheduler(lambda epoch: rates[epoch]),
        ],
        verbose=0,
    )
    seconds = time.perf_counter() - start

    def mse() -> float:
        pred = model.predict(data.x_val, verbose=0)
        return article.score(data.y_val, pred)["mse"]

    online = model.get_weights()
    replayed = mse()
    run = keras_ema.PostHocRun(folder)

    def evaluate(weights: dict) -> float:
        for variable in model.weights:
            if variable.path in weights:
                variable.assign(weights[variable.path])
        return mse()

    sweep = run.sweep(TARGETS, evaluate)
    model.set_weights(online)
    return {
        "seed": seed,
        "epochs": reference.epochs,
        "snapshots": len(run.steps),
        "seconds": round(reference.seconds + seconds, 1),
        "online": reference.online["mse"],
        "online_replayed": replayed,
        "article_ema": reference.ema["mse"],
        "sweep": dict(zip(map(float, sweep.sigma_rels), sweep.scores, strict=True)),
        "best_sigma_rel": sweep.best,
        "best_mse": sweep.best_score,
        "reconstruction_error_at_best": run.reconstruction_error(sweep.best),
    }


def print_table(results: list[dict]) -> None:
    print(
        f"\n{'seed':>4} | {'epochs':>6} | {'online':>8} | {'article EMA':>11} | "
        f"{'sigma 0.05':>10} | {'sigma 0.10':>10} | {'best sigma':>10} | "
        f"{'best MSE':>8}"
    )
    for r in results:
        print(
            f"{r['seed']:>4} | {r['epochs']:>6} | {r['online']:8.5f} | "
            f"{r['article_ema']:11.5f} | {r['sweep'][0.05]:10.5f} | "
            f"{r['sweep'][0.1]:10.5f} | {r['best_sigma_rel']:10.3f} | "
            f"{r['best_mse']:8.5f}"
        )

    def mean(key):
        return float(np.mean([r[key] for r in results]))

    def mean_at(target):
        return float(np.mean([r["sweep"][target] for r in results]))

    print(
        f"{'mean':>4} | {'':>6} | {mean('online'):8.5f} | "
        f"{mean('article_ema'):11.5f} | {mean_at(0.05):10.5f} | "
        f"{mean_at(0.1):10.5f} | {'':>10} | {mean('best_mse'):8.5f}"
    )
    curve = np.mean([[r["sweep"][float(t)] for t in TARGETS] for r in results], 0)
    best = int(np.argmin(curve))
    print(
        f"Best sigma_rel of the mean curve: {TARGETS[best]:.3f} (mean MSE "
        f"{curve[best]:.5f}); best post-hoc EMA beats the online weights on "
        f"{sum(r['best_mse'] < r['online'] for r in results)} of {len(results)} "
        f"seed(s), the article's EMA on "
        f"{sum(r['best_mse'] < r['article_ema'] for r in results)}."
    )


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    curves = np.array([[r["sweep"][float(t)] for t in TARGETS] for r in results])
    for curve in curves:
        ax.plot(TARGETS, curve, color="tab:blue", alpha=0.2, linewidth=0.8)
    ax.plot(TARGETS, curves.mean(0), color="tab:blue", marker="o", label="post-hoc")
    ax.axhline(np.mean([r["online"] for r in results]), color="black", label="online")
    ax.axhline(
        np.mean([r["article_ema"] for r in results]),
        color="tab:green",
        linestyle="--",
        label="article's EMA",
    )
    for index, tracked in enumerate(SIGMA_RELS):
        ax.axvline(
            tracked,
            color="0.5",
            linestyle=":",
            label="tracked sigma_rel" if index == 0 else None,
        )
    ax.set(
        xlabel="sigma_rel",
        ylabel="validation MSE",
        yscale="log",
        title=(
            f"Post-hoc EMA, mean of {len(results)} seed(s) (faint: each seed), "
            f"backend {keras.backend.backend()}"
        ),
    )
    ax.grid(True)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--epochs", type=int, default=500, help="maximum epochs")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = article.load_data()
    print(f"Keras {keras.version()}, backend {keras.backend.backend()}")
    results = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as folder:
            result = train(data, seed, args.epochs, Path(folder))
        print(
            f"seed {seed}: {result['epochs']} epochs, {result['snapshots']} "
            f"snapshots, {result['seconds']} s; online MSE {result['online']:.5f} "
            f"(replayed run: {result['online_replayed']:.5f}); best sigma_rel "
            f"{result['best_sigma_rel']:.3f}"
        )
        results.append(result)
    print_table(results)
    report = {"backend": keras.backend.backend(), "runs": results}
    (args.out / "posthoc.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWrote {args.out / 'posthoc.json'}")
    if not args.no_plot:
        plot(results, args.out / "posthoc_sweep.png")
        print(f"Wrote {args.out / 'posthoc_sweep.png'}")


if __name__ == "__main__":
    main()
