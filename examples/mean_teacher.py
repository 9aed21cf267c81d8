"""Mean teacher: semi-supervised classification with an EMA teacher.

Scikit-learn's handwritten digits (8x8 images, 10 classes) with the labels of
only 10% of the training images. A student MLP learns from the labelled
images with cross-entropy and, on every training image (labelled or not),
from a consistency loss: the squared difference between its softmax output
and that of its teacher, each seeing the image with its own random shift (up
to a pixel) and Gaussian noise (Tarvainen and Valpola, 2017, "Mean teachers
are better role models"; the consistency weight ramps up as in the paper).
The teacher is the EMA of the student, ``ema.averaged_model()`` with
``ConstantSchedule(0.99)``: a Keras model of the student's architecture
whose weights are the EMA's shadows, called in the trainer's
``compute_loss`` and updated by the EMA after every optimizer step of
``fit``. The trainer is a ``keras.Model`` that holds the student and the
teacher; ``ema.set_model(student)`` makes the EMA average the student alone.

Per seed (the seed also draws which images are labelled), the same student
trains twice: with the consistency loss and without it (the student alone,
on the labelled images, with the same shifts and noise). The script prints
the test accuracy of each student and of its EMA, and their mean and
standard deviation over the seeds::

    KERAS_BACKEND=jax python examples/mean_teacher.py --seeds 0 1 2 3 4

``--schedule cosine`` uses ``CosineSchedule(0.99, 1.0)`` (BYOL's momentum)
for the teacher instead. ``--quick`` runs a few epochs of one seed, as CI
does. The script only uses ``keras`` and ``keras.ops``, so it runs on every
Keras backend.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import layers
from keras import ops
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_ema

LABELLED_FRACTION = 0.1
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
INPUT_NOISE = 0.1
CONSISTENCY = 1.0
# Each labelled image appears this many more times in an epoch, so that
# about half of every batch is labelled.
REPEAT_LABELLED = 9
# The consistency weight rises over this fraction of training.
RAMPUP = 0.3
SCHEDULES = {
    "constant": lambda: keras_ema.ConstantSchedule(0.99),
    "cosine": lambda: keras_ema.CosineSchedule(0.99, 1.0),
}


@dataclass
class Data:
    """Digits scaled to [0, 1]; `y_train` is -1 where the label is hidden."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(seed: int) -> Data:
    """A fixed 70/30 train/test split; the seed picks the labelled 10% of
    the training images (stratified: as many of each class)."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    labelled, _ = train_test_split(
        np.arange(len(y_train)),
        train_size=LABELLED_FRACTION,
        random_state=seed,
        stratify=y_train,
    )
    hidden = np.full_like(y_train, -1)
    hidden[labelled] = y_train[labelled]
    return Data(x_train, hidden.astype("int32"), x_test, y_test.astype("int32"))


def build_student() -> keras.Model:
    """64 -> 256 ReLU -> Dropout -> 256 ReLU -> Dropout -> 10 logits."""
    return keras.Sequential(
        [
            keras.Input(shape=(64,)),
            layers.Dense(256, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(256, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(10),
        ],
        name="student",
    )


class MeanTeacher(keras.Model):
    """Trains `student`: cross-entropy on the labelled images (`y >= 0`),
    plus `consistency` times the squared distance between the student's and
    the teacher's softmax outputs on every image, a weight that ramps up
    over `rampup_steps`. Each network sees the images with its own shift and
    noise; the teacher is not trained."""

    def __init__(
        self,
        student: keras.Model,
        teacher: keras.Model,
        consistency: float,
        seed: int,
        rampup_steps: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.consistency = consistency
        self.rampup_steps = rampup_steps
        # Counts the training steps for the ramp-up (the optimizer's own
        # counter is not part of the state `compute_loss` sees on JAX).
        self.steps = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="steps"
        )
        self.noise_seed = keras.random.SeedGenerator(seed)

    def noisy(self, x):
        """`x` shifted by up to a pixel in each direction, plus Gaussian
        noise: each image its own draw."""
        images = ops.pad(ops.reshape(x, (-1, 8, 8)), ((0, 0), (1, 1), (1, 1)))
        shifts = ops.stack(
            [images[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3)],
            axis=1,
        )
        pick = keras.random.randint(ops.shape(x)[:1], 0, 9, seed=self.noise_seed)
        shifted = ops.einsum("bk,bkhw->bhw", ops.one_hot(pick, 9), shifts)
        noise = keras.random.normal((ops.shape(x)[0], 64), seed=self.noise_seed)
        return ops.reshape(shifted, (-1, 64)) + INPUT_NOISE * noise

    def rampup(self):
        """The sigmoid ramp-up of the mean teacher's paper, from 0 to 1."""
        progress = ops.minimum(self.steps / self.rampup_steps, 1.0)
        return ops.exp(-5.0 * ops.square(1.0 - progress))

    def call(self, x, training=False):
        if training:
            x = self.noisy(x)
        return self.student(x, training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        labelled = ops.cast(ops.greater_equal(y, 0), "float32")
        cross_entropy = keras.losses.sparse_categorical_crossentropy(
            ops.maximum(y, 0), y_pred, from_logits=True
        )
        loss = ops.sum(cross_entropy * labelled) / ops.maximum(ops.sum(labelled), 1.0)
        if self.consistency:
            # The teacher of step k is the EMA after step k - 1.
            teacher_logits = self.teacher(self.noisy(x), training=False)
            gap = ops.softmax(y_pred) - ops.softmax(teacher_logits)
            if training:
                self.steps.assign_add(1.0)
            weight = self.consistency * self.rampup()
            loss = loss + weight * ops.mean(ops.sum(ops.square(gap), -1))
        return loss


def accuracy(model: keras.Model, data: Data) -> float:
    logits = model.predict(data.x_test, batch_size=512, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == data.y_test))


def train(
    data: Data, seed: int, epochs: int, consistency: float, schedule: str
) -> dict[str, float]:
    """Trains one student; returns the test accuracies of the student and of
    its EMA (the teacher)."""
    keras.utils.set_random_seed(seed)
    student = build_student()
    ema = keras_ema.EMA(schedule=SCHEDULES[schedule]())
    ema.set_model(student)
    teacher = ema.averaged_model()
    x, y = data.x_train, data.y_train
    labelled = np.flatnonzero(y >= 0)
    x = np.concatenate([x] + [x[labelled]] * REPEAT_LABELLED)
    y = np.concatenate([y] + [y[labelled]] * REPEAT_LABELLED)
    steps = epochs * int(np.ceil(len(x) / BATCH_SIZE))
    trainer = MeanTeacher(
        student, teacher, consistency, seed, rampup_steps=max(1, int(RAMPUP * steps))
    )
    trainer.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE))
    trainer.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=True,
        callbacks=[ema],
        verbose=0,
    )
    return {"student": accuracy(student, data), "ema": accuracy(teacher, data)}


def mean_std(values: list[float]) -> str:
    return f"{100 * np.mean(values):5.1f} +- {100 * np.std(values):4.1f}"


def print_table(results: dict[str, list[dict[str, float]]], seeds: list[int]) -> None:
    print(f"\nTest accuracy (%), mean +- std over seed(s) {seeds}:")
    print(f"{'training':>24} | {'student':>12} | {'EMA':>12}")
    for name, runs in results.items():
        student = mean_std([r["student"] for r in runs])
        ema = mean_std([r["ema"] for r in runs])
        print(f"{name:>24} | {student:>12} | {ema:>12}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default="constant",
        help="the teacher's momentum: CosineSchedule(0.99, 1.0) or "
        "ConstantSchedule(0.99)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one seed, 5 epochs (CI's size)"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 5
    return args


def main() -> None:
    args = parse_args()
    print(f"Keras {keras.version()}, backend {keras.backend.backend()}")
    print(f"schedule {args.schedule}, {args.epochs} epochs")
    results: dict[str, list[dict[str, float]]] = {
        "student alone": [],
        "mean teacher": [],
    }
    for seed in args.seeds:
        data = load_data(seed)
        for name, weight in (("student alone", 0.0), ("mean teacher", CONSISTENCY)):
            run = train(data, seed, args.epochs, weight, args.schedule)
            results[name].append(run)
            print(
                f"seed {seed}, {name:>13}: student {100 * run['student']:.1f}%, "
                f"EMA {100 * run['ema']:.1f}%"
            )
    print_table(results, args.seeds)


if __name__ == "__main__":
    main()
