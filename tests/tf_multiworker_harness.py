"""One TensorFlow worker of the runs in tests/test_tf_multiworker.py.

Run as `python tf_multiworker_harness.py PHASE WORKER PORT0 PORT1 OUT`, twice
at once (workers 0 and 1): a `tf.distribute.MultiWorkerMirroredStrategy` of
two CPU workers on localhost, set up by `TF_CONFIG`. Each worker writes its
EMA under OUT, named by phase and worker; the test compares them with one
process training on the global batch.

Phases:

- `fit`: Keras' `fit` with the EMA, the whole data on every worker (fails
  in Keras 3.15 with or without the EMA: keras-team/keras#20585).
- `loop`: a custom loop, `strategy.run` of a step (`GradientTape`, then
  `optimizer.apply`), then `ema.update()`; the EMA weights evaluated
  inside `swap_weights()`; the state saved by the chief, loaded by both;
  a `PostHocEMA` on the chief writes its snapshots.
"""

from __future__ import annotations

import json
import os
import sys

WORKERS = 2
GLOBAL_BATCH = 16
STEPS = 8
SAMPLES = GLOBAL_BATCH * STEPS
LEARNING_RATE = 0.05


def hyperparameters() -> dict:
    return dict(beta=0.9, update_after_step=3, update_every=1)


def local_half(array, worker: int):
    """This worker's rows of every global batch."""
    local = GLOBAL_BATCH // WORKERS
    batches = array.reshape(-1, GLOBAL_BATCH, *array.shape[1:])
    mine = batches[:, worker * local : (worker + 1) * local]
    return mine.reshape(-1, *array.shape[1:])


def posthoc(directory: str, model):
    """A `PostHocEMA` of `model` with a snapshot halfway and at the end."""
    import keras_ema

    callback = keras_ema.PostHocEMA(directory, snapshot_every=STEPS // 2, verbose=0)
    callback.set_model(model)
    return callback


def shadow_arrays(ema) -> dict:
    import keras

    return {
        path: keras.ops.convert_to_numpy(v.value)
        for path, v in zip(ema.tracked_paths, ema.variables, strict=True)
    }


def run_fit(strategy, worker: int, out: str, results: dict) -> None:
    import keras
    from conftest import make_data
    from conftest import make_model

    import keras_ema

    x, y = make_data(SAMPLES)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = make_model(batch_norm=False)
    ema = keras_ema.EMA(**hyperparameters())
    # As Keras documents for this strategy: the whole data and the global
    # batch size on every worker; Keras shards each batch across them.
    model.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[ema],
    )
    results["step"] = ema.step
    save(out, f"fit.worker{worker}.npz", shadow_arrays(ema))


def train_step_function(strategy, model, optimizer):
    """The distributed step of a custom loop: each replica's gradient of its
    share of the global mean loss; `optimizer.apply` sums them across
    replicas (Keras' TF optimizer all-reduces in a replica context)."""
    import tensorflow as tf

    def step(x, y):
        with tf.GradientTape() as tape:
            prediction = model(x, training=True)
            per_sample = tf.reduce_mean(tf.square(prediction - y), axis=-1)
            loss = tf.nn.compute_average_loss(
                per_sample, global_batch_size=GLOBAL_BATCH
            )
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)

    @tf.function
    def train_step(x, y):
        strategy.run(step, args=(x, y))

    return train_step


def run_loop(strategy, worker: int, out: str, results: dict) -> None:
    import keras
    import numpy as np
    from conftest import make_data
    from conftest import make_model

    import keras_ema

    x, y = make_data(SAMPLES)
    x_val, _ = make_data(32, seed=1)
    x_mine, y_mine = local_half(x, worker), local_half(y, worker)
    local = GLOBAL_BATCH // WORKERS
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = make_model(batch_norm=False, compile=False)
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
        optimizer.build(model.trainable_variables)
    ema = keras_ema.EMA(**hyperparameters())
    ema.set_model(model)
    # Post-hoc snapshots: one writer, since every worker holds the same
    # averages.
    averages = [ema, posthoc(os.path.join(out, "posthoc"), model)]
    averages = averages if worker == 0 else [ema]
    train_step = train_step_function(strategy, model, optimizer)
    state_path = os.path.join(out, "loop_state.npz")
    for i in range(STEPS):
        batch = slice(i * local, (i + 1) * local)
        train_step(x_mine[batch], y_mine[batch])
        for average in averages:
            average.update()
        if i == STEPS // 2 - 1:
            if worker == 0:  # the chief writes; every worker reads
                ema.save_state(state_path)
            results["saved_step"] = ema.step
            save(out, f"loop_half.worker{worker}.npz", shadow_arrays(ema))
    results["step"] = ema.step
    save(out, f"loop.worker{worker}.npz", shadow_arrays(ema))
    if worker == 0:
        averages[1].wait()
    online = [keras.ops.convert_to_numpy(w) for w in model.weights]
    with ema.swap_weights():
        swapped = model(x_val, training=False)
        results["swapped_prediction"] = keras.ops.convert_to_numpy(swapped).tolist()
    results["online_back"] = all(
        np.array_equal(keras.ops.convert_to_numpy(w), v)
        for w, v in zip(model.weights, online, strict=True)
    )
    # A barrier: the chief's state file exists once both workers get here.
    strategy.reduce("SUM", strategy.run(lambda: 1.0), axis=None)
    fresh = keras_ema.EMA(**hyperparameters())
    fresh.set_model(model)
    fresh.load_state(state_path)
    results["loaded_step"] = fresh.step
    save(out, f"loop_loaded.worker{worker}.npz", shadow_arrays(fresh))


def save(out: str, name: str, arrays: dict) -> None:
    import numpy as np

    np.savez(
        os.path.join(out, name), **{str(i): a for i, a in enumerate(arrays.values())}
    )


def main(phase: str, worker: int, ports: list[int], out: str) -> None:
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"localhost:{port}" for port in ports]},
            "task": {"type": "worker", "index": worker},
        }
    )
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    results = {"replicas": strategy.num_replicas_in_sync}
    {"fit": run_fit, "loop": run_loop}[phase](strategy, worker, out, results)
    with open(os.path.join(out, f"{phase}.worker{worker}.json"), "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main(
        sys.argv[1], int(sys.argv[2]), [int(sys.argv[3]), int(sys.argv[4])], sys.argv[5]
    )
