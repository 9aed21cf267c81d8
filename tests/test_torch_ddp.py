"""The EMA in a torch `DistributedDataParallel` custom loop, two processes.

tests/torch_ddp_harness.py runs the pattern of the Keras guide
"Multi-GPU distributed training with PyTorch" (a Keras model wrapped in
DDP, a torch optimizer, a custom loop) on two CPU ranks joined by gloo,
with `ema.update()` after each optimizer step. Here the same loop runs on
one process with the global batch, and every rank must hold its EMA within
1e-5: halfway, at the end, evaluated by `averaged_model()` and inside
`swap_weights()` (also against a NumPy forward pass of the shadows), and
after resuming both ranks from the state file that rank 0 saved.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import process_launch
import pytest
import torch_ddp_harness as harness
from conftest import BACKEND
from conftest import make_data
from conftest import make_model

import keras_ema
from keras_ema import posthoc
from keras_ema.posthoc.folder import snapshot_paths

pytestmark = pytest.mark.skipif(
    BACKEND != "torch", reason="torch DistributedDataParallel: the torch backend."
)

HARNESS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "torch_ddp_harness.py"
)
TOLERANCE = 1e-5
TIMEOUT = 240


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The folder the ranks write to."""
    return str(tmp_path_factory.mktemp("torch_ddp"))


@pytest.fixture(scope="module")
def ranks(out):
    """Each rank's results and arrays."""
    port = str(process_launch.free_port())
    logs = [os.path.join(out, f"rank{rank}.log") for rank in range(harness.RANKS)]
    arguments = [[str(rank), port, out] for rank in range(harness.RANKS)]
    launched = process_launch.launch(HARNESS, arguments, logs, TIMEOUT)
    if launched.failures and not (
        all("ran over" in failure for failure in launched.failures)
        and all(_written(out, rank) for rank in range(harness.RANKS))
    ):
        # A rank that wrote everything and then hung tearing the process
        # group down (seen once, under load) did its work: the results
        # below are checked as usual.
        pytest.fail(launched.report("The DDP run"))
    print(f"two DDP ranks, wall seconds: {launched.seconds:.1f}")
    loaded = []
    for rank in range(harness.RANKS):
        with open(os.path.join(out, f"rank{rank}.json")) as file:
            results = json.load(file)
        with np.load(os.path.join(out, f"rank{rank}.npz")) as archive:
            arrays = dict(archive)
        loaded.append((results, arrays))
    return loaded


def _written(out: str, rank: int) -> bool:
    return all(
        os.path.exists(os.path.join(out, f"rank{rank}.{suffix}"))
        for suffix in ("json", "npz")
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same loop on one process, with the global batch."""
    keras.utils.set_random_seed(0)
    x, y = make_data(harness.SAMPLES)
    x_val, _ = make_data(32, seed=1)
    model = make_model(batch_norm=False, compile=False)
    ema = keras_ema.EMA(**harness.hyperparameters())
    ema.set_model(model)
    teacher = ema.averaged_model()
    directory = str(tmp_path_factory.mktemp("posthoc"))
    posthoc = harness.posthoc(directory, model)
    arrays = {}

    def at_half(i: int) -> None:
        if i == harness.HALF - 1:
            arrays["half"] = harness.shadow_arrays(ema)

    harness.train_loop(model, [ema, posthoc], x, y, range(harness.STEPS), at_half)
    posthoc.wait()
    arrays["final"] = harness.shadow_arrays(ema)
    evaluated = harness.predictions(model, ema, teacher, x_val)
    assert evaluated.pop("online_back")
    return ema.step, arrays, evaluated, directory


def values(arrays: dict, key: str) -> list[np.ndarray]:
    count = sum(name.startswith(f"{key}_") for name in arrays)
    return [arrays[f"{key}_{i}"] for i in range(count)]


def assert_all_close(expected: list, actual: list) -> None:
    assert len(expected) == len(actual)
    for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
        np.testing.assert_allclose(
            got, want, rtol=0, atol=TOLERANCE, err_msg=f"variable {i}"
        )


def numpy_forward(shadows: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """The conftest model without BatchNormalization: Dense, ReLU, Dense."""
    kernel1, bias1, kernel2, bias2 = shadows
    return np.maximum(x @ kernel1 + bias1, 0.0) @ kernel2 + bias2


def test_every_rank_holds_the_ema_of_one_process_with_the_global_batch(
    ranks, reference
):
    step, expected, _, _ = reference
    for results, arrays in ranks:
        assert results["step"] == step == harness.STEPS
        for key in ("half", "final"):
            assert_all_close(expected[key], values(arrays, key))
    # The ranks agree with each other to the bit: the same weights after
    # DDP's all-reduce, the same update.
    (_, first), (_, second) = ranks
    for key in ("half", "final"):
        for a, b in zip(values(first, key), values(second, key), strict=True):
            np.testing.assert_array_equal(a, b)


def test_averaged_model_and_swap_weights_evaluate_the_ema(ranks, reference):
    _, _, expected, _ = reference
    x_val, _ = make_data(32, seed=1)
    for results, arrays in ranks:
        assert results["online_back"]
        oracle = numpy_forward(values(arrays, "final"), x_val)
        for key in ("averaged", "swapped"):
            (got,) = values(arrays, key)
            np.testing.assert_allclose(got, expected[key], rtol=0, atol=TOLERANCE)
            np.testing.assert_allclose(got, oracle, rtol=1e-5, atol=1e-5)


def read_snapshot(directory: str, step: int) -> posthoc.Snapshot:
    return posthoc.read_snapshot(
        os.path.join(directory, posthoc.snapshot_filename(step))
    )


def test_post_hoc_snapshots_of_rank_0_equal_one_process(ranks, reference, out):
    _, _, _, directory = reference
    written = os.path.join(out, "posthoc")
    steps = [harness.HALF, harness.STEPS]
    assert [step for step, _ in snapshot_paths(written)] == steps
    assert [step for step, _ in snapshot_paths(directory)] == steps
    for step in steps:
        want = read_snapshot(directory, step)
        got = read_snapshot(written, step)
        assert got.averaged.keys() == want.averaged.keys()
        for path in want.averaged:
            assert_all_close(want.averaged[path], got.averaged[path])


def test_state_saved_by_rank_0_resumes_both_ranks_as_uninterrupted(ranks):
    for results, arrays in ranks:
        assert results["resumed_from_step"] == harness.HALF
        assert results["resumed_step"] == harness.STEPS
        assert_all_close(values(arrays, "final"), values(arrays, "resumed"))
