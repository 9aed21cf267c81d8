"""`ema.recalibrate_batchnorm()`: the statistics of the EMA weights' own
activations, against a NumPy forward pass of the EMA weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import make_data
from conftest import make_model
from keras import ops

import keras_ema


def trained(two_profiles: bool = True):
    """A small MLP with BatchNormalization (Dense(8, relu) -> BN -> Dense(1))
    trained a few steps with an EMA of two profiles, or of one."""
    keras.utils.set_random_seed(0)
    model = make_model()
    if two_profiles:
        ema = keras_ema.EMA(
            profiles={
                "fast": keras_ema.ConstantSchedule(0.5),
                "slow": keras_ema.ConstantSchedule(0.9),
            }
        )
    else:
        ema = keras_ema.EMA(schedule=keras_ema.ConstantSchedule(0.9))
    x, y = make_data(64)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[ema])
    return model, ema, x, y


def by_path(model, values) -> dict:
    """`{path: value}` with the model's name left out of the paths."""
    return {
        w.path.split("/", 1)[1]: np.asarray(v)
        for w, v in zip(model.weights, values, strict=True)
    }


def hidden(weights, x):
    """The BatchNormalization layer's input under `weights` (by path)."""
    kernel, bias = weights["d1/kernel"], weights["d1/bias"]
    return np.maximum(x.astype(np.float64) @ kernel + bias, 0.0)


def forward(weights, x, mean, variance, epsilon):
    h = hidden(weights, x)
    normed = (h - mean) / np.sqrt(variance + epsilon)
    normed = normed * weights["bn/gamma"] + weights["bn/beta"]
    return normed @ weights["d2/kernel"] + weights["d2/bias"]


def online_arrays(model) -> list:
    return [np.array(ops.convert_to_numpy(w.value)) for w in model.weights]


@pytest.mark.parametrize("batch_size", [64, 16, 24])
def test_statistics_are_the_batch_average_of_the_ema_activations(batch_size):
    model, ema, x, _ = trained()
    online = online_arrays(model)
    before_slow = ema.get_weights("slow")
    weights = by_path(model, ema.get_weights("fast"))
    ema.recalibrate_batchnorm(x, batch_size=batch_size, profile="fast")
    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    activations = [hidden(weights, batch) for batch in batches]
    mean = np.mean([a.mean(axis=0) for a in activations], axis=0)
    variance = np.mean([a.var(axis=0) for a in activations], axis=0)
    got = by_path(model, ema.get_weights("fast"))
    np.testing.assert_allclose(got["bn/moving_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        got["bn/moving_variance"], variance, rtol=1e-4, atol=1e-6
    )
    # Nothing else in the shadows, nor the other profile, nor the model.
    for path in weights:
        if not path.startswith("bn/moving"):
            np.testing.assert_array_equal(got[path], weights[path])
    for value, want in zip(ema.get_weights("slow"), before_slow, strict=True):
        np.testing.assert_array_equal(value, want)
    for value, want in zip(online_arrays(model), online, strict=True):
        np.testing.assert_array_equal(value, want)


def test_evaluate_with_the_callback_uses_the_recalibrated_statistics():
    model, ema, x, y = trained(two_profiles=False)
    ema.recalibrate_batchnorm(x, batch_size=len(x))
    weights = by_path(model, ema.get_weights())
    epsilon = model.get_layer("bn").epsilon
    expected = forward(
        weights, x, weights["bn/moving_mean"], weights["bn/moving_variance"], epsilon
    )
    predicted = model.predict(x, verbose=0, callbacks=[ema])
    np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-5)
    loss = model.evaluate(x, y, verbose=0, callbacks=[ema])[0]
    assert loss == pytest.approx(np.mean((expected - y) ** 2), rel=1e-4)
    teacher = ema.averaged_model()
    np.testing.assert_allclose(
        ops.convert_to_numpy(teacher(x)), expected, rtol=1e-4, atol=1e-5
    )


def test_generator_input_and_steps():
    model, ema, x, _ = trained(two_profiles=False)
    weights = by_path(model, ema.get_weights())

    def batches():
        for start in range(0, len(x), 16):
            yield (x[start : start + 16],)

    ema.recalibrate_batchnorm(batches(), steps=2)
    activations = [hidden(weights, x[:16]), hidden(weights, x[16:32])]
    got = by_path(model, ema.get_weights())
    np.testing.assert_allclose(
        got["bn/moving_mean"],
        np.mean([a.mean(axis=0) for a in activations], axis=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_an_interrupt_changes_nothing():
    model, ema, x, _ = trained()
    online, shadows = online_arrays(model), ema.get_weights("fast")

    def interrupted():
        yield (x[:16],)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ema.recalibrate_batchnorm(interrupted(), profile="fast")
    for value, want in zip(online_arrays(model), online, strict=True):
        np.testing.assert_array_equal(value, want)
    for value, want in zip(ema.get_weights("fast"), shadows, strict=True):
        np.testing.assert_array_equal(value, want)
    assert model.get_layer("bn").momentum == 0.99


def test_refusals_name_what_is_wrong():
    model, ema, x, _ = trained()
    with pytest.raises(ValueError, match="medium"):
        ema.recalibrate_batchnorm(x, profile="medium")
    with pytest.raises(ValueError, match="batch_size=0"):
        ema.recalibrate_batchnorm(x, batch_size=0)
    plain = make_model(batch_norm=False)
    plain_ema = keras_ema.EMA()
    plain_ema.set_model(plain)
    with pytest.raises(ValueError, match="no trainable BatchNormalization"):
        plain_ema.recalibrate_batchnorm(x)


@pytest.mark.parametrize("layout", ["data_parallel", "model_parallel"])
def test_under_keras_distribution_on_jax(layout):
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution on JAX only.")
    import test_distribution

    if test_distribution._jax_device_count() < test_distribution.JAX_DEVICES:
        pytest.skip("Needs the virtual JAX devices.")
    keras.distribution.set_distribution(getattr(test_distribution, layout)())
    try:
        model, ema, x, _ = trained(two_profiles=False)
        weights = by_path(model, ema.get_weights())
        ema.recalibrate_batchnorm(x, batch_size=32)
        activations = [hidden(weights, x[:32]), hidden(weights, x[32:])]
        got = by_path(model, ema.get_weights())
        np.testing.assert_allclose(
            got["bn/moving_variance"],
            np.mean([a.var(axis=0) for a in activations], axis=0),
            rtol=1e-4,
            atol=1e-6,
        )
        shadow = dict(zip(ema.tracked_paths, ema.variables, strict=True))
        mean = shadow["net/bn/moving_mean"]
        assert mean.value.sharding == model.get_layer("bn").moving_mean.value.sharding
    finally:
        keras.distribution.set_distribution(None)
