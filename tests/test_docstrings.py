"""The `>>>` examples in keras_ema's docstrings run.

Every docstring of the package (modules, classes, functions, methods and
properties) is collected, and its examples run with `doctest` in a small
prepared namespace: `keras`, `keras_ema`, `np`, a tiny compiled `model`, and
arrays `x`, `y`, `x_val`, `y_val` that fit it. An example that shows its
output is checked against it (with ELLIPSIS and NORMALIZE_WHITESPACE); one
that shows none (a `fit`, an `evaluate`) is only run, and fails if it raises.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re

import keras
import numpy as np
import pytest
from conftest import make_model

import keras_ema

PACKAGE_DIR = pathlib.Path(keras_ema.__file__).parent


def _function_of(member):
    """The function behind a class member, or `None` for data attributes."""
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    if isinstance(member, property):
        member = member.fget
    return member if inspect.isfunction(member) else None


def _docstring_owners():
    """(qualified name, object) for the package, its modules and everything
    defined in them."""
    yield "keras_ema", keras_ema
    for info in pkgutil.walk_packages(keras_ema.__path__, "keras_ema."):
        module = importlib.import_module(info.name)
        yield module.__name__, module
        for name, obj in vars(module).items():
            defined_here = getattr(obj, "__module__", None) == module.__name__
            if not defined_here or not (
                inspect.isclass(obj) or inspect.isfunction(obj)
            ):
                continue
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for member_name, member in vars(obj).items():
                    function = _function_of(member)
                    if function is not None:
                        yield f"{module.__name__}.{name}.{member_name}", function


def _lineno(obj) -> int | None:
    if inspect.ismodule(obj):
        return 0
    try:
        return inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return None


def _collect_doctests() -> list[doctest.DocTest]:
    parser = doctest.DocTestParser()
    tests = []
    for name, obj in _docstring_owners():
        docstring = obj.__doc__ if isinstance(obj.__doc__, str) else None
        if not docstring:
            continue
        test = parser.get_doctest(
            docstring, {}, name, inspect.getsourcefile(obj), _lineno(obj)
        )
        if test.examples:
            tests.append(test)
    return tests


DOCTESTS = _collect_doctests()


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
        len(re.findall(r"^\s*>>>", path.read_text(), flags=re.MULTILINE))
        for path in PACKAGE_DIR.rglob("*.py")
    )
    collected = sum(len(test.examples) for test in DOCTESTS)
    assert prompts_in_source > 0
    assert collected == prompts_in_source


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_examples_run(test, tmp_path, monkeypatch):
    # Examples save files ("ema_model.keras"): into a fresh folder.
    monkeypatch.chdir(tmp_path)
    test.globs = _namespace()
    runner = doctest.DocTestRunner(
        checker=_OutputChecker(),
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    report = []
    result = runner.run(test, out=report.append, clear_globs=True)
    assert result.failed == 0, "".join(report)
