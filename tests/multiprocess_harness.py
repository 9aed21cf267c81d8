"""One JAX process of the multi-process runs in tests/test_multiprocess.py.

Run as `python multiprocess_harness.py PHASE PROCESS_ID PORT OUT`, twice at
once (process ids 0 and 1): two processes of two virtual CPU devices each,
coordinated on 127.0.0.1:PORT, collectives over gloo. Each process writes
what it can read without gathering (the shards it holds, logs, the errors
it saw) under OUT, named by phase and process id; the test assembles and
compares them on the host.

Phases:

- `first`: a `DataParallel` fit (each process feeds its half of every
  batch), then a `ModelParallel` fit on a (1, 4) mesh with the kernels
  sharded over "model", with an `OrbaxCheckpoint` (EMA state riding along)
  and an `EMAOrbaxCheckpoint` (EMA weights); `get_weights`, `save_state` and
  `load_state` across processes.
- `resume`: new processes resume the `ModelParallel` run from the
  `OrbaxCheckpoint` with `model.load_weights`, finish it (saving in the
  background) and save the EMA weights with Orbax inside `swap_weights()`.
"""

from __future__ import annotations

import json
import os
import sys

PROCESSES = 2
DEVICES_PER_PROCESS = 2
BATCH_SIZE = 16
EPOCHS = 4
FIRST_EPOCHS = 2
SAMPLES = 64


def profiles():
    import keras_ema

    return {
        "fast": keras_ema.WarmupSchedule(beta=0.9, update_after_step=3, update_every=1),
        "slow": keras_ema.WarmupSchedule(
            beta=0.99, update_after_step=2, update_every=2
        ),
    }


def model_parallel():
    import keras

    mesh = keras.distribution.DeviceMesh(
        (1, PROCESSES * DEVICES_PER_PROCESS),
        ["batch", "model"],
        keras.distribution.list_devices(),
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*d1/kernel"] = (None, "model")
    layout_map[".*d1/bias"] = ("model",)
    layout_map[".*bn/.*"] = ("model",)
    layout_map[".*d2/kernel"] = ("model", None)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    # Every process feeds the whole batch: the batch axis has one device.
    distribution.auto_shard_dataset = False
    return distribution


def data_parallel():
    import keras

    distribution = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()
    )
    # Each process feeds its own half of every batch (`local_half`).
    distribution.auto_shard_dataset = False
    return distribution


def local_half(array, process_id: int):
    """This process's rows of every global batch of `BATCH_SIZE`."""
    local = BATCH_SIZE // PROCESSES
    batches = array.reshape(-1, BATCH_SIZE, *array.shape[1:])
    mine = batches[:, process_id * local : (process_id + 1) * local]
    return mine.reshape(-1, *array.shape[1:])


def shards(variables) -> dict:
    """The shards of `variables` this process holds, as NumPy arrays with
    their place in the whole array."""
    import numpy as np

    entries = {}
    for i, variable in enumerate(variables):
        value = variable.value
        entries[f"v{i}_shape"] = np.asarray(value.shape, dtype=np.int64)
        for k, shard in enumerate(value.addressable_shards):
            bounds = [
                s.indices(n)[:2] for s, n in zip(shard.index, value.shape, strict=True)
            ]
            entries[f"v{i}_s{k}"] = np.asarray(shard.data)
            entries[f"v{i}_s{k}_at"] = np.asarray(bounds, np.int64).reshape(-1, 2)
    return entries


def write_shards(out: str, name: str, ema) -> None:
    import numpy as np

    entries = {}
    for p, profile in enumerate(ema._state.profiles):
        for key, value in shards(profile.shadows).items():
            entries[f"p{p}_{key}"] = value
    np.savez(os.path.join(out, name), **entries)


def error_of(call) -> dict | None:
    try:
        call()
    except Exception as error:
        return {"type": type(error).__name__, "message": str(error)}
    return None


def run_first(process_id: int, out: str, results: dict) -> None:
    import keras
    import numpy as np
    from conftest import make_data
    from conftest import make_model

    import keras_ema

    x, y = make_data(SAMPLES)
    x_val, y_val = make_data(32, seed=1)

    # DataParallel: the weights and the EMA are replicated on every device.
    keras.utils.set_random_seed(0)
    distribution = data_parallel()
    with distribution.scope():
        model = make_model()
        ema = keras_ema.EMA(profiles=profiles())
        model.fit(
            local_half(x, process_id),
            local_half(y, process_id),
            batch_size=BATCH_SIZE // PROCESSES,
            epochs=FIRST_EPOCHS,
            shuffle=False,
            verbose=0,
            callbacks=[ema],
        )
        write_shards(out, f"data.process{process_id}.npz", ema)
        results["data_step"] = ema.step
        # Replicated arrays are whole on each process: nothing to gather.
        weights = ema.get_weights(profile="slow")
        np.savez(os.path.join(out, f"data_weights.process{process_id}.npz"), *weights)
        ema.save_state(os.path.join(out, f"data_state.process{process_id}.npz"))
    keras.backend.clear_session()

    # ModelParallel: the kernels' shadows span the devices of both processes.
    keras.utils.set_random_seed(0)
    distribution = model_parallel()
    with distribution.scope():
        model = make_model()
        ema = keras_ema.EMA(profiles=profiles())
        history = model.fit(
            x,
            y,
            batch_size=BATCH_SIZE,
            epochs=FIRST_EPOCHS,
            shuffle=False,
            verbose=0,
            validation_data=(x_val, y_val),
            callbacks=[
                ema,
                # Two Orbax checkpoints in one fit, across processes: both in
                # the foreground, since overlapping saves collide in Orbax
                # (docs/distributed.md). The resume phase saves in the
                # background.
                keras.callbacks.OrbaxCheckpoint(
                    os.path.join(out, "resume"), save_on_background=False
                ),
                keras_ema.EMAOrbaxCheckpoint(
                    ema,
                    os.path.join(out, "export"),
                    profile="slow",
                    save_weights_only=True,
                    save_on_background=False,
                ),
            ],
        )
        write_shards(out, f"model.process{process_id}.npz", ema)
        results["model_step"] = ema.step
        results["model_history"] = {
            key: [float(v) for v in values] for key, values in history.history.items()
        }
        results["get_weights_error"] = error_of(ema.get_weights)
        results["save_state_error"] = error_of(
            lambda: ema.save_state(os.path.join(out, "refused.npz"))
        )
        results["refused_file_written"] = os.path.exists(
            os.path.join(out, "refused.npz")
        )
        # A state file saved on one process loads: every process reads the
        # whole file and keeps its own shards.
        fresh = keras_ema.EMA(profiles=profiles())
        fresh.set_model(model)
        fresh.load_state(os.path.join(out, "reference_state.npz"))
        write_shards(out, f"loaded.process{process_id}.npz", fresh)
        results["loaded_step"] = fresh.step
        results["loaded_laid_out_like_weights"] = laid_out_like_weights(fresh)


def laid_out_like_weights(ema) -> bool:
    state = ema._state
    return all(
        shadow.value.sharding.is_equivalent_to(weight.value.sharding, weight.ndim)
        for profile in state.profiles
        for shadow, weight in zip(profile.shadows, state.weights, strict=True)
    )


def run_resume(process_id: int, out: str, results: dict) -> None:
    import keras
    from conftest import make_data
    from conftest import make_model
    from orbax.checkpoint import v1 as ocp

    import keras_ema

    # As docs/distributed.md's training script resumes.
    directory = os.path.join(out, "resume")
    x, y = make_data(SAMPLES)
    keras.utils.set_random_seed(1)  # The weights come from the checkpoint.
    distribution = model_parallel()
    with distribution.scope():
        model = make_model()
        model.optimizer.build(model.trainable_variables)
        ema = keras_ema.EMA(profiles=profiles())
        ema.set_model(model)  # Attached: `load_weights` restores the EMA.
        with ocp.training.Checkpointer(directory) as checkpointer:
            latest = checkpointer.latest
        model.load_weights(directory)
        results["resumed_epoch"] = latest.step + 1
        results["resumed_step"] = ema.step
        results["resumed_laid_out_like_weights"] = laid_out_like_weights(ema)
        model.fit(
            x,
            y,
            batch_size=BATCH_SIZE,
            initial_epoch=latest.step + 1,
            epochs=EPOCHS,
            shuffle=False,
            verbose=0,
            callbacks=[ema, keras.callbacks.OrbaxCheckpoint(directory)],
        )
        write_shards(out, f"resumed.process{process_id}.npz", ema)
        results["final_step"] = ema.step
        # The EMA weights after `fit`, as docs/distributed.md saves them.
        with ema.swap_weights("slow"):
            state = model.get_state_tree()
            weights = {
                key: state[key]
                for key in ("trainable_variables", "non_trainable_variables")
            }
            with ocp.training.Checkpointer(os.path.join(out, "final")) as saver:
                saver.save_checkpointables(0, {"pytree": weights}, overwrite=True)


def main(phase: str, process_id: int, port: int, out: str) -> None:
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    )
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=PROCESSES,
        process_id=process_id,
    )
    results = {}
    {"first": run_first, "resume": run_resume}[phase](process_id, out, results)
    with open(os.path.join(out, f"{phase}.process{process_id}.json"), "w") as file:
        json.dump(results, file)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
