"""The callback against the NumPy transcription of the article, step by step."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import assert_bit_equal
from conftest import assert_close
from conftest import assert_on_host
from conftest import ema_values
from conftest import float_weights
from conftest import make_data
from conftest import make_model
from keras import ops
from oracle import ArticleEMA

import keras_ema

HYPERPARAMETERS = {
    "warmup_then_every_step": dict(beta=0.99, update_after_step=3, update_every=1),
    "every_3_no_delay": dict(
        beta=0.9, update_after_step=0, update_every=3, inv_gamma=2.0, power=0.75
    ),
    "min_value": dict(
        beta=0.95, update_after_step=2, update_every=2, min_value=0.5, power=1.0
    ),
    "running_average": dict(
        beta=1.0, update_after_step=1, update_every=1, inv_gamma=1.0, power=1.0
    ),
    "defaults": dict(),
}


@pytest.fixture(params=[False, True], ids=["on_device", "offload_to_host"])
def offload(request) -> bool:
    """Every oracle test runs with the shadows on the device and on the host."""
    return request.param


def filters(model) -> dict:
    """One weight of each filter kind, chosen from the model's own paths."""
    paths = [w.path for w in model.weights]
    moving_mean = next(p for p in paths if p.endswith("moving_mean"))
    kernel = next(p for p in paths if p.endswith("d1/kernel"))
    d2_prefix = next(p for p in paths if p.endswith("d2/kernel"))[: -len("kernel")]
    return dict(
        param_or_buffer_names_no_ema=[moving_mean],
        ignore_names=[kernel],
        ignore_startswith_names=[d2_prefix],
    )


def perturb(model, rng) -> None:
    for weight in model.weights:
        if keras.backend.is_float_dtype(weight.dtype):
            noise = rng.normal(scale=0.1, size=weight.shape).astype("float32")
            weight.assign(weight.numpy() + noise if hasattr(weight, "numpy") else noise)


def run_outside_fit(
    hyperparameters: dict, steps: int, with_filters: bool, offload: bool
) -> None:
    model = make_model()
    extra = filters(model) if with_filters else {}
    ema = keras_ema.EMA(**hyperparameters, **extra, offload_to_host=offload)
    ema.set_model(model)
    oracle = ArticleEMA(float_weights(model), **hyperparameters, **extra)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        perturb(model, rng)
        ema.update()
        oracle.update(float_weights(model))
        assert ema.step == oracle.step
        assert ema.get_current_decay() == pytest.approx(oracle.get_current_decay())
        assert_close(oracle.ema, ema_values(ema))
    if offload:
        assert_on_host(ema)


@pytest.mark.parametrize("name", sorted(HYPERPARAMETERS))
def test_update_outside_fit_matches_article(name, offload):
    steps = 130 if name == "defaults" else 25
    run_outside_fit(HYPERPARAMETERS[name], steps, with_filters=False, offload=offload)


@pytest.mark.parametrize("name", ["warmup_then_every_step", "every_3_no_delay"])
def test_filters_outside_fit_match_article(name, offload):
    run_outside_fit(HYPERPARAMETERS[name], 20, with_filters=True, offload=offload)


class Recorder(keras.callbacks.Callback):
    """Replays every optimizer step into the oracle and compares each time."""

    def __init__(self, ema, oracle):
        super().__init__()
        self.ema = ema
        self.oracle = oracle
        self.checked = 0

    def on_train_batch_end(self, batch, logs=None):
        self.oracle.update(float_weights(self.model))
        assert self.ema.step == self.oracle.step
        assert_close(self.oracle.ema, ema_values(self.ema))
        self.checked += 1


def run_inside_fit(hyperparameters, with_filters, offload, epochs=2, **compile_kwargs):
    model = make_model(**compile_kwargs)
    extra = filters(model) if with_filters else {}
    ema = keras_ema.EMA(**hyperparameters, **extra, offload_to_host=offload)
    oracle = ArticleEMA(float_weights(model), **hyperparameters, **extra)
    recorder = Recorder(ema, oracle)
    x, y = make_data(96)
    model.fit(x, y, batch_size=8, epochs=epochs, callbacks=[ema, recorder], verbose=0)
    assert recorder.checked == epochs * 12
    assert ema.step == oracle.step
    assert_close(oracle.ema, ema_values(ema))
    if offload:
        assert_on_host(ema)
    return model, ema, oracle


@pytest.mark.parametrize("name", sorted(HYPERPARAMETERS))
def test_fit_matches_article_step_by_step(name, offload):
    run_inside_fit(HYPERPARAMETERS[name], with_filters=False, offload=offload)


def test_fit_with_filters_matches_article(offload):
    hp = HYPERPARAMETERS["warmup_then_every_step"]
    run_inside_fit(hp, with_filters=True, offload=offload)


def test_second_fit_continues_the_same_average(offload):
    hp = HYPERPARAMETERS["every_3_no_delay"]
    model = make_model()
    ema = keras_ema.EMA(**hp, offload_to_host=offload)
    oracle = ArticleEMA(float_weights(model), **hp)
    recorder = Recorder(ema, oracle)
    x, y = make_data(48)
    for _ in range(3):
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[ema, recorder], verbose=0)
    assert ema.step == 18 == oracle.step
    assert_close(oracle.ema, ema_values(ema))


def test_gradient_accumulation_counts_optimizer_steps(offload):
    hp = HYPERPARAMETERS["warmup_then_every_step"]
    optimizer = keras.optimizers.SGD(0.05, gradient_accumulation_steps=3)
    model = make_model(optimizer=optimizer)
    ema = keras_ema.EMA(**hp, offload_to_host=offload)
    oracle = ArticleEMA(float_weights(model), **hp)
    x, y = make_data(96)

    class EveryThird(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % 3 == 0:
                oracle.update(float_weights(self.model))

    model.fit(x, y, batch_size=8, epochs=1, callbacks=[ema, EveryThird()], verbose=0)
    assert ema.step == 4 == oracle.step
    assert_close(oracle.ema, ema_values(ema))


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras' torch trainer requires steps_per_execution=1.",
)
def test_steps_per_execution_averages_every_optimizer_step(offload):
    hp = HYPERPARAMETERS["warmup_then_every_step"]
    model = make_model(steps_per_execution=4)
    ema = keras_ema.EMA(**hp, offload_to_host=offload)
    # With several steps per call, batch-end hooks fire once per execution, so
    # the reference replays the same data through an identical model.
    reference = make_model()
    reference.set_weights(model.get_weights())
    oracle = ArticleEMA(float_weights(reference), **hp)
    x, y = make_data(96)

    class Replay(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            oracle.update(float_weights(self.model))

    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[ema], verbose=0)
    reference.fit(
        x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[Replay()], verbose=0
    )
    assert ema.step == 12 == oracle.step
    assert_close(oracle.ema, ema_values(ema), rtol=1e-4, atol=1e-5)


class OnAppliedSteps(keras.callbacks.Callback):
    """Replays into the oracle the batches after which the optimizer's public
    `iterations` advanced: the steps that really changed the weights."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle
        self.iterations = []

    def on_train_batch_end(self, batch, logs=None):
        iterations = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        if iterations > (self.iterations[-1] if self.iterations else 0):
            self.oracle.update(float_weights(self.model))
        self.iterations.append(iterations)


def test_mixed_float16_counts_only_steps_the_loss_scale_optimizer_applied(offload):
    # Under "mixed_float16", `compile` wraps the optimizer in a
    # LossScaleOptimizer whose first steps overflow (initial scale 2**15) and
    # are skipped: the EMA must advance only on the steps that moved weights.
    hp = HYPERPARAMETERS["warmup_then_every_step"]
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = make_model()
    finally:
        keras.config.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    ema = keras_ema.EMA(**hp, offload_to_host=offload)
    oracle = ArticleEMA(float_weights(model), **hp)
    recorder = OnAppliedSteps(oracle)
    x, y = make_data(96)
    x = x * 300.0  # large activations make the scaled float16 gradients overflow
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[ema, recorder], verbose=0)
    applied = recorder.iterations
    assert applied[-1] < len(applied), "no step was skipped: the test tests nothing"
    assert {keras.backend.standardize_dtype(v.dtype) for v in ema.variables} == {
        "float32"
    }
    assert ema.step == oracle.step == applied[-1]
    assert_close(oracle.ema, ema_values(ema))


def test_gradient_accumulation_across_fits_ending_mid_accumulation(offload):
    hp = HYPERPARAMETERS["warmup_then_every_step"]
    optimizer = keras.optimizers.SGD(0.05, gradient_accumulation_steps=3)
    model = make_model(optimizer=optimizer)
    ema = keras_ema.EMA(**hp, offload_to_host=offload)
    oracle = ArticleEMA(float_weights(model), **hp)
    recorder = OnAppliedSteps(oracle)
    x, y = make_data(80)  # 10 batches: each fit ends mid-accumulation
    for _ in range(2):
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[ema, recorder], verbose=0)
    assert recorder.iterations[-1] == 6
    assert ema.step == oracle.step == 6
    assert_close(oracle.ema, ema_values(ema))


def fit_two_epochs_against_oracle(model, hp, extra, offload):
    """Two epochs of 6 steps, the EMA compared with the oracle at each."""
    ema = keras_ema.EMA(**hp, **extra, offload_to_host=offload)
    oracle = ArticleEMA(float_weights(model), **hp, **extra)
    recorder = Recorder(ema, oracle)
    x, y = make_data(48)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[ema, recorder], verbose=0)
    assert recorder.checked == 12
    assert ema.step == oracle.step == 12
    assert_close(oracle.ema, ema_values(ema))
    return ema


@pytest.mark.parametrize("width", [300, 1100])
def test_large_and_small_weights_together_match_article(offload, width):
    # Weights of very different sizes in one update, step by step. torch
    # packs them all in one flat buffer by kind, and from 2**20 elements on
    # (width 1100) blends each shadow in place from its weight on the CPU.
    hp = HYPERPARAMETERS["every_3_no_delay"]
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(width, name="small_in"),
            keras.layers.Dense(width, name="large"),
            keras.layers.Dense(1, name="small_out"),
        ],
        name="net",
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    ema = fit_two_epochs_against_oracle(model, hp, {}, offload)
    # A NaN in one weight skips the whole update, on every path.
    before = ema_values(ema)
    kernel = next(w for w in model.weights if w.path == "net/large/kernel")
    poisoned = np.array(ops.convert_to_numpy(kernel.value))
    poisoned[-1, -1] = np.nan
    kernel.assign(poisoned)
    for _ in range(3):  # every 3rd step is due
        ema.update()
    assert ema.skipped_updates == 1
    assert_bit_equal(before, ema_values(ema))


def many_small_weights_model(jit_compile="auto") -> keras.Model:
    # Fourteen weights of up to 25,600 elements, two of them bfloat16: on JAX
    # the small shadows are packed into several float32 arrays of up to 2**15
    # elements, by kind, and the NaN/Inf guard checks each array.
    layers = [keras.Input((6,)), keras.layers.Dense(160, name="d0")]
    layers += [keras.layers.Dense(160, name=f"h{i}") for i in range(4)]
    layers += [
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(1, name="out", dtype="bfloat16"),
    ]
    model = keras.Sequential(layers, name="many")
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=jit_compile
    )
    return model


@pytest.mark.parametrize("jit_compile", ["auto", True], ids=["auto", "xla"])
def test_many_small_weights_with_filters_match_article(offload, jit_compile):
    # Under XLA the bfloat16 weights must be averaged as stored, rounded.
    if jit_compile is True and keras.backend.backend() == "torch":
        pytest.skip("XLA runs on TensorFlow and JAX only.")
    hp = HYPERPARAMETERS["warmup_then_every_step"]
    model = many_small_weights_model(jit_compile)
    extra = dict(
        param_or_buffer_names_no_ema=["many/bn/moving_mean"],
        ignore_names=["many/h1/kernel"],
        ignore_startswith_names=["many/h3/"],
    )
    ema = fit_two_epochs_against_oracle(model, hp, extra, offload)
    assert ema_values(ema)["many/out/kernel"].dtype == np.float32


def ema_after_one_epoch(model, offload):
    """An EMA of every step, after one epoch of `model` on 48 samples, and
    those samples."""
    ema = keras_ema.EMA(
        beta=0.9, update_after_step=0, update_every=1, offload_to_host=offload
    )
    x, y = make_data(48)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    return ema, (x, y)


def test_one_nan_weight_among_many_skips_the_whole_update_in_fit(offload):
    # A NaN moving variance leaves the loss and the trainable weights finite
    # in training (batch statistics are used), so only the guard can see it.
    model = many_small_weights_model()
    ema, (x, y) = ema_after_one_epoch(model, offload)
    before = ema_values(ema)
    variance = next(w for w in model.weights if w.path == "many/bn/moving_variance")
    poisoned = np.array(ops.convert_to_numpy(variance.value))
    poisoned[-1] = np.nan
    variance.assign(poisoned)
    with pytest.warns(UserWarning, match="NaN or infinite"):
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    assert np.isfinite(float_weights(model)["many/h3/kernel"]).all()
    assert ema.skipped_updates == 6
    assert history.history["ema_skipped"][-1] == 6
    assert_bit_equal(before, ema_values(ema))


@pytest.mark.parametrize("poison, skipped", [(np.nan, 6), (1e37, 0)])
def test_guard_on_a_large_weight_in_fit(offload, poison, skipped):
    # A moving variance of over 2**15 elements is checked alone; the loss
    # and trainable weights stay finite in training whatever it holds. Huge
    # finite values overflow a sum of them and must not count as NaN.
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(33_000, name="wide"),
            keras.layers.BatchNormalization(name="bn"),
            # A mean, not a Dense(1) over 33,000 inputs, which SGD diverges on.
            keras.layers.Reshape((33_000, 1)),
            keras.layers.GlobalAveragePooling1D(),
        ],
        name="large",
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    ema, (x, y) = ema_after_one_epoch(model, offload)
    before = ema_values(ema)
    variance = next(w for w in model.weights if w.path == "large/bn/moving_variance")
    variance.assign(np.full(variance.shape, poison, "float32"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    assert ema.skipped_updates == skipped
    warned = any("NaN or infinite" in str(w.message) for w in caught)
    assert warned == bool(skipped)
    after = ema_values(ema)
    if skipped:
        assert_bit_equal(before, after)
    else:
        assert (after["large/bn/moving_variance"] > 1e35).all()


def test_float64_and_float32_weights_in_one_model_match_article(offload):
    # float64 weights keep float64 shadows, the others float32, in one update.
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="wide", dtype="float64"),
            keras.layers.Dense(1, name="narrow"),
        ],
        name="mixed",
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    ema = fit_two_epochs_against_oracle(
        model, HYPERPARAMETERS["every_3_no_delay"], {}, offload
    )
    stored = {w.path: ops.convert_to_numpy(w.value).dtype for w in model.weights}
    assert {path: v.dtype for path, v in ema_values(ema).items()} == stored


@pytest.fixture
def torch_device_flag(monkeypatch):
    """torch's engine deciding the guard as it does on a GPU (a device flag
    and `torch.where`), which on a CPU it decides on the host."""
    if keras.backend.backend() != "torch":
        pytest.skip("torch's engine")
    from keras_ema.backends import torch as torch_engine

    chosen = []

    def on_the_device(groups) -> bool:
        chosen.append(groups)
        return False

    monkeypatch.setattr(torch_engine, "reads_flags_on_host", on_the_device)
    yield
    assert chosen, "the engine did not ask where to read the guard's flag"


def test_torch_guard_on_the_device_with_filters_matches_article(torch_device_flag):
    test_fit_with_filters_matches_article(offload=False)


def test_torch_guard_on_the_device_skips_a_nan_update(torch_device_flag):
    test_one_nan_weight_among_many_skips_the_whole_update_in_fit(offload=False)
