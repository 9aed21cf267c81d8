"""The `>>>` examples in keras_ema's docstrings run.

Every docstring of the package (modules, classes, functions, methods and
properties) is collected, and its examples run with `doctest` in a small
prepared namespace: `keras`, `keras_ema`, `np`, a tiny compiled `model`, and
arrays `x`, `y`, `x_val`, `y_val` that fit it. An example that shows its
output is checked against it (with ELLIPSIS and NORMALIZE_WHITESPACE); one
that shows none (a `fit`, an `evaluate`) is only run, and fails if it raises.
"""

from __future__ import annotations

import copy
import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re
import shutil

import keras
import numpy as np
import pytest
from conftest import make_model

import keras_ema

# Modules that import another backend's framework (`keras_ema.backends.torch`
# imports torch) are left out where that framework is not installed.
OTHER_FRAMEWORKS = {"jax", "tensorflow", "torch"} - {keras.backend.backend()}


def _function_of(member):
    """The function behind a class member, or `None` for data attributes."""
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    if isinstance(member, property):
        member = member.fget
    return member if inspect.isfunction(member) else None


def _modules():
    """The package and every module in it that imports here."""
    yield keras_ema
    for info in pkgutil.walk_packages(keras_ema.__path__, "keras_ema."):
        try:
            yield importlib.import_module(info.name)
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] not in OTHER_FRAMEWORKS:
                raise


MODULES = list(_modules())


def _docstring_owners():
    """(qualified name, object, module) for the modules and everything
    defined in them."""
    for module in MODULES:
        yield module.__name__, module, module
        for name, obj in vars(module).items():
            defined_here = getattr(obj, "__module__", None) == module.__name__
            if not defined_here or not (
                inspect.isclass(obj) or inspect.isfunction(obj)
            ):
                continue
            yield f"{module.__name__}.{name}", obj, module
            if inspect.isclass(obj):
                for member_name, member in vars(obj).items():
                    function = _function_of(member)
                    if function is not None:
                        yield (
                            f"{module.__name__}.{name}.{member_name}",
                            function,
                            module,
                        )


def _lineno(obj) -> int | None:
    if inspect.ismodule(obj):
        return 0
    try:
        return inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return None


def _collect_doctests() -> list[doctest.DocTest]:
    """The docstrings' examples, each with its module's globals, as doctest
    gives them."""
    parser = doctest.DocTestParser()
    tests = []
    for name, obj, module in _docstring_owners():
        docstring = obj.__doc__ if isinstance(obj.__doc__, str) else None
        if not docstring:
            continue
        test = parser.get_doctest(
            docstring, vars(module), name, inspect.getsourcefile(obj), _lineno(obj)
        )
        if test.examples:
            tests.append(test)
    return tests


DOCTESTS = _collect_doctests()


def _params():
    for test in DOCTESTS:
        yield pytest.param(test, id=test.name)


class _OutputChecker(doctest.OutputChecker):
    """Checks the output an example shows; an example that shows none is
    only run (an exception still fails it)."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        if not want:
            return True
        return super().check_output(want, got, optionflags)


def _namespace() -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    x_val = rng.normal(size=(32, 6)).astype("float32")
    return {
        "keras": keras,
        "keras_ema": keras_ema,
        "np": np,
        "model": make_model(),
        "x": x,
        "y": x.sum(axis=1, keepdims=True),
        "x_val": x_val,
        "y_val": x_val.sum(axis=1, keepdims=True),
    }


def test_every_example_in_the_source_is_collected():
    prompts_in_source = sum(
        len(re.findall(r"^\s*>>>", pathlib.Path(module.__file__).read_text(), re.M))
        for module in MODULES
    )
    collected = sum(len(test.examples) for test in DOCTESTS)
    assert prompts_in_source > 0
    assert collected == prompts_in_source


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> pathlib.Path:
    """A folder of post-hoc EMA snapshots of `make_model()` (steps 2, 4, 6,
    8), for the examples of `PostHocRun` and the snapshot files."""
    folder = tmp_path_factory.mktemp("posthoc") / "snapshots"
    model = make_model()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype("float32")
    posthoc = keras_ema.PostHocEMA(folder, snapshot_every=2, verbose=0)
    model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0, callbacks=[posthoc])
    return folder


def _skip_without_orbax(test: doctest.DocTest) -> None:
    """`EMAOrbaxCheckpoint` needs Keras' `OrbaxCheckpoint` (Keras 3.14 and
    later) and the `orbax-checkpoint` package (the `orbax` extra)."""
    if not any("OrbaxCheckpoint" in example.source for example in test.examples):
        return
    if not hasattr(keras.callbacks, "OrbaxCheckpoint"):
        pytest.skip(f"Keras {keras.__version__} has no OrbaxCheckpoint")
    pytest.importorskip("orbax.checkpoint")


@pytest.mark.parametrize("test", list(_params()))
def test_docstring_examples_run(test, tmp_path, monkeypatch, snapshots):
    _skip_without_orbax(test)
    # Examples save files ("ema_model.keras"): into a fresh folder, which
    # holds a copy of the `snapshots` folder.
    shutil.copytree(snapshots, tmp_path / "snapshots")
    monkeypatch.chdir(tmp_path)
    # A copy with the module's globals, then the prepared names; running it
    # clears that copy only.
    test = copy.copy(test)
    test.globs = {**test.globs, **_namespace()}
    runner = doctest.DocTestRunner(
        checker=_OutputChecker(),
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    report = []
    result = runner.run(test, out=report.append, clear_globs=True)
    assert result.failed == 0, "".join(report)
