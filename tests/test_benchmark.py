"""The benchmark (`benchmarks/overhead/`) runs, and its tables render.

A smoke test: one tiny warm run on the current backend, with the floor and
the update alone, and the markdown tables of `python -m
benchmarks.overhead.tables` on its JSON line and on a small fixture of every
field the tables read. The update alone, `keras_ema.backends.update_timer`,
is checked against the article's `update()` (`oracle.ArticleEMA`).
"""

from __future__ import annotations

import json
import pathlib

import keras
import numpy as np
import pytest
from conftest import assert_close
from conftest import ema_values
from conftest import float_weights
from conftest import make_data
from conftest import make_model
from oracle import ArticleEMA

import keras_ema
from keras_ema.backends import update_timer

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKEND = keras.backend.backend()


@pytest.fixture
def benchmark(monkeypatch):
    """The `benchmarks.overhead` package, importable from the repository."""
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.overhead.__main__ as command
    import benchmarks.overhead.tables as tables

    return command, tables


@pytest.mark.parametrize(
    "hyperparameters",
    [
        dict(beta=0.9, update_after_step=0, update_every=1),
        dict(beta=0.99, update_after_step=3, update_every=1, power=0.75),
    ],
    ids=["no_delay", "warmup"],
)
def test_update_timer_runs_the_article_update(hyperparameters):
    model = make_model()
    ema = keras_ema.EMA(**hyperparameters)
    ema.set_model(model)
    run_update = update_timer(ema)
    oracle = ArticleEMA(float_weights(model), **hyperparameters)
    rng = np.random.default_rng(1)
    for _ in range(6):
        for weight in model.weights:
            if keras.backend.is_float_dtype(weight.dtype):
                noise = rng.normal(scale=0.1, size=weight.shape).astype("float32")
                weight.assign(keras.ops.convert_to_numpy(weight.value) + noise)
        assert run_update() is None
        oracle.update(float_weights(model))
    assert ema.step == oracle.step
    assert_close(oracle.ema, ema_values(ema))


@pytest.mark.skipif(
    BACKEND != "jax" or len(keras.distribution.list_devices()) < 4,
    reason="a model sharded over 4 JAX devices",
)
def test_update_timer_keeps_jax_shardings():
    mesh = keras.distribution.DeviceMesh(
        (2, 2), ["batch", "model"], keras.distribution.list_devices()[:4]
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*d1/kernel"] = (None, "model")
    layout_map[".*d2/kernel"] = ("model", None)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    hyperparameters = dict(beta=0.9, update_after_step=0, update_every=1)
    with distribution.scope():
        model = make_model(batch_norm=False)
        ema = keras_ema.EMA(**hyperparameters)
        ema.set_model(model)
        oracle = ArticleEMA(float_weights(model), **hyperparameters)
        run_update = update_timer(ema)
        for _ in range(3):
            run_update()
            oracle.update(float_weights(model))
        assert_close(oracle.ema, ema_values(ema))
        weights = [w for w in model.weights if w.path.endswith("kernel")]
        shadows = [s for s in ema.variables if s.path.endswith("kernel")]
        for shadow, weight in zip(shadows, weights, strict=True):
            assert shadow.value.sharding.is_equivalent_to(
                weight.value.sharding, weight.value.ndim
            )


def test_update_timer_needs_a_model():
    with pytest.raises(ValueError, match="set_model"):
        update_timer(keras_ema.EMA())


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_warm_run_with_floor_writes_a_json_line(benchmark, tmp_path, capsys):
    command, tables = benchmark
    out = tmp_path / "warm.jsonl"
    modes = "none,keras_ema"
    argv = ["--shapes", "article_mlp", "--modes", modes, "--repeats", "1"]
    argv += ["--steps", "5", "--floor", "--json-out", str(out)]
    assert command.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[" + BACKEND + "] article_mlp" in printed
    assert "the update alone:" in printed
    (line,) = out.read_text().splitlines()
    result = json.loads(line)
    assert result["backend"] == BACKEND
    assert result["shape"] == "article_mlp"
    assert set(result["ms_per_step"]) == set(modes.split(","))
    assert result["floor"]["update_ms"] > 0
    assert result["floor"]["elements"] == result["params"]
    assert "keras_ema_over_none" in result
    for kind in ("floor",):
        tables.main([kind, str(out)])
        rendered = _lines(capsys.readouterr().out)
        assert len(rendered) == 3, kind  # header, rule, one shape
        assert rendered[2].startswith("| article_mlp |")


TEACHER_MODES = "handwritten_teacher,keras_ema_teacher"


def test_teacher_modes_run_warm_and_cold(benchmark, tmp_path, capsys):
    command, tables = benchmark
    warm, cold = tmp_path / "warm.jsonl", tmp_path / "cold.jsonl"
    argv = ["--shapes", "article_mlp", "--modes", TEACHER_MODES, "--repeats", "1"]
    assert command.main([*argv, "--steps", "5", "--json-out", str(warm)]) == 0
    cold_argv = ["--cold", "--epochs", "1", "--steps", "5", "--json-out", str(cold)]
    assert command.main([*argv, *cold_argv]) == 0
    capsys.readouterr()
    warm_result = json.loads(warm.read_text())
    cold_result = json.loads(cold.read_text())
    assert set(warm_result["ms_per_step"]) == set(TEACHER_MODES.split(","))
    assert warm_result["teacher_over_handwritten"] > 0
    assert cold_result["fit_ratios"]["teacher_over_handwritten"] > 0
    tables.main(["teacher", str(warm), str(cold)])
    rendered = _lines(capsys.readouterr().out)
    assert len(rendered) == 4  # header, rule, warm, cold
    assert rendered[2].startswith(f"| {BACKEND} | article_mlp | ms/step |")
    assert rendered[3].startswith(f"| {BACKEND} | article_mlp | first fit ms |")


def _fit_teacher(benchmark, mode: str, recorder=None):
    """A teacher mode's trainer around conftest's small model (its
    BatchNormalization statistics blended too), fitted 2 epochs of 8 steps
    with SGD and decay 0.9."""
    from benchmarks.overhead.teachers import build_trainer
    from benchmarks.overhead.teachers import teacher_callbacks

    keras.utils.set_random_seed(0)
    student = make_model(compile=False)
    trainer = build_trainer(student, mode, decay=0.9)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = make_data()
    callbacks = teacher_callbacks(trainer) + ([recorder] if recorder else [])
    trainer.fit(
        x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=callbacks
    )
    return trainer


class _StudentRecorder(keras.callbacks.Callback):
    """The student's float weights after every step."""

    def __init__(self):
        super().__init__()
        self.after_step = []

    def on_train_batch_end(self, batch, logs=None):
        self.after_step.append(list(float_weights(self.model.student).values()))


def test_handwritten_teacher_is_the_numpy_average(benchmark):
    from benchmarks.overhead.teachers import teacher_weights

    recorder = _StudentRecorder()
    trainer = _fit_teacher(benchmark, "handwritten_teacher", recorder)
    # A copy after the first step, then decay 0.9 at every step.
    expected = recorder.after_step[0]
    for student in recorder.after_step[1:]:
        expected = [0.9 * t + 0.1 * w for t, w in zip(expected, student, strict=True)]
    assert len(recorder.after_step) == 16
    assert_close(dict(enumerate(expected)), dict(enumerate(teacher_weights(trainer))))


def test_both_teachers_compute_the_same(benchmark):
    """The benchmark compares equals: after the same steps on the same data
    the hand-written teacher and the EMA's averaged model hold the same
    weights, and so do the students they taught."""
    from benchmarks.overhead.teachers import teacher_weights

    trainers = [_fit_teacher(benchmark, mode) for mode in TEACHER_MODES.split(",")]
    handwritten, keras_ema_side = (
        (dict(enumerate(teacher_weights(t))), float_weights(t.student))
        for t in trainers
    )
    assert_close(handwritten[0], keras_ema_side[0])
    assert_close(
        dict(enumerate(handwritten[1].values())),
        dict(enumerate(keras_ema_side[1].values())),
    )


def test_command_refuses_unknown_modes(benchmark):
    command, _ = benchmark
    with pytest.raises(SystemExit, match="bad --modes"):
        command.main(["--modes", "none,no_such_mode"])


def _warm_line(shape: str, scale: float) -> dict:
    # Importable once the `benchmark` fixture has put the repository first.
    from benchmarks.overhead.modes import MODES

    ms = {mode: scale * (1.0 + 0.1 * i) for i, mode in enumerate(MODES)}
    parts = ("block", "device", "wait", "sync", "averages", "buffers", "write")
    return {
        "backend": "jax",
        "shape": shape,
        "params": 1234,
        "variables": 4,
        "ms_per_step": ms,
        "steady_ms_per_step": {m: 0.9 * t for m, t in ms.items()},
        "floor": {
            "elements": 1234,
            "lerp_ms": 0.01,
            "lerp_gb_per_s": 1.5,
            "ms_per_step_ema_over_lerp": 10.0,
            "steady_ema_over_lerp": 9.0,
            "update_ms": 0.02,
            "update_over_lerp": 2.0,
        },
        "snapshot_ms": {**dict.fromkeys(parts, 0.5), "count": 3},
    }


def _cold_line(shape: str, scale: float) -> dict:
    modes = ("none", "builtin", "keras_ema", "handwritten_teacher", "keras_ema_teacher")
    fit = {mode: scale * (100.0 + 10 * i) for i, mode in enumerate(modes)}
    entry = {"trace_ms": 1.0, "lower_ms": 2.0, "compile_ms": 3.0, "compiles": 1}
    return {
        "backend": "jax",
        "shape": shape,
        "cold": True,
        "fit_ms": fit,
        "first_step_ms": {m: t / 2 for m, t in fit.items()},
        "steady_ms_per_step": {m: t / 100 for m, t in fit.items()},
        "end_ms": dict.fromkeys(modes, 5.0),
        "compile_ms": dict.fromkeys(modes, 6.0),
        "compiles": {
            "builtin": [{**entry, "phase": "setup", "function": "train_step"}],
            "keras_ema": [
                {**entry, "phase": "setup", "function": "fused_step"},
                {**entry, "phase": "end", "function": "flush"},
            ],
        },
    }


def _write(path: pathlib.Path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


WARM_KINDS = ("warm", "profiles", "guard", "floor", "posthoc", "snapshots")


@pytest.mark.parametrize("kind", [*WARM_KINDS, "offload"])
def test_tables_of_warm_lines(benchmark, tmp_path, capsys, kind):
    _, tables = benchmark
    lines = [_warm_line("a", 1.0), _warm_line("b", 2.0)]
    tables.main([kind, _write(tmp_path / "warm.jsonl", lines)])
    rendered = _lines(capsys.readouterr().out)
    assert [row.split(" | ")[0] for row in rendered[2:]] == ["| a", "| b"]
    assert all(row.count("|") == rendered[0].count("|") for row in rendered)


@pytest.mark.parametrize("kind", ["cold", "compiles"])
def test_tables_of_cold_lines(benchmark, tmp_path, capsys, kind):
    _, tables = benchmark
    tables.main([kind, _write(tmp_path / "cold.jsonl", [_cold_line("a", 1.0)])])
    rendered = _lines(capsys.readouterr().out)
    assert len(rendered) == 3
    # every10 was not run: its cells are "-".
    assert " - " in rendered[2]


def test_teacher_table_of_warm_and_cold_lines(benchmark, tmp_path, capsys):
    _, tables = benchmark
    warm = _write(tmp_path / "warm.jsonl", [_warm_line("a", 1.0), _warm_line("b", 1.0)])
    cold = _write(tmp_path / "cold.jsonl", [_cold_line("a", 1.0)])
    tables.main(["teacher", warm, cold])
    rendered = _lines(capsys.readouterr().out)
    assert [row.split(" | ")[1:3] for row in rendered[2:]] == [
        ["a", "ms/step"],
        ["b", "ms/step"],
        ["a", "first fit ms"],
    ]
    assert rendered[2].endswith("| 2.100 | 2.000 | 0.95 (0.95) |")
    assert rendered[4].endswith("| 130 | 140 | 1.08 (1.08) |")


def test_tables_compare_warm_and_cold(benchmark, tmp_path, capsys):
    _, tables = benchmark
    before = _write(tmp_path / "before.jsonl", [_warm_line("a", 1.0)])
    after = _write(tmp_path / "after.jsonl", [_warm_line("a", 0.5)])
    tables.main(["compare", before, after])
    rendered = _lines(capsys.readouterr().out)
    assert "keras_ema ms/step, before / after" in rendered[0]
    assert "| a | 1.200 / 0.600 |" in rendered[2]
    before = _write(tmp_path / "cold-before.jsonl", [_cold_line("a", 1.0)])
    after = _write(tmp_path / "cold-after.jsonl", [_cold_line("a", 2.0)])
    tables.main(["compare", before, after])
    rendered = _lines(capsys.readouterr().out)
    assert "keras_ema fit ms, before / after" in rendered[0]
    assert "| a | 120 / 240 |" in rendered[2]


def test_tables_compare_cold_without_jax_compiles(benchmark, tmp_path, capsys):
    _, tables = benchmark
    lines = []
    for scale in (1.0, 2.0):
        line = _cold_line("a", scale)
        del line["compile_ms"], line["compiles"]
        lines.append(line)
    before = _write(tmp_path / "before.jsonl", lines[:1])
    after = _write(tmp_path / "after.jsonl", lines[1:])
    tables.main(["compare", before, after])
    rendered = _lines(capsys.readouterr().out)
    assert "| a | 120 / 240 | 1.09 / 1.09 | - / - |" in rendered[2]
