"""One rank of the torch `DistributedDataParallel` run in tests/test_torch_ddp.py.

Run as `python torch_ddp_harness.py RANK PORT OUT`, twice at once (ranks 0
and 1): two CPU processes joined by a gloo process group on
127.0.0.1:PORT. The pattern of the Keras guide "Multi-GPU distributed
training with PyTorch": a Keras model wrapped in
`torch.nn.parallel.DistributedDataParallel`, a torch optimizer, a custom
loop; `ema.update()` after each optimizer step. Each rank writes its EMA
and its evaluations under OUT; the test compares them with one process
training on the global batch.

- `train_loop` trains `STEPS` steps, each rank on its half of every global
  batch; halfway, rank 0 writes the EMA state (`save_state`) and the
  weights, and both ranks wait at a barrier;
- rank 0 also keeps a `PostHocEMA`, whose snapshots it writes;
- the EMA weights are evaluated by `averaged_model()` and inside
  `swap_weights()`;
- a fresh model and EMA on each rank load the files of rank 0 and train
  the second half again: the resumed run.
"""

from __future__ import annotations

import gc
import json
import os
import sys

RANKS = 2
GLOBAL_BATCH = 16
STEPS = 8
HALF = STEPS // 2
SAMPLES = GLOBAL_BATCH * STEPS
LEARNING_RATE = 0.05


def hyperparameters() -> dict:
    return dict(beta=0.9, update_after_step=3, update_every=1)


def local_rows(array, rank: int, ranks: int):
    """This rank's rows of every global batch (all of them for one rank)."""
    local = GLOBAL_BATCH // ranks
    batches = array.reshape(-1, GLOBAL_BATCH, *array.shape[1:])
    mine = batches[:, rank * local : (rank + 1) * local]
    return mine.reshape(-1, *array.shape[1:])


def train_loop(trained, averages, x, y, steps: range, on_step=None) -> None:
    """The guide's loop: `trained` (the DDP wrapper, or the model itself on
    one process) computes the loss and its gradients, a torch optimizer
    steps, then each of `averages` (`EMA`, `PostHocEMA`) updates."""
    import torch

    optimizer = torch.optim.SGD(trained.parameters(), lr=LEARNING_RATE)
    local = len(x) // STEPS
    for i in steps:
        inputs = torch.as_tensor(x[i * local : (i + 1) * local])
        targets = torch.as_tensor(y[i * local : (i + 1) * local])
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(trained(inputs), targets)
        loss.backward()  # DDP averages the gradients of the ranks
        optimizer.step()
        for average in averages:
            average.update()
        if on_step is not None:
            on_step(i)


def posthoc(directory: str, model):
    """A `PostHocEMA` of `model` with a snapshot halfway and at the end."""
    import keras_ema

    callback = keras_ema.PostHocEMA(directory, snapshot_every=HALF, verbose=0)
    callback.set_model(model)
    return callback


def shadow_arrays(ema) -> list:
    import keras

    return [keras.ops.convert_to_numpy(v.value) for v in ema.variables]


def predictions(model, ema, teacher, x_val) -> dict:
    """The EMA weights evaluated both ways, and whether the model got its
    online weights back after the swap."""
    import keras
    import numpy as np
    import torch

    online = [keras.ops.convert_to_numpy(w.value).copy() for w in model.weights]
    with torch.no_grad():
        averaged = keras.ops.convert_to_numpy(teacher(x_val))
        with ema.swap_weights():
            swapped = keras.ops.convert_to_numpy(model(x_val))
    back = all(
        np.array_equal(keras.ops.convert_to_numpy(w.value), v)
        for w, v in zip(model.weights, online, strict=True)
    )
    return {"averaged": averaged, "swapped": swapped, "online_back": back}


def run(rank: int, port: int, out: str) -> None:
    import keras
    import torch
    import torch.distributed as dist
    from conftest import make_data
    from conftest import make_model

    import keras_ema

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS
    )
    x, y = make_data(SAMPLES)
    x_val, _ = make_data(32, seed=1)
    x_mine, y_mine = local_rows(x, rank, RANKS), local_rows(y, rank, RANKS)
    weights_path = os.path.join(out, "half.weights.h5")
    state_path = os.path.join(out, "half_state.npz")

    keras.utils.set_random_seed(0)
    model = make_model(batch_norm=False, compile=False)
    # DDP broadcasts rank 0's weights to every rank when it wraps the model.
    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    ema = keras_ema.EMA(**hyperparameters())
    ema.set_model(model)  # the Keras model, not the DDP wrapper
    teacher = ema.averaged_model()
    results, arrays = {}, {}

    def at_half(i: int) -> None:
        if i != HALF - 1:
            return
        if rank == 0:  # one writer; every rank reads
            ema.save_state(state_path)
            model.save_weights(weights_path)
        dist.barrier()
        arrays["half"] = shadow_arrays(ema)

    # Post-hoc snapshots: one writer, since every rank holds the same
    # averages.
    averages = (
        [ema, posthoc(os.path.join(out, "posthoc"), model)] if rank == 0 else [ema]
    )
    train_loop(ddp_model, averages, x_mine, y_mine, range(STEPS), at_half)
    if rank == 0:
        averages[1].wait()
    results["step"] = ema.step
    arrays["final"] = shadow_arrays(ema)
    evaluated = predictions(model, ema, teacher, x_val)
    results["online_back"] = evaluated.pop("online_back")
    arrays.update(evaluated)

    # Resumed from rank 0's files, on both ranks.
    keras.utils.set_random_seed(1)  # other first weights: the file's count
    resumed = make_model(batch_norm=False, compile=False)
    resumed.load_weights(weights_path)
    ddp_resumed = torch.nn.parallel.DistributedDataParallel(resumed)
    resumed_ema = keras_ema.EMA(**hyperparameters())
    resumed_ema.set_model(resumed)
    resumed_ema.load_state(state_path)
    results["resumed_from_step"] = resumed_ema.step
    train_loop(ddp_resumed, [resumed_ema], x_mine, y_mine, range(HALF, STEPS))
    results["resumed_step"] = resumed_ema.step
    arrays["resumed"] = shadow_arrays(resumed_ema)
    write(out, rank, results, arrays)

    # DDP's wrappers are freed while the process group lives on every rank:
    # once, with the group destroyed first and the wrappers left to a later
    # garbage collection, rank 1 hung after writing its arrays (rank 0, the
    # host of the group's store, had exited; the cause is not established).
    del ddp_model, ddp_resumed
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def write(out: str, rank: int, results: dict, arrays: dict) -> None:
    import numpy as np

    flat = {
        f"{key}_{i}": value
        for key, values in arrays.items()
        for i, value in enumerate(values if isinstance(values, list) else [values])
    }
    np.savez(os.path.join(out, f"rank{rank}.npz"), **flat)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)


def main(rank: int, port: int, out: str) -> None:
    os.environ["KERAS_BACKEND"] = "torch"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU
    run(rank, port, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
