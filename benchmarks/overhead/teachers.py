"""The teacher modes: a model whose loss adds a consistency term against a
teacher called on the same batch, the teacher being an EMA of the model.

* ``keras_ema_teacher``: ``ema.averaged_model()`` of a ``keras_ema.EMA`` bound
  to the student (``ema.set_model(student)``), passed to ``fit`` as a callback;
* ``handwritten_teacher``: the keras-io way, a ``keras.models.clone_model`` of
  the student given the student's weights at the start and blended after each
  optimizer step by an ``assign`` loop in ``train_step``, written for each
  backend.

Both trainers are the same `TeacherTrainer`; only where the teacher comes
from and who blends it differ. Both teachers compute the same average: the
first step's blend copies the student (as the EMA's first update does), then
each step blends with decay ``TEACHER_DECAY``; the teacher called at step
``k`` is the average after step ``k - 1``.
"""

from __future__ import annotations

import contextlib

import keras
from keras import ops

TEACHER_MODES: tuple[str, ...] = ("keras_ema_teacher", "handwritten_teacher")
TEACHER_DECAY = 0.999


class TeacherTrainer(keras.Model):
    """The student's compiled loss plus the mean squared difference of the
    student's output and the teacher's, on the same batch (the teacher in
    inference mode, its output a constant for the gradient)."""

    def __init__(self, student: keras.Model, teacher: keras.Model, **kwargs) -> None:
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher

    def call(self, x, training: bool = False):
        return self.student(x, training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        supervised = super().compute_loss(x, y, y_pred, sample_weight, training)
        target = ops.stop_gradient(self.teacher(x, training=False))
        return supervised + ops.mean(ops.square(y_pred - target))


class HandwrittenTeacherTrainer(TeacherTrainer):
    """`TeacherTrainer` whose ``train_step`` blends the student's float
    weights into its teacher's after the optimizer step."""

    def __init__(self, student: keras.Model, decay: float, **kwargs) -> None:
        teacher = keras.models.clone_model(student)
        # clone_model makes new weights: the teacher starts as the student.
        teacher.set_weights(student.get_weights())
        teacher.trainable = False
        super().__init__(student, teacher, **kwargs)
        self.decay = decay

    def blended(self, teacher_values: list, student_values: list, iterations):
        """The teacher's new values: a copy of the student at the first
        optimizer step, then ``decay * teacher + (1 - decay) * student``."""
        decay = ops.where(ops.greater(iterations, 1), self.decay, 0.0)
        return [
            decay * t + (1.0 - decay) * w
            for t, w in zip(teacher_values, student_values, strict=True)
        ]

    def weight_pairs(self) -> list[tuple[keras.Variable, keras.Variable]]:
        """(teacher, student) weights, the floating-point ones."""
        return [
            (t, w)
            for t, w in zip(self.teacher.weights, self.student.weights, strict=True)
            if keras.backend.is_float_dtype(w.dtype)
        ]

    if keras.backend.backend() == "jax":

        def train_step(self, state, data):
            logs, state = super().train_step(state, data)
            trainable, non_trainable, optimizer_values, metrics = state
            current = {
                id(v): value
                for v, value in zip(self.trainable_variables, trainable, strict=True)
            }
            current.update(
                (id(v), value)
                for v, value in zip(
                    self.non_trainable_variables, non_trainable, strict=True
                )
            )
            iterations = optimizer_values[
                _position(self.optimizer.variables, self.optimizer.iterations)
            ]
            pairs = self.weight_pairs()
            new = self.blended(
                [current[id(t)] for t, _ in pairs],
                [current[id(w)] for _, w in pairs],
                iterations,
            )
            current.update(
                (id(t), value) for (t, _), value in zip(pairs, new, strict=True)
            )
            non_trainable = [current[id(v)] for v in self.non_trainable_variables]
            return logs, (trainable, non_trainable, optimizer_values, metrics)

    else:

        def train_step(self, data):
            logs = super().train_step(data)
            pairs = self.weight_pairs()
            with _no_grad():
                new = self.blended(
                    [t.value for t, _ in pairs],
                    [w.value for _, w in pairs],
                    self.optimizer.iterations.value,
                )
                for (teacher, _), value in zip(pairs, new, strict=True):
                    teacher.assign(value)
            return logs


def _position(variables: list, variable: keras.Variable) -> int:
    """Where `variable` is in `variables` (by identity: `==` on Keras
    variables is an elementwise op)."""
    return next(i for i, v in enumerate(variables) if v is variable)


def _no_grad() -> contextlib.AbstractContextManager:
    """torch: no autograd graph for the blend; other backends: nothing."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def build_trainer(
    student: keras.Model, mode: str, decay: float = TEACHER_DECAY
) -> TeacherTrainer:
    """The trainer of a teacher mode around a built, uncompiled `student`;
    its EMA callback (``keras_ema_teacher``) is in `teacher_callbacks`."""
    if mode == "handwritten_teacher":
        return HandwrittenTeacherTrainer(student, decay)
    if mode != "keras_ema_teacher":
        raise ValueError(f"Unknown teacher mode. Received: mode={mode!r}")
    import keras_ema

    # A copy at the first update, then `decay` at every step.
    ema = keras_ema.EMA(schedule=keras_ema.ConstantSchedule(decay))
    ema.set_model(student)
    trainer = TeacherTrainer(student, ema.averaged_model())
    trainer.teacher_ema = ema  # not a layer or variable: Keras leaves it alone
    return trainer


def teacher_callbacks(trainer: keras.Model) -> list[keras.callbacks.Callback]:
    """The callbacks `trainer`'s ``fit`` passes: its EMA, if it has one."""
    ema = getattr(trainer, "teacher_ema", None)
    return [] if ema is None else [ema]


def teacher_weights(trainer: TeacherTrainer) -> list:
    """The teacher's float weights, as NumPy arrays in the student's order."""
    return [
        ops.convert_to_numpy(t.value)
        for t, w in zip(trainer.teacher.weights, trainer.student.weights, strict=True)
        if keras.backend.is_float_dtype(w.dtype)
    ]
