"""`ema.averaged_model()` and `ema.set_model(sub_model)`: a teacher that the
training calls, checked against a NumPy simulation of the same steps."""

from __future__ import annotations

import json
import os
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

import keras_ema

LEARNING_RATE = 0.1
BETA = 0.8


def linear_student(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="linear")], name="student"
    )


def data(n: int = 8):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32")
    return x, y


class MeanTeacher(keras.Model):
    """Supervised MSE plus the MSE to the teacher's output on the same
    batch. `hold`: whether the teacher is an attribute (a sublayer Keras
    tracks) or reached through a closure."""

    def __init__(self, student, teacher, hold: bool, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        if hold:
            self.teacher = teacher
            self.call_teacher = lambda x: self.teacher(x)
        else:
            self.call_teacher = lambda x: teacher(x)

    def call(self, x):
        return self.student(x)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        target = ops.stop_gradient(self.call_teacher(x))
        return ops.mean((y_pred - y) ** 2) + ops.mean((y_pred - target) ** 2)


def simulate(w, b, x, y, steps, batch_size, update_every):
    """The student (SGD on the loss above) and its EMA teacher, step by step:
    the teacher of step k is the average after step k-1; an update when
    `t % update_every == 0`, the first one copying, then
    `teacher = BETA * teacher + (1 - BETA) * student`."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    tw, tb = w.copy(), b.copy()
    updates = 0
    batches = len(x) // batch_size
    for t in range(1, steps + 1):
        start = ((t - 1) % batches) * batch_size
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        pred, target = xb @ w + b, xb @ tw + tb
        grad = 2 * (pred - yb) / pred.size + 2 * (pred - target) / pred.size
        w, b = w - LEARNING_RATE * xb.T @ grad, b - LEARNING_RATE * grad.sum(0)
        if t % update_every == 0:
            updates += 1
            if updates == 1:
                tw, tb = w.copy(), b.copy()
            else:
                tw = BETA * tw + (1 - BETA) * w
                tb = BETA * tb + (1 - BETA) * b
    return (w, b), (tw, tb)


def make_trainer(hold: bool, update_every: int = 1):
    student = linear_student()
    ema = keras_ema.EMA(
        schedule=keras_ema.ConstantSchedule(BETA, update_every=update_every)
    )
    ema.set_model(student)
    teacher = ema.averaged_model()
    trainer = MeanTeacher(student, teacher, hold)
    trainer.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
    return student, ema, teacher, trainer


def numpy_weights(model) -> list:
    return [np.asarray(ops.convert_to_numpy(w.value)) for w in model.weights]


@pytest.mark.parametrize("update_every", [1, 3])
@pytest.mark.parametrize("hold", [True, False], ids=["attribute", "closure"])
def test_teacher_in_compiled_fit_matches_simulation(hold, update_every):
    student, ema, teacher, trainer = make_trainer(hold, update_every)
    x, y = data()
    w0, b0 = numpy_weights(student)
    trainer.fit(x, y, batch_size=4, epochs=5, shuffle=False, verbose=0, callbacks=[ema])
    (w, b), (tw, tb) = simulate(w0, b0, x, y, 10, 4, update_every)
    got_w, got_b = numpy_weights(student)
    np.testing.assert_allclose(got_w, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, b, rtol=1e-5, atol=1e-6)
    teacher_w, teacher_b = numpy_weights(teacher)
    np.testing.assert_allclose(teacher_w, tw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(teacher_b, tb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        ops.convert_to_numpy(teacher(x)), x @ tw + tb, rtol=1e-5, atol=1e-5
    )
    if hold:
        # Keras tracks it: its weights are the trainer's non-trainable ones.
        ids = {id(v) for v in trainer.non_trainable_weights}
        assert all(id(v) in ids for v in teacher.weights)
        assert not any(
            v is w for v in trainer.trainable_weights for w in teacher.weights
        )


def test_teacher_between_steps_in_a_callback_is_current():
    student, ema, teacher, trainer = make_trainer(hold=False)
    x, y = data()
    w0, b0 = numpy_weights(student)
    seen = []

    class Sample(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(np.asarray(ops.convert_to_numpy(teacher(x[:2]))))

    trainer.fit(
        x,
        y,
        batch_size=4,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[Sample(), ema],
    )
    for step, output in enumerate(seen, start=1):
        _, (tw, tb) = simulate(w0, b0, x, y, step, 4, 1)
        np.testing.assert_allclose(output, x[:2] @ tw + tb, rtol=1e-5, atol=1e-5)


def test_update_outside_fit_moves_the_averaged_model():
    model = linear_student()
    ema = keras_ema.EMA(schedule=keras_ema.ConstantSchedule(BETA))
    ema.set_model(model)
    teacher = ema.averaged_model()
    x, _ = data()
    rng = np.random.default_rng(3)
    w, b = numpy_weights(model)
    tw, tb = w.astype(np.float64), b.astype(np.float64)
    for step in range(1, 6):
        w = w + rng.normal(size=w.shape).astype("float32")
        b = b + rng.normal(size=b.shape).astype("float32")
        model.set_weights([w, b])
        ema.update()
        if step == 1:
            tw, tb = w.astype(np.float64), b.astype(np.float64)
        else:
            tw, tb = BETA * tw + (1 - BETA) * w, BETA * tb + (1 - BETA) * b
        np.testing.assert_allclose(
            ops.convert_to_numpy(teacher(x)), x @ tw + tb, rtol=1e-5, atol=1e-5
        )


def test_averaged_model_shares_and_stays_frozen():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="hidden")(inputs)
    normed = keras.layers.BatchNormalization(name="norm")(hidden)
    outputs = keras.layers.Dense(2, name="head")(normed)
    model = keras.Model(inputs, outputs, name="net")
    before = numpy_weights(model)
    ema = keras_ema.EMA(ignore_names=["head/bias"], update_after_step=0)
    ema.set_model(model)
    teacher = ema.averaged_model()
    assert teacher is ema.averaged_model()
    assert teacher.trainable_weights == []
    assert len(teacher.weights) == len(model.weights)
    shadows = dict(zip(ema.tracked_paths, ema.variables, strict=True))
    for mine, online in zip(teacher.weights, model.weights, strict=True):
        if online.path == "head/bias":
            assert mine is online  # left out by the filter: the online one
        else:
            assert mine is shadows[online.path]
    # Its first values are the online weights (no fresh initialisation).
    for value, expected in zip(numpy_weights(teacher), before, strict=True):
        np.testing.assert_array_equal(value, expected)
    # Called in training mode, its BatchNormalization stays in inference.
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    teacher(x, training=True)
    for value, expected in zip(numpy_weights(teacher), before, strict=True):
        np.testing.assert_array_equal(value, expected)
    # The online model keeps training its own weights.
    assert len(model.trainable_weights) == 6


def test_integer_weights_are_the_tracked_models_own():
    class Counter(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], 2))
            self.count = self.add_weight(
                shape=(), dtype="int32", initializer="zeros", trainable=False
            )

        def call(self, x):
            return ops.matmul(x, self.kernel) + ops.cast(self.count, x.dtype)

    model = keras.Sequential([keras.Input((3,)), Counter()])
    ema = keras_ema.EMA()
    ema.set_model(model)
    teacher = ema.averaged_model()
    counter = model.layers[0]
    assert teacher.layers[0].count is counter.count
    counter.count.assign(5)
    x = np.ones((1, 3), "float32")
    np.testing.assert_allclose(
        ops.convert_to_numpy(teacher(x)), ops.convert_to_numpy(model(x)), rtol=1e-6
    )


def test_each_profile_has_its_own_averaged_model():
    model = linear_student()
    ema = keras_ema.EMA(
        profiles={
            "fast": keras_ema.ConstantSchedule(0.5),
            "slow": keras_ema.ConstantSchedule(0.9),
        }
    )
    ema.set_model(model)
    fast, slow = ema.averaged_model("fast"), ema.averaged_model("slow")
    assert fast is ema.averaged_model() and fast is not slow
    w, b = numpy_weights(model)
    for step in range(3):
        model.set_weights([w + step + 1, b + step + 1])
        ema.update()
    np.testing.assert_allclose(numpy_weights(fast)[1], ema.get_weights("fast")[1])
    np.testing.assert_allclose(numpy_weights(slow)[1], ema.get_weights("slow")[1])
    assert not np.allclose(numpy_weights(fast)[1], numpy_weights(slow)[1])
    with pytest.raises(ValueError, match="medium"):
        ema.averaged_model("medium")


def test_refused_setups():
    model = linear_student()
    offloaded = keras_ema.EMA(offload_to_host=True)
    offloaded.set_model(model)
    with pytest.raises(ValueError, match="offload_to_host=True"):
        offloaded.averaged_model()
    with pytest.raises(ValueError, match="no model yet"):
        keras_ema.EMA().averaged_model()


def test_fit_of_a_model_without_the_bound_one_names_both():
    student = linear_student()
    ema = keras_ema.EMA()
    ema.set_model(student)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="other")
    other.compile(optimizer="sgd", loss="mse")
    x, y = data()
    with pytest.raises(ValueError, match="'student'.*'other'"):
        other.fit(x, y, epochs=1, verbose=0, callbacks=[ema])
    # Nothing changed: the EMA still averages the student.
    assert ema.tracked_model is student


def test_bound_student_is_validated_and_swapped_inside_the_trainer():
    student, ema, teacher, trainer = make_trainer(hold=True)
    x, y = data()
    history = trainer.fit(
        x,
        y,
        batch_size=4,
        epochs=3,
        shuffle=False,
        verbose=0,
        validation_data=(x, y),
        callbacks=[ema],
    )
    online = numpy_weights(student)
    with ema.swap_weights() as swapped:
        assert swapped is student
        np.testing.assert_array_equal(numpy_weights(student)[0], ema.get_weights()[0])
        expected = trainer.evaluate(x, y, verbose=0)
    assert history.history["val_ema_loss"][-1] == pytest.approx(expected, rel=1e-5)
    for value, before in zip(numpy_weights(student), online, strict=True):
        np.testing.assert_array_equal(value, before)
    assert trainer.evaluate(x, y, verbose=0, callbacks=[ema]) == pytest.approx(
        expected, rel=1e-6
    )


def test_interrupted_swap_leaves_student_and_teacher(tmp_path):
    student, ema, teacher, trainer = make_trainer(hold=True)
    x, y = data()
    trainer.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema])
    online, averaged = numpy_weights(student), numpy_weights(teacher)
    with pytest.raises(KeyboardInterrupt), ema.swap_weights():
        raise KeyboardInterrupt
    for got, want in zip(
        numpy_weights(student) + numpy_weights(teacher), online + averaged, strict=True
    ):
        np.testing.assert_array_equal(got, want)

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.fit(
            x,
            y,
            batch_size=4,
            epochs=1,
            verbose=0,
            validation_data=(x, y),
            callbacks=[ema, Interrupt()],
        )
    # The step before the interrupt trained both; the student is online.
    assert not np.array_equal(numpy_weights(student)[0], online[0])
    ema_now = ema.get_weights()
    for got, want in zip(numpy_weights(teacher), ema_now, strict=True):
        np.testing.assert_array_equal(got, want)


def test_saved_averaged_model_loads_without_keras_ema(tmp_path):
    student, ema, teacher, trainer = make_trainer(hold=True)
    x, y = data()
    trainer.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema])
    path = os.path.join(tmp_path, "ema.keras")
    teacher.save(path)
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
    assert "keras_ema" not in config
    json.loads(config)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(teacher(x)), rtol=1e-6
    )
    for got, want in zip(numpy_weights(loaded), ema.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_trainer_weights_files_carry_teacher_and_ema_state(tmp_path):
    student, ema, teacher, trainer = make_trainer(hold=True)
    x, y = data()
    trainer.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema])
    path = os.path.join(tmp_path, "trainer.weights.h5")
    trainer.save_weights(path)
    saved_teacher, saved_step = numpy_weights(teacher), ema.step
    trainer.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema])
    assert ema.step != saved_step
    trainer.load_weights(path)
    assert ema.step == saved_step
    for got, want in zip(numpy_weights(teacher), saved_teacher, strict=True):
        np.testing.assert_array_equal(got, want)


def test_backup_and_restore_resumes_as_if_uninterrupted(tmp_path):
    x, y = data()

    def run(callbacks_extra, epochs, trainer_parts=None):
        student, ema, teacher, trainer = trainer_parts or make_trainer(hold=True)
        trainer(x[:1])  # BackupAndRestore needs a built model.
        trainer.fit(
            x,
            y,
            batch_size=4,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[ema, *callbacks_extra],
        )
        return student, ema, teacher, trainer

    student, _, teacher, _ = run([], 4)
    expected = numpy_weights(student) + numpy_weights(teacher)

    backup = os.path.join(tmp_path, "backup")

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        run([keras.callbacks.BackupAndRestore(backup), Crash()], 4)
    student, _, teacher, _ = run([keras.callbacks.BackupAndRestore(backup)], 4)
    got = numpy_weights(student) + numpy_weights(teacher)
    for value, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7)


def test_averaged_model_made_during_fit_joins_the_update():
    student = linear_student()
    ema = keras_ema.EMA(schedule=keras_ema.ConstantSchedule(BETA))
    student.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse")
    x, y = data()
    made = []

    class MakeTeacher(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                made.append(ema.averaged_model())

    student.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[ema, MakeTeacher()])
    assert ema.step == 6
    for got, want in zip(numpy_weights(made[0]), ema.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_ema_model_checkpoint_saves_the_trainer_with_its_student_averaged(tmp_path):
    student, ema, teacher, trainer = make_trainer(hold=True)
    x, y = data()
    path = os.path.join(tmp_path, "trainer.weights.h5")
    checkpoint = keras_ema.EMAModelCheckpoint(ema, path, save_weights_only=True)
    trainer.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ema, checkpoint])
    online = numpy_weights(student)
    trainer.load_weights(path)
    np.testing.assert_array_equal(numpy_weights(student)[0], ema.get_weights()[0])
    assert not np.array_equal(online[0], ema.get_weights()[0])


def test_swap_inside_a_compiled_step_is_refused():
    student, ema, teacher, _ = make_trainer(hold=True)

    class Swapping(keras.Model):
        def __init__(self, student):
            super().__init__()
            self.student = student

        def call(self, x):
            with ema.swap_weights():
                return self.student(x)

    model = Swapping(student)
    model.compile(optimizer="sgd", loss="mse")
    x, y = data()
    online = numpy_weights(student)
    if keras.backend.backend() == "torch":
        pytest.skip("torch runs the step eagerly: the swap works there.")
    with pytest.raises(ValueError, match="averaged_model"):
        model.fit(x, y, epochs=1, verbose=0)
    for got, want in zip(numpy_weights(student), online, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("hold", [True, False], ids=["attribute", "closure"])
def test_teacher_in_validation_and_evaluate_is_current(hold):
    student, ema, teacher, trainer = make_trainer(hold)
    x, y = data()

    def expected_loss():
        pred = ops.convert_to_numpy(student(x))
        target = ops.convert_to_numpy(teacher(x))
        return np.mean((pred - y) ** 2) + np.mean((pred - target) ** 2)

    expected = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            expected.append(expected_loss())

    history = trainer.fit(
        x,
        y,
        batch_size=4,
        epochs=3,
        verbose=0,
        validation_data=(x, y),
        callbacks=[Record(), ema],
    )
    np.testing.assert_allclose(history.history["val_loss"], expected, rtol=1e-5)
    for _ in range(2):
        trainer.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema])
        assert trainer.evaluate(x, y, verbose=0) == pytest.approx(
            expected_loss(), rel=1e-5
        )


def test_another_ema_of_the_trainer_leaves_the_teacher_out():
    student, ema, teacher, trainer = make_trainer(hold=True)
    x, y = data()
    trainer(x[:1])
    whole = keras_ema.EMA()
    whole.set_model(trainer)
    assert whole.tracked_paths == ema.tracked_paths
    assert all(v is not w for v in whole.variables for w in teacher.weights)
