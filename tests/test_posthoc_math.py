"""Post-hoc EMA: the math against an independent transcription, the snapshot
files, and `PostHocRun` (NumPy only, except `synthesize_into`)."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import assert_bit_equal
from conftest import make_model
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_ema
from keras_ema import posthoc
from keras_ema.posthoc import format as snapshot_format
from keras_ema.posthoc import reader

GAMMA = {0.05: 16.972198602303447, 0.07: 11.244939447857924, 0.10: 6.937203937601809}
TRACKED = (0.05, 0.10)


@pytest.fixture(autouse=True)
def clear_session():
    """Overrides the Keras session reset of conftest.py: only the
    `synthesize_into` tests use Keras, and they ask for `keras_session`."""
    yield


@pytest.fixture
def keras_session():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


# ----------------------------------------------------------------------------
# An independent transcription of the article's math, in plain Python floats


def oracle_inner(t_a, g_a, t_b, g_b):
    """`<p_a, p_b>` written as the integral's closed form over [0, min(t)]:
    `(g_a+1)(g_b+1) / (t_a t_b) * m**(g_a+g_b+1) / (t_a**g_a t_b**g_b (g_a+g_b+1))`
    with `m = min(t_a, t_b)`, rearranged as ratios only."""
    m = min(t_a, t_b)
    scale = (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * t_a * t_b)
    return scale * m * (m / t_a) ** g_a * (m / t_b) ** g_b


def oracle_coefficients(in_steps, in_gammas, out_step, out_gamma):
    used = [i for i, t in enumerate(in_steps) if t <= out_step]
    a = np.array(
        [
            [
                oracle_inner(in_steps[i], in_gammas[i], in_steps[j], in_gammas[j])
                for j in used
            ]
            for i in used
        ]
    )
    b = np.array(
        [oracle_inner(in_steps[i], in_gammas[i], out_step, out_gamma) for i in used]
    )
    x = np.linalg.solve(a, b)
    x /= x.sum()
    full = np.zeros(len(in_steps))
    full[used] = x
    return full


def profile(t, step, gamma):
    """The averaging profile `p(tau)` of a power-function EMA at `step`."""
    t = np.asarray(t, dtype=np.float64)
    return np.where(t <= step, (gamma + 1) / step * (t / step) ** gamma, 0.0)


def quadrature_error(in_steps, in_gammas, x, out_step, out_gamma):
    """Relative L2 distance of `sum x_i p_i` to `p_r`, by Gauss-Legendre on
    each interval between consecutive snapshot times (the profiles are smooth
    there)."""
    nodes, weights = np.polynomial.legendre.leggauss(60)
    edges = sorted({0, *[t for t in in_steps if t <= out_step], out_step})
    squared = norm = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        tau = (nodes + 1) / 2 * (high - low) + low
        w = weights * (high - low) / 2
        target = profile(tau, out_step, out_gamma)
        mixed = sum(
            xi * profile(tau, t, g)
            for xi, t, g in zip(x, in_steps, in_gammas, strict=True)
        )
        squared += np.sum(w * (mixed - target) ** 2)
        norm += np.sum(w * target**2)
    return math.sqrt(squared / norm)


def interleaved(n, spacing=4096):
    steps = [spacing * i for i in range(1, n + 1) for _ in TRACKED]
    return steps, list(TRACKED) * n


# ----------------------------------------------------------------------------
# The math


def test_gamma_golden_values_and_reexports():
    assert posthoc.sigma_rel_to_gamma(0.05) == pytest.approx(GAMMA[0.05], rel=1e-13)
    assert posthoc.sigma_rel_to_gamma(0.10) == pytest.approx(GAMMA[0.10], rel=1e-13)
    assert posthoc.sigma_rel_to_gamma(0.07) == pytest.approx(GAMMA[0.07], rel=1e-13)
    assert posthoc.gamma_to_sigma_rel(GAMMA[0.05]) == pytest.approx(0.05, rel=1e-13)
    from keras_ema import schedule

    assert posthoc.sigma_rel_to_gamma is schedule.sigma_rel_to_gamma
    assert posthoc.gamma_to_sigma_rel is schedule.gamma_to_sigma_rel
    assert keras_ema.PostHocRun is posthoc.PostHocRun


@pytest.mark.parametrize(
    ("out_step", "out_sigma_rel"),
    [(32768, 0.07), (32768, 0.15), (32768, 0.03), (20480, 0.07), (4096, 0.08)],
)
def test_coefficients_match_independent_transcription(out_step, out_sigma_rel):
    steps, sigma_rels = interleaved(8)
    gammas = [GAMMA[s] for s in sigma_rels]
    out_gamma = posthoc.sigma_rel_to_gamma(out_sigma_rel)
    expected = oracle_coefficients(steps, gammas, out_step, out_gamma)
    actual = posthoc.solve_coefficients(steps, sigma_rels, out_step, out_sigma_rel)
    assert actual.dtype == np.float64 and actual.shape == (16,)
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-11)
    assert actual.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(actual[np.array(steps) > out_step] == 0.0)


def test_target_equal_to_a_stored_profile_returns_it():
    steps, sigma_rels = interleaved(8)
    for index, (step, sigma_rel) in enumerate(zip(steps, sigma_rels, strict=True)):
        x = posthoc.solve_coefficients(steps, sigma_rels, step, sigma_rel)
        one_hot = np.zeros(len(steps))
        one_hot[index] = 1.0
        np.testing.assert_allclose(x, one_hot, atol=1e-9)
        assert posthoc.reconstruction_error(steps, sigma_rels, step, sigma_rel) < 1e-6


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 10**7), st.sampled_from([0.03, 0.05, 0.1, 0.2])),
        min_size=1,
        max_size=24,
        unique=True,
    ),
    st.floats(0.02, 0.28),
    st.data(),
)
def test_coefficients_sum_to_one_and_skip_later_snapshots(snapshots, target, data):
    steps = [s for s, _ in snapshots]
    sigma_rels = [s for _, s in snapshots]
    out_step = data.draw(st.sampled_from(steps))
    x = posthoc.solve_coefficients(steps, sigma_rels, out_step, target)
    later = np.array(steps) > out_step
    assert np.all(x[later] == 0.0)
    assert np.isfinite(x).all()
    assert x.sum() == pytest.approx(1.0, abs=1e-9)
    earlier = [i for i in range(len(steps)) if not later[i]]
    alone = posthoc.solve_coefficients(
        [steps[i] for i in earlier], [sigma_rels[i] for i in earlier], out_step, target
    )
    np.testing.assert_array_equal(x[earlier], alone)


def test_narrow_profiles_do_not_overflow():
    # gamma(0.01) is about 97: 1e6 ** 97 overflows float64, the ratios do not.
    assert posthoc.sigma_rel_to_gamma(0.01) > 90
    steps = [250_000 * i for i in range(1, 5) for _ in range(2)]
    sigma_rels = [0.01, 0.02] * 4
    x = posthoc.solve_coefficients(steps, sigma_rels, 1_000_000, 0.01)
    expected = np.zeros(8)
    expected[6] = 1.0
    np.testing.assert_allclose(x, expected, atol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_sigma_rels": [0.05, 0.0]}, "in_sigma_rels"),
        ({"in_sigma_rels": [0.05, 12**-0.5]}, "in_sigma_rels"),
        ({"in_sigma_rels": [0.05, float("nan")]}, "in_sigma_rels"),
        ({"in_sigma_rels": [0.05, float("inf")]}, "in_sigma_rels"),
        ({"in_sigma_rels": [0.05, 0.3]}, "in_sigma_rels"),
        ({"in_sigma_rels": [0.05, True]}, "in_sigma_rels"),
        ({"out_sigma_rel": -0.1}, "out_sigma_rel"),
        ({"out_sigma_rel": float("nan")}, "out_sigma_rel"),
        ({"in_steps": [0, 10]}, "in_steps"),
        ({"in_steps": [10, -1]}, "in_steps"),
        ({"in_steps": [10, 20.0]}, "in_steps"),
        ({"in_steps": [10, True]}, "in_steps"),
        ({"in_steps": []}, "in_steps"),
        ({"in_steps": [10]}, "same length"),
        ({"out_step": 0}, "out_step"),
        ({"out_step": 20.0}, "out_step"),
        ({"out_step": 5}, "out_step"),
    ],
)
def test_bad_arguments_are_refused(kwargs, name):
    arguments = dict(
        in_steps=[10, 20], in_sigma_rels=[0.05, 0.1], out_step=20, out_sigma_rel=0.07
    )
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=name):
        posthoc.solve_coefficients(**arguments)


def test_integral_float_arrays_of_steps_are_accepted():
    # EDM2 passes its steps as float arrays: `np.repeat(steps, 2) * 1.0`.
    steps = np.arange(1, 9) * 4096
    sigma_rels = list(TRACKED) * 8
    as_ints = posthoc.solve_coefficients(np.repeat(steps, 2), sigma_rels, 20480, 0.07)
    for floats in (np.repeat(steps, 2) * 1.0, np.repeat(steps, 2).astype("float32")):
        np.testing.assert_array_equal(
            posthoc.solve_coefficients(floats, sigma_rels, 20480, 0.07), as_ints
        )
        assert posthoc.reconstruction_error(
            floats, sigma_rels, 20480, 0.07
        ) == posthoc.reconstruction_error(np.repeat(steps, 2), sigma_rels, 20480, 0.07)
    for bad in (4096.5, np.nan, np.inf, -4096.0, 0.0):
        floats = np.repeat(steps, 2) * 1.0
        floats[3] = bad
        with pytest.raises(ValueError, match=re.escape(f"in_steps[3]={bad!r}")):
            posthoc.solve_coefficients(floats, sigma_rels, 20480, 0.07)


@pytest.mark.parametrize(("n", "expected"), [(8, 1.3e-2), (32, 9.8e-4), (64, 2.5e-4)])
def test_reconstruction_error_matches_published_figures(n, expected):
    steps, sigma_rels = interleaved(n)
    error = posthoc.reconstruction_error(steps, sigma_rels, steps[-1], 0.07)
    assert error == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize(("n", "target"), [(8, 0.07), (8, 0.15), (16, 0.03)])
def test_reconstruction_error_matches_quadrature(n, target):
    steps, sigma_rels = interleaved(n)
    gammas = [GAMMA[s] for s in sigma_rels]
    x = posthoc.solve_coefficients(steps, sigma_rels, steps[-1], target)
    expected = quadrature_error(
        steps, gammas, x, steps[-1], posthoc.sigma_rel_to_gamma(target)
    )
    error = posthoc.reconstruction_error(steps, sigma_rels, steps[-1], target)
    assert error == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------
# The power-function EMA recursion, synthesized without Keras


def power_ema_weights(t_end, gamma):
    """The weight of `x_t` in the recursion's average at `t_end`:
    `(1 - beta_t) * prod_{s > t} beta_s`, `beta_t = (1 - 1/t) ** (gamma + 1)`."""
    t = np.arange(1, t_end + 1, dtype=np.float64)
    log_beta = (gamma + 1) * np.log1p(-1 / t[1:])
    later = np.concatenate([np.cumsum(log_beta[::-1])[::-1], [0.0]])
    one_minus_beta = np.concatenate([[1.0], -np.expm1(log_beta)])
    return one_minus_beta * np.exp(later)


def test_discrete_weights_integrate_the_profile():
    # The bound in the next test rests on this identity: the recursion's
    # average is exactly the integral of the profile against the signal held
    # constant on each step, so profile errors translate into average errors.
    t_end = 1000
    for gamma in GAMMA.values():
        t = np.arange(1, t_end + 1, dtype=np.float64)
        integral = (t / t_end) ** (gamma + 1) - ((t - 1) / t_end) ** (gamma + 1)
        np.testing.assert_allclose(
            power_ema_weights(t_end, gamma), integral, rtol=1e-9, atol=1e-300
        )


def test_synthesis_reproduces_a_simulated_power_ema(tmp_path):
    steps_total, every, width = 4096, 128, 64
    rng = np.random.default_rng(1)
    signal = np.cumsum(rng.normal(size=(steps_total, width)), axis=0)
    gammas = np.array([GAMMA[0.05], GAMMA[0.10], GAMMA[0.07]])[:, None]
    ema = np.zeros((3, width))
    stored = []
    for t in range(1, steps_total + 1):
        beta = (1 - 1 / t) ** (gammas + 1)
        ema = beta * ema + (1 - beta) * signal[t - 1]
        if t % every == 0:
            posthoc.write_snapshot(
                tmp_path, t, TRACKED, 1, {"x": [ema[0], ema[1]]}, {}, "f", "r"
            )
            stored.append(ema[:2].copy())
    direct = ema[2]
    run = posthoc.PostHocRun(tmp_path)
    assert run.steps == list(range(every, steps_total + 1, every))
    synthesized = run.synthesize(0.07)["x"].astype(np.float64)

    # |synthesized - direct| = |integral of (sum_i c_i p_i - p_r) x~| <=
    # ||sum_i c_i p_i - p_r|| ||x~|| (Cauchy-Schwarz), with
    # ||sum c_i p_i - p_r|| = error * ||p_r|| and ||x~||^2 = sum_t x_t^2;
    # plus float32 rounding of the snapshots (sum |c_i| 2**-24 max |snapshot|)
    # and of the result.
    error = run.reconstruction_error(0.07)
    gamma = GAMMA[0.07]
    profile_norm = math.sqrt((gamma + 1) ** 2 / ((2 * gamma + 1) * steps_total))
    signal_norm = np.sqrt(np.sum(signal**2, axis=0))
    coefficients = run.coefficients(0.07)
    rounding = (
        np.abs(coefficients).sum() * np.abs(np.array(stored)).max(axis=(0, 1))
        + np.abs(direct)
    ) * 2.0**-24
    bound = error * profile_norm * signal_norm + rounding
    assert np.all(np.abs(synthesized - direct) <= bound)
    # The bound is tight enough to tell the tracked profiles from the target.
    scale = np.abs(direct).mean()
    assert bound.max() < 0.01 * scale
    for tracked in (ema[0], ema[1]):
        assert np.mean(np.abs(tracked - direct) > bound) > 0.5


# ----------------------------------------------------------------------------
# Snapshot files


def write(directory, step, seed=0, dtype="float32", **overrides):
    rng = np.random.default_rng(seed + step)
    arguments = dict(
        sigma_rels=TRACKED,
        update_every=1,
        averaged={
            "d/kernel": [rng.normal(size=(3, 2)).astype("float32") for _ in TRACKED],
            "d/bias": [rng.normal(size=(2,)).astype("float32") for _ in TRACKED],
        },
        buffers={
            "bn/mean": rng.normal(size=(2,)).astype("float32"),
            "seed": np.array([step, 7], dtype=np.int64),
        },
        fingerprint="model-a",
        run_id="run-1",
        dtype=dtype,
    )
    arguments.update(overrides)
    return Path(posthoc.write_snapshot(directory, step, **arguments)), arguments


@pytest.fixture
def three_snapshots(tmp_path):
    folder = tmp_path / "run"
    arguments = {step: write(folder, step)[1] for step in (100, 200, 300)}
    return folder, arguments


def test_round_trip_float32(tmp_path):
    path, arguments = write(tmp_path, 1234)
    assert path.name == "snapshot-000000001234.npz"
    snapshot = posthoc.read_snapshot(path)
    assert snapshot.step == 1234 and snapshot.sigma_rels == TRACKED
    header = snapshot.header
    assert header["gammas"] == [GAMMA[0.05], GAMMA[0.10]]
    assert header["fingerprint"] == "model-a" and header["run_id"] == "run-1"
    assert header["update_every"] == 1 and header["snapshot_dtype"] == "float32"
    assert [
        (v["path"], v["kind"], v["shape"], v["dtype"]) for v in header["variables"]
    ] == [
        ("d/kernel", "averaged", [3, 2], "float32"),
        ("d/bias", "averaged", [2], "float32"),
        ("bn/mean", "buffer", [2], "float32"),
        ("seed", "buffer", [2], "int64"),
    ]
    for name, values in arguments["averaged"].items():
        for got, expected in zip(snapshot.averaged[name], values, strict=True):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, expected)
    for name, value in arguments["buffers"].items():
        assert snapshot.buffers[name].dtype == value.dtype
        np.testing.assert_array_equal(snapshot.buffers[name], value)


def test_round_trip_float16_and_bfloat16(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for dtype, numpy_dtype in (
        ("float16", np.float16),
        ("bfloat16", ml_dtypes.bfloat16),
    ):
        path, arguments = write(tmp_path / dtype, 10, dtype=dtype)
        snapshot = posthoc.read_snapshot(path)
        assert snapshot.header["snapshot_dtype"] == dtype
        for name, values in arguments["averaged"].items():
            for got, value in zip(snapshot.averaged[name], values, strict=True):
                expected = value.astype(numpy_dtype).astype(np.float32)
                np.testing.assert_array_equal(got, expected)
        # Buffers are stored in their own dtype, not the snapshot's.
        np.testing.assert_array_equal(
            snapshot.buffers["bn/mean"], arguments["buffers"]["bn/mean"]
        )


def test_bfloat16_rounding_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array(
        [
            0,
            0x00000001,
            0x007FFFFF,
            0x3F808000,
            0x3F818000,
            0x3F80FFFF,
            0x7F7FFFFF,
            0x7F800000,
            0xFF800000,
            0x80000000,
            0x7F7F8000,
            0x7F7F7FFF,
        ],
        dtype=np.uint32,
    )
    values = np.concatenate([bits, special]).view(np.float32)
    finite = values[~np.isnan(values)]
    ours = snapshot_format._bfloat16_bits(finite)
    expected = finite.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(ours, expected)
    nans = values[np.isnan(values)]
    assert np.isnan(
        snapshot_format._bfloat16_to_float32(snapshot_format._bfloat16_bits(nans))
    ).all()


def test_bfloat16_buffers_round_trip(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    value = np.array([1.5, -2.25, 3e38], dtype=ml_dtypes.bfloat16)
    path, _ = write(tmp_path, 5, buffers={"b": value})
    snapshot = posthoc.read_snapshot(path)
    assert snapshot.header["variables"][-1]["dtype"] == "bfloat16"
    np.testing.assert_array_equal(snapshot.buffers["b"], value.astype(np.float32))


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (
            {
                "dtype": "float16",
                "averaged": {"w": [np.float32([7e4]), np.float32([1])]},
            },
            "dtype",
        ),
        ({"dtype": "float64"}, "dtype"),
        ({"sigma_rels": (0.05, 0.05)}, "sigma_rels"),
        ({"sigma_rels": ()}, "sigma_rels"),
        ({"sigma_rels": (0.05, 0.4)}, "sigma_rels"),
        ({"update_every": 0}, "update_every"),
        ({"fingerprint": ""}, "fingerprint"),
        ({"run_id": None}, "run_id"),
        ({"averaged": {"w": [np.zeros(2)]}}, "one array per profile"),
        ({"averaged": {"w": [np.zeros(2), np.zeros(3)]}}, "one shape"),
        ({"averaged": {"w": [np.zeros(2, int), np.zeros(2, int)]}}, "floating"),
        ({"averaged": {"w": np.zeros((2, 2))}}, "list of arrays"),
        ({"buffers": {"b": np.array([object()])}}, "numeric"),
        ({"buffers": {"d/bias": np.zeros(2)}}, "share a path"),
    ],
)
def test_writer_refuses_bad_input_and_writes_nothing(tmp_path, overrides, name):
    with pytest.raises(ValueError, match=name):
        write(tmp_path, 10, **overrides)
    assert not (tmp_path / "snapshot-000000000010.npz").exists()
    for step in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="step"):
            posthoc.write_snapshot(tmp_path, step, TRACKED, 1, {}, {}, "f", "r")
    assert [p for p in tmp_path.iterdir() if p.is_file()] == []


def test_write_is_atomic(tmp_path, monkeypatch):
    path, arguments = write(tmp_path, 10)
    original = path.read_bytes()

    def crash(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 10, seed=1)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 20)
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == [path.name]


def test_leftover_temporary_files_are_ignored(three_snapshots):
    folder, _ = three_snapshots
    (folder / ".snapshot-000000000400.npz.0123456789abcdef.tmp").write_bytes(b"PK")
    (folder / "notes.txt").write_text("not ours")
    assert posthoc.PostHocRun(folder).steps == [100, 200, 300]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_file_mode_respects_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path, _ = write(tmp_path, 10)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_or_empty_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        posthoc.PostHocRun(tmp_path / "missing")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        posthoc.PostHocRun(tmp_path)
    (tmp_path / "other.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="holds none"):
        posthoc.PostHocRun(tmp_path)


def assert_refused(folder, culprit):
    with pytest.raises(ValueError) as info:
        posthoc.PostHocRun(folder).synthesize(0.07)
    assert str(culprit) in str(info.value)


def test_pickled_files_are_refused(three_snapshots):
    folder, _ = three_snapshots
    culprit = folder / "snapshot-000000000200.npz"
    with open(culprit, "wb") as file:
        pickle.dump({"header": "x"}, file)
    assert_refused(folder, culprit)


def test_object_entries_are_refused(three_snapshots):
    folder, _ = three_snapshots
    culprit = folder / "snapshot-000000000200.npz"
    with np.load(culprit) as archive:
        entries = {name: archive[name] for name in archive.files}
    entries["buffer_3"] = np.array([object(), object()], dtype=object)
    np.savez(culprit, **entries)
    assert_refused(folder, culprit)


def header_of(path):
    return reader.read_header(str(path))


def rewrite_header(path, change):
    with np.load(path) as archive:
        entries = {name: archive[name] for name in archive.files}
    header = header_of(path)
    change(header)
    entries["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **entries)


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h.update(format="keras-ema-state"),
        lambda h: h.update(version=2),
        lambda h: h.update(step=201),
        lambda h: h.update(gammas=[1.0, 2.0]),
        lambda h: h.update(snapshot_dtype="float64"),
        lambda h: h["variables"][0].update(shape=[2, 3]),
        lambda h: h["variables"][0].update(kind="buffer"),
        lambda h: h["variables"][3].update(dtype="int32"),
        lambda h: h.pop("run_id"),
    ],
)
def test_foreign_or_inconsistent_headers_are_refused(three_snapshots, change):
    folder, _ = three_snapshots
    culprit = folder / "snapshot-000000000200.npz"
    rewrite_header(culprit, change)
    assert_refused(folder, culprit)


@pytest.mark.parametrize(
    ("overrides", "what"),
    [
        ({"sigma_rels": (0.05, 0.2)}, "sigma_rels"),
        ({"fingerprint": "model-b"}, "fingerprint"),
        ({"run_id": "run-2"}, "run"),
        ({"buffers": {"bn/mean": np.zeros(2, np.float32)}}, "variables"),
    ],
)
def test_snapshots_of_another_run_are_refused(three_snapshots, overrides, what):
    folder, _ = three_snapshots
    culprit, _ = write(folder, 400, **overrides)
    with pytest.raises(ValueError, match=what) as info:
        posthoc.PostHocRun(folder)
    assert str(culprit) in str(info.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("snapshot-000000000200.npz", "npy"),
        ("snapshot-000000000200.npz", "no-header"),
        ("snapshot-000000000200.npz", "empty"),
        ("snapshot-200.npz", "copy"),
        ("snapshot-0000000000200.npz", "copy"),
    ],
)
def test_foreign_files_are_refused(three_snapshots, name, content):
    folder, _ = three_snapshots
    culprit = folder / name
    source = folder / "snapshot-000000000300.npz"
    if content == "npy":
        with open(culprit, "wb") as file:
            np.save(file, np.zeros(3))
    elif content == "no-header":
        np.savez(culprit, a=np.zeros(3))
    elif content == "empty":
        culprit.write_bytes(b"")
    else:
        culprit.write_bytes(source.read_bytes())
    assert_refused(folder, culprit)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    for step in (100, 200, 300):
        write(folder, step)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    return files, posthoc.PostHocRun(folder).synthesize(0.07)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_truncated_or_flipped_files_are_refused_or_read_identically(
    clean_run, tmp_path, data
):
    files, expected = clean_run
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    for name, content in files.items():
        (folder / name).write_bytes(content)
    name = data.draw(st.sampled_from(sorted(files)))
    good = files[name]
    if data.draw(st.booleans()):
        bad = good[: data.draw(st.integers(0, len(good) - 1))]
    else:
        position = data.draw(st.integers(0, len(good) - 1))
        flip = data.draw(st.integers(1, 255))
        bad = good[:position] + bytes([good[position] ^ flip]) + good[position + 1 :]
    (folder / name).write_bytes(bad)
    try:
        actual = posthoc.PostHocRun(folder).synthesize(0.07)
    except ValueError as error:
        assert str(folder / name) in str(error)
    else:
        assert actual.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(actual[key], expected[key])


# ----------------------------------------------------------------------------
# PostHocRun


def test_run_attributes(three_snapshots):
    folder, _ = three_snapshots
    run = keras_ema.PostHocRun(folder)
    assert run.steps == [100, 200, 300]
    assert run.sigma_rels == TRACKED
    assert run.run_id == "run-1" and run.fingerprint == "model-a"
    assert run.update_every == 1
    assert run.paths == ["d/kernel", "d/bias", "bn/mean", "seed"]


@pytest.mark.parametrize("step", [None, 200, 100])
def test_synthesize_mixes_snapshots_in_float64(three_snapshots, step):
    folder, arguments = three_snapshots
    run = posthoc.PostHocRun(folder)
    weights = run.synthesize(0.07, step=step)
    step = 300 if step is None else step
    used = [s for s in (100, 200, 300) if s <= step]
    in_steps = [s for s in used for _ in TRACKED]
    x = posthoc.solve_coefficients(in_steps, list(TRACKED) * len(used), step, 0.07)
    np.testing.assert_array_equal(run.coefficients(0.07, step)[: len(used)].ravel(), x)
    assert list(weights) == run.paths
    for name in ("d/kernel", "d/bias"):
        values = [v for s in used for v in arguments[s]["averaged"][name]]
        expected = sum(c * v.astype(np.float64) for c, v in zip(x, values, strict=True))
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], expected.astype(np.float32))
    for name, value in arguments[step]["buffers"].items():
        assert weights[name].dtype == value.dtype
        np.testing.assert_array_equal(weights[name], value)


def test_target_equal_to_a_tracked_profile_returns_the_snapshot(three_snapshots):
    folder, arguments = three_snapshots
    weights = posthoc.PostHocRun(folder).synthesize(0.10, step=200)
    np.testing.assert_allclose(
        weights["d/kernel"], arguments[200]["averaged"]["d/kernel"][1], atol=1e-6
    )


@pytest.mark.parametrize("step", [150, 0, 300.0, "300"])
def test_step_must_be_a_snapshot_step(three_snapshots, step):
    run = posthoc.PostHocRun(three_snapshots[0])
    for call in (run.synthesize, run.reconstruction_error, run.coefficients):
        with pytest.raises(ValueError, match="`step` must be one of"):
            call(0.07, step=step)


def test_bad_targets_are_refused(three_snapshots):
    run = posthoc.PostHocRun(three_snapshots[0])
    for value in (0.0, 0.3, float("nan"), None):
        with pytest.raises(ValueError, match="sigma_rel"):
            run.synthesize(value)
        with pytest.raises(ValueError, match="sigma_rel"):
            run.sweep([0.07, value], lambda w: 0.0)


def range_warnings(recorded):
    return [w for w in recorded if "tracked range" in str(w.message)]


def test_targets_outside_the_tracked_range_warn_once(three_snapshots, recwarn):
    run = posthoc.PostHocRun(three_snapshots[0])
    run.synthesize(0.07)
    run.synthesize(0.05)
    assert range_warnings(recwarn) == []
    error = run.reconstruction_error(0.2)
    with pytest.warns(UserWarning, match=f"{error:.3g}") as warned:
        run.synthesize(0.2)
    assert "0.2" in str(warned[0].message)
    recwarn.clear()
    run.synthesize(0.2)
    run.sweep([0.2, 0.07], lambda w: 0.0)
    assert range_warnings(recwarn) == []
    with pytest.warns(UserWarning, match="0.03"):
        run.sweep([0.03], lambda w: 0.0)


def test_reconstruction_error_of_the_run(three_snapshots):
    run = posthoc.PostHocRun(three_snapshots[0])
    steps = [s for s in (100, 200) for _ in TRACKED]
    assert run.reconstruction_error(0.08, step=200) == posthoc.reconstruction_error(
        steps, list(TRACKED) * 2, 200, 0.08
    )


def test_sweep_reads_each_file_once(three_snapshots, monkeypatch):
    folder, _ = three_snapshots
    run = posthoc.PostHocRun(folder)
    targets = [0.06, 0.07, 0.08, 0.09]
    expected = {t: run.synthesize(t) for t in targets}
    loads = []
    load = np.load

    def counting_load(file, *args, **kwargs):
        # A path, or the file `atomic.open_npz` opened.
        loads.append(os.path.basename(getattr(file, "name", file)))
        return load(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", counting_load)
    seen = []

    def evaluate(weights):
        seen.append(weights)
        return float(np.sum(weights["d/kernel"] ** 2))

    result = run.sweep(targets, evaluate)
    assert sorted(loads) == sorted(os.listdir(folder))
    assert result.sigma_rels == tuple(targets)
    for target, weights in zip(targets, seen, strict=True):
        for key, value in expected[target].items():
            np.testing.assert_array_equal(weights[key], value)
    scores = [float(np.sum(expected[t]["d/kernel"] ** 2)) for t in targets]
    assert result.scores == tuple(scores)
    assert result.best == targets[int(np.argmin(scores))]
    assert result.best_score == min(scores)
    maximum = run.sweep(targets, evaluate, mode="max")
    assert maximum.best == targets[int(np.argmax(scores))]

    loads.clear()
    run.sweep(targets, evaluate, step=200)
    assert sorted(loads) == ["snapshot-000000000100.npz", "snapshot-000000000200.npz"]


def test_sweep_evaluates_nothing_when_a_file_is_corrupt(three_snapshots):
    folder, _ = three_snapshots
    run = posthoc.PostHocRun(folder)
    culprit = folder / "snapshot-000000000300.npz"
    content = bytearray(culprit.read_bytes())
    # A byte inside the first averaged array's data, after its npy header.
    magic = content.index(b"\x93NUMPY", content.index(b"averaged_0_0.npy"))
    header_length = int.from_bytes(content[magic + 8 : magic + 10], "little")
    content[magic + 10 + header_length + 1] ^= 0xFF
    culprit.write_bytes(bytes(content))
    calls = []
    with pytest.raises(ValueError, match=re.escape(str(culprit))):
        run.sweep([0.06, 0.08], lambda weights: calls.append(1) or 0.0)
    assert calls == []


@pytest.mark.parametrize(
    ("evaluate", "mode", "match"),
    [
        ("not callable", "min", "evaluate"),
        (lambda w: "low", "min", "number"),
        (lambda w: None, "min", "number"),
        (lambda w: 0.0, "best", "mode"),
    ],
)
def test_sweep_refuses_bad_arguments(three_snapshots, evaluate, mode, match):
    run = posthoc.PostHocRun(three_snapshots[0])
    with pytest.raises(ValueError, match=match):
        run.sweep([0.07], evaluate, mode=mode)


def test_plot_marks_tracked_and_best(three_snapshots):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = posthoc.PostHocRun(three_snapshots[0])
    sigma_rels = [0.09, 0.05, 0.07, 0.06]
    scores = [3.0, 2.0, 0.5, 1.0]
    ax = run.plot(sigma_rels, scores)
    best = [line for line in ax.lines if line.get_marker() == "*"]
    assert len(best) == 1
    assert list(best[0].get_xdata()) == [0.07] and list(best[0].get_ydata()) == [0.5]
    vertical = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert sorted(line.get_xdata()[0] for line in vertical) == list(TRACKED)
    curve = ax.lines[0]
    assert list(curve.get_xdata()) == sorted(sigma_rels)
    _, axes = plt.subplots()
    assert run.plot(sigma_rels, scores, ax=axes, mode="max") is axes
    assert [line for line in axes.lines if line.get_marker() == "*"][0].get_xdata()[
        0
    ] == 0.09
    plt.close("all")
    with pytest.raises(ValueError, match="same length"):
        run.plot([0.05], [1.0, 2.0])


# ----------------------------------------------------------------------------
# synthesize_into (Keras)


def snapshot_model(model, folder, strip_model_name=True):
    """Writes three snapshots of random values shaped like `model`'s."""
    rng = np.random.default_rng(0)

    def path_of(variable):
        return variable.path.split("/", 1)[1] if strip_model_name else variable.path

    for step in (10, 20, 30):
        averaged = {
            path_of(v): [rng.normal(size=v.shape).astype("float32") for _ in TRACKED]
            for v in model.trainable_weights
        }
        buffers = {
            path_of(v): keras.ops.convert_to_numpy(v.value) + step
            for v in model.non_trainable_weights
        }
        posthoc.write_snapshot(
            folder,
            step,
            TRACKED,
            1,
            averaged,
            buffers,
            posthoc.model_fingerprint(model.weights),
            "run",
        )


def current_weights(model):
    return {v.path: keras.ops.convert_to_numpy(v.value).copy() for v in model.weights}


@pytest.mark.parametrize("strip_model_name", [True, False])
def test_synthesize_into_assigns_by_path(keras_session, tmp_path, strip_model_name):
    model = make_model()
    snapshot_model(model, tmp_path, strip_model_name)
    run = keras_ema.PostHocRun(tmp_path)
    expected = run.synthesize(0.07, step=20)
    target = make_model()
    run.synthesize_into(target, 0.07, step=20)
    weights = current_weights(target)
    for path, value in expected.items():
        key = "net/" + path if strip_model_name else path
        np.testing.assert_array_equal(weights[key], value)


def test_synthesize_into_refuses_another_architecture(keras_session, tmp_path):
    snapshot_model(make_model(), tmp_path)
    run = keras_ema.PostHocRun(tmp_path)
    wider = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(9, name="d1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(1, name="d2"),
        ],
        name="net",
    )
    before = current_weights(wider)
    with pytest.raises(ValueError, match="d1/kernel"):
        run.synthesize_into(wider, 0.07)
    for path, value in current_weights(wider).items():
        np.testing.assert_array_equal(value, before[path])

    deeper = make_model()
    extra = keras.Sequential([deeper, keras.layers.Dense(2, name="extra")], name="net")
    extra.build((None, 6))
    before = current_weights(extra)
    with pytest.raises(ValueError, match="extra"):
        run.synthesize_into(extra, 0.07)
    for path, value in current_weights(extra).items():
        np.testing.assert_array_equal(value, before[path])

    with pytest.raises(ValueError, match=r"not in the model: \['bn/gamma'"):
        run.synthesize_into(make_model(batch_norm=False), 0.07)


def auto_named_model():
    """The architecture of `make_model` with Keras' automatic names, which
    change with every model built in a process."""
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )


def test_synthesize_into_the_same_architecture_built_again(keras_session, tmp_path):
    model = auto_named_model()
    snapshot_model(model, tmp_path, strip_model_name=False)
    run = keras_ema.PostHocRun(tmp_path)
    auto_named_model()
    twin = auto_named_model()
    assert twin.weights[0].path != model.weights[0].path  # sequential_2/dense_4
    run.synthesize_into(twin, 0.07)
    # The snapshots hold the trainable weights, then the others, in order.
    expected = run.synthesize(0.07)
    order = twin.trainable_weights + twin.non_trainable_weights
    for (path, value), variable in zip(expected.items(), order, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(variable.value), value, err_msg=path
        )


def test_synthesize_into_says_what_differs(keras_session, tmp_path):
    snapshot_model(make_model(), tmp_path, strip_model_name=False)
    run = keras_ema.PostHocRun(tmp_path)

    def net(units=8, name="net", built=True):
        inputs = [keras.Input((6,))] if built else []
        return keras.Sequential(
            [
                *inputs,
                keras.layers.Dense(units, name="d1"),
                keras.layers.BatchNormalization(name="bn"),
                keras.layers.Dense(1, name="d2"),
            ],
            name=name,
        )

    refusals = [
        (net(name="twin"), "variable 'twin/d1/kernel' is 'net/d1/kernel' in the"),
        (
            net(9),
            "variable 'net/d1/kernel' has shape (6, 9) in the model but (6, 8) in the ",
        ),
        (net(built=False), "build the model first"),
    ]
    for model, message in refusals:
        before = current_weights(model)
        with pytest.raises(ValueError, match=re.escape(message)):
            run.synthesize_into(model, 0.07)
        assert_bit_equal(before, current_weights(model))


def test_swap_weights_holds_the_synthesized_weights_for_the_block(
    keras_session, tmp_path
):
    model = make_model()
    snapshot_model(model, tmp_path)
    run = keras_ema.PostHocRun(tmp_path)
    before = current_weights(model)
    expected = run.synthesize(0.07, step=20)
    with run.swap_weights(model, 0.07, step=20) as swapped:
        assert swapped is model
        inside = current_weights(model)
        for path, value in expected.items():
            np.testing.assert_array_equal(inside["net/" + path], value)
    assert_bit_equal(before, current_weights(model))
    with (
        pytest.raises(RuntimeError, match="inside the block"),
        run.swap_weights(model, 0.07),
    ):
        raise RuntimeError("inside the block")
    assert_bit_equal(before, current_weights(model))


def test_sweep_with_a_model_restores_it_after_each_score(keras_session, tmp_path):
    model = make_model()
    snapshot_model(model, tmp_path)
    run = keras_ema.PostHocRun(tmp_path)
    before = current_weights(model)
    targets = [0.06, 0.07, 0.08]
    expected = {t: run.synthesize(t) for t in targets}
    inside = []

    def evaluate(weights):
        inside.append(current_weights(model))
        return float(np.sum(weights["d1/kernel"]))

    result = run.sweep(targets, evaluate, model=model)
    assert result.scores == tuple(
        float(np.sum(expected[t]["d1/kernel"])) for t in targets
    )
    for target, held in zip(targets, inside, strict=True):
        for path, value in expected[target].items():
            np.testing.assert_array_equal(held["net/" + path], value)
    assert_bit_equal(before, current_weights(model))

    def fails_second(weights):
        if len(inside) == 4:
            raise RuntimeError("evaluation failed")
        inside.append(current_weights(model))
        return 0.0

    with pytest.raises(RuntimeError, match="evaluation failed"):
        run.sweep(targets, fails_second, model=model)
    assert_bit_equal(before, current_weights(model))


def numpy_mse(weights, x, y):
    """The MSE of `make_model` (inference mode) with `weights`, in NumPy."""
    hidden = np.maximum(x @ weights["d1/kernel"] + weights["d1/bias"], 0.0)
    hidden = (hidden - weights["bn/moving_mean"]) / np.sqrt(
        weights["bn/moving_variance"] + 1e-3
    ) * weights["bn/gamma"] + weights["bn/beta"]
    prediction = hidden @ weights["d2/kernel"] + weights["d2/bias"]
    return float(np.mean((prediction - y) ** 2))


def test_the_documented_val_loss_sweep_on_a_loss_only_model(keras_session, tmp_path):
    model = make_model(compile=False)
    model.compile(loss="mse")
    snapshot_model(model, tmp_path)
    rng = np.random.default_rng(3)
    x_val = rng.normal(size=(32, 6)).astype("float32")
    y_val = rng.normal(size=(32, 1)).astype("float32")
    before = current_weights(model)
    run = keras_ema.PostHocRun(tmp_path)

    def val_loss(weights):
        return model.evaluate(x_val, y_val, verbose=0, return_dict=True)["loss"]

    targets = [0.06, 0.08]
    result = run.sweep(targets, val_loss, model=model)
    expected = [numpy_mse(run.synthesize(t), x_val, y_val) for t in targets]
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4)
    assert_bit_equal(before, current_weights(model))


def test_sweep_warns_of_a_nan_score_naming_its_sigma_rel(three_snapshots):
    run = posthoc.PostHocRun(three_snapshots[0])
    scores = iter([1.0, float("nan"), 2.0])
    with pytest.warns(UserWarning, match=r"sigma_rel=0\.08") as warned:
        result = run.sweep([0.06, 0.08, 0.09], lambda weights: next(scores))
    nan_warnings = [w for w in warned if "NaN" in str(w.message)]
    assert len(nan_warnings) == 1
    assert nan_warnings[0].filename == __file__
    assert result.best == 0.06


def test_model_fingerprint_depends_on_variables_not_order():
    a = posthoc.model_fingerprint([("x", (2,), "float32"), ("y", (3, 1), "int64")])
    b = posthoc.model_fingerprint([("y", (3, 1), "int64"), ("x", (2,), "float32")])
    assert a == b and len(a) == 64
    assert a != posthoc.model_fingerprint(
        [("x", (2,), "float16"), ("y", (3, 1), "int64")]
    )
    assert a != posthoc.model_fingerprint([("x", (2,), "float32")])
