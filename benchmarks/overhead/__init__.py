"""Per-step cost of weight EMA in ``keras.Model.fit``, for one Keras backend.

Twelve modes are timed on synthetic data, for several model shapes:

* ``none``: plain ``fit`` with Adam, no EMA;
* ``builtin``: Keras' own optimizer flag, ``Adam(use_ema=True, ema_momentum=0.999)``;
* ``keras_ema``: ``keras_ema.EMA(update_every=1, update_after_step=0)`` as a callback;
* ``keras_ema_every10``: the same with ``update_every=10``;
* ``keras_ema_offload`` and ``keras_ema_offload_every10``: the two above with
  ``offload_to_host=True`` (shadows in host memory, updated on the CPU);
* ``keras_ema_2profiles`` and ``keras_ema_4profiles``: one callback keeping 2 (4)
  averages, ``keras_ema.EMA(profiles={"p0": ..., "p1": ...})`` of
  ``keras_ema.WarmupSchedule(update_after_step=0, update_every=1, beta=b)`` with
  ``b`` 0.999, 0.9999 (then 0.99, 0.9995);
* ``keras_ema_noguard``: ``keras_ema`` with its NaN/Inf guard replaced by a
  constant (a patch of this benchmark, ``guard_removed``): the difference to
  ``keras_ema`` is what the guard costs;
* ``keras_ema_posthoc``: ``keras_ema.PostHocEMA(sigma_rels=(0.05, 0.10),
  snapshot_every=10)`` into a temporary folder: against ``keras_ema_2profiles``
  (two averages, no snapshots), what its snapshots cost;
* ``keras_ema_teacher`` and ``handwritten_teacher``: a model whose loss adds
  the mean squared difference to its EMA teacher's output on the same batch,
  the teacher being ``ema.averaged_model()`` of a
  ``keras_ema.EMA(schedule=keras_ema.ConstantSchedule(0.999))`` bound to the
  model, or a ``keras.models.clone_model`` blended by an ``assign`` loop in a
  ``train_step`` written for each backend (the keras-io way; see `teachers`).
  Their ratio ``teacher_over_handwritten`` is the EMA's teacher against the
  hand-written one. Their ``params`` count the teacher's weights too.

Warm mode (the default): each measurement builds and compiles a fresh model (same
seed), runs a short warm-up ``fit`` of 12 steps (so that the first tracing and
compilation are not timed), then times one ``fit`` of ``N`` steps (``epochs=1``,
data sized to exactly ``N`` batches, ``verbose=0``) with ``time.perf_counter``. The
clock stops after ``fit`` has returned and the backend's queued work is done (on
JAX, every array the model, its optimizer and the EMA callback hold is blocked on;
TensorFlow and torch run synchronously on CPU). Three numbers come out of that one
timed ``fit``:

* ``ms_per_step``: the whole ``fit`` over ``N``. It includes ``fit``'s fixed costs
  (data adapter, callbacks' ``on_train_begin/end``, Keras' ``finalize_variable_values``
  for the built-in EMA) and anything traced or compiled again in that ``fit``;
* ``steady_ms_per_step``: from the start of batch 3 to the end, over ``N - 3``;
* ``startup_ms``: ``fit``'s set-up plus its first 3 steps.

The modes are interleaved (none, builtin, keras_ema, keras_ema_every10, none, ...)
for ``--repeats`` rounds and the minimum of each number per mode is kept; the ratios
(``keras_ema_over_builtin``, ``keras_ema_over_none``, ``builtin_over_none``,
``every10_over_none``, ``offload_over_keras_ema``, ``offload_over_none``,
``offload_every10_over_none``, ``2profiles_over_builtin``, ``4profiles_over_builtin``)
are computed from those minima, for ``ms_per_step`` at the top level of the JSON and
for ``steady_ms_per_step`` under ``steady_ratios``. So is what each profile adds,
``{K}profiles_marginal`` = ``(kprofiles - none) / (K * (keras_ema - none))`` for
K = 2 and 4: 1 when K profiles cost K times the one of ``keras_ema``, less when they
share work (the weights are read once for all); ``null`` when ``keras_ema`` was not
slower than ``none``.

Memory: ``state_bytes`` is the bytes held in the optimizer's variables plus the
EMA callback's shadow variables (``keras_ema.EMA.variables``) after the timed ``fit``,
so ``state_bytes[mode] - state_bytes["none"]`` is exactly the EMA's shadow copy
(in host memory for the offload modes; 4 bytes per tracked float32 element; the
callback also tracks non-trainable floats such as BatchNormalization statistics,
the built-in EMA only trainable ones). ``EMA.variables`` holds the first profile's
shadows: for the profiles modes that is one profile's copy of K. With ``--rss``,
for each mode one child process builds the model, runs the warm-up and one timed
``fit``, and reports the growth of its peak resident set (``ru_maxrss`` at the end
minus the resident set just before the model was built). That includes compilation
memory, temporaries and allocator noise: read it for big differences only (the
``big_mlp`` shadow is 42 MiB).

Cold mode (``--cold``): what a user's first ``fit`` of a fresh model costs, tracing
and compiling included. Each measurement builds and compiles a fresh model and
creates a fresh callback (neither timed), then times the whole ``fit`` of
``--epochs`` epochs (default 4) of ``--steps`` steps (default 50) with
``time.perf_counter``, until the backend's queued work is done, as above. On JAX the
in-process compilation caches are cleared first (``jax.clear_caches()``), so that
every measurement compiles what a new process would, Keras' small eager ops
included. Before the first shape each mode runs one short untimed cold ``fit``, so
that what a process does only once (lazy imports, thread pools) falls on no mode.
The modes are interleaved for ``--repeats`` rounds and the minimum of each number
per mode is kept:

* ``fit_ms``: the whole ``fit``;
* ``first_step_ms``: up to the end of the first step (set-up, tracing, compiling);
* ``steady_ms_per_step``: from the start of the second epoch to the end of the last,
  per step (with one epoch: from batch 3), as `StepClock` waits for the steps;
* ``end_ms``: from the end of the last epoch to the end (Keras' and the callbacks'
  end of ``fit``, and what they compile there).

Its ratios: each keras_ema mode over ``builtin`` and over ``none``
(``keras_ema_over_builtin``, ``keras_ema_every10_over_none``, ...) and the profiles'
marginal costs, for ``fit_ms`` (``fit_ratios``) and ``steady_ms_per_step``
(``steady_ratios``). On JAX, ``compiles`` lists for each mode's fastest ``fit`` every
function traced, lowered to MLIR and compiled by XLA, with the phase of ``fit`` it
happened in (``setup`` before the first epoch, ``epoch N``, ``end`` after the last
epoch): Keras' ``train_step`` beside the EMA's ``fused_step``, Keras' eager ops, and
what the EMA compiles at the end of ``fit``. The times come from the duration events
of ``jax.monitoring``, the ones behind ``jax_log_compiles``' "Finished tracing /
jaxpr to MLIR module conversion / XLA compilation of ... in ... sec" messages.
``compile_ms`` is their total per mode.

The bandwidth floor (``--floor``, and always for models of over 1M parameters):
what one pass of an EMA update over the model's floating-point weights costs at
best. At the end of every round, in the same process, one in-place lerp
``a = a + w * (b - a)`` over as many float32 elements as the model's float weights
is timed with the backend's own op (JAX: a jitted function of one flat donated
array, blocked on; TensorFlow: ``tf.Variable.assign_add`` in a ``tf.function``,
with XLA when Keras compiles the models with it; torch: ``Tensor.lerp_``), median of
100 after a warm-up; the best round's median is kept. ``floor`` in the JSON holds it
(``lerp_ms``, and ``lerp_gb_per_s`` at 12 bytes an element) and
``(keras_ema - none) / lerp`` for ``ms_per_step`` and ``steady_ms_per_step``
(``steady`` only in the cold mode): how many such passes the EMA's cost per step
is worth. The EMA's update also reads the weights for its NaN/Inf guard: 16 bytes an
element against the lerp's 12, a ratio of 1.33 at the same bandwidth. Without a
strategy, each round also times the update alone on a fresh model of the shape, one
update after each lerp, median of as many (``update_ms``, ``update_over_lerp``):
what a step in ``fit`` runs after Keras' step, as the library's engine provides it
for measurement (``keras_ema.backends.update_timer``, `floor.make_update`): on
TensorFlow the train step's update in a ``tf.function`` of its own, on torch the
engine's step, and on JAX a due step's update jitted on its own over the engine's
packed shadows. The difference of two whole ``fit`` calls cannot resolve a
few ms in steps of 50-300 ms on a noisy machine; this can.

MirroredStrategy (``--strategy mirrored``, TensorFlow only, warm or cold): the CPU is
split into 2 logical devices at start-up, before TensorFlow initialises, and every
model is built and compiled under ``tf.distribute.MirroredStrategy`` over them; the
batch is the global batch (each replica gets half). Modes ``none``, ``builtin`` and
``keras_ema``. The floor, if asked for, is still one lerp on one device.

``other_cpu_s`` is the CPU time that other processes used during a shape's run: the
machine has 2 cores, and numbers taken while it is well above 0 are not comparable.

Usage (one backend per process, from the repository's root)::

    KERAS_BACKEND=jax python -m benchmarks.overhead [--quick] [--shapes a,b]
        [--modes none,builtin,...] [--repeats 5] [--steps N] [--rss] [--floor]
        [--json-out results.jsonl]
    KERAS_BACKEND=jax python -m benchmarks.overhead --cold [--epochs 4] [--steps 50]
        [--shapes a,b] [--modes none,builtin,keras_ema] [--repeats 5] [--floor]
    KERAS_BACKEND=tensorflow python -m benchmarks.overhead --strategy mirrored
        [--cold] [--shapes a,b] [--repeats 5]

Every shape prints a table and one line ``JSON {...}``; ``python -m
benchmarks.overhead.tables`` renders those lines as the tables of
``docs/performance.md``.

The modules: `shapes` (the models), `modes` (how each mode builds its
optimizer and callbacks, and the no-guard patch), `teachers` (the teacher
modes' trainers), `warm`, `cold` (and
`compiles`, JAX's compile times), `floor` (the bandwidth floor and the update
alone), `snapshots` (``PostHocEMA``'s snapshot parts), `ratios`, `timing` and
`environment` (shared helpers), `rss`, `tables` (the docs' tables from the
JSON lines) and `__main__` (the command line).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before Keras is imported
