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
    modes = ("none", "builtin", "keras_ema")
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
