"""Checks the built distributions: `twine check`, their contents, then the
wheel installed with each backend extra into a fresh virtual environment.

Usage: python tests/package/check.py DIST_DIR [EXTRA ...]

DIST_DIR holds one sdist and one wheel (as `python -m build` writes them).
The sdist must carry the package, the tests, the examples and the license;
the wheel only the package and its metadata. Then, for each extra
(`tensorflow`, `jax`, `torch` by default), a new virtual environment gets the
wheel with that extra, under the pins of `PIP_CONSTRAINT`, and runs
`smoke.py` from a temporary folder, so that it imports the installed package.

The `tensorflow` extra asks for `tensorflow`, whose Linux wheel carries the
GPU runtime; CI pins `tensorflow-cpu`, a different distribution that pip
cannot substitute and a constraint cannot stand in for. So that environment
gets the wheel with its base requirements, then the `tensorflow` extra's
requirements read from the wheel's metadata with `tensorflow` replaced by
`tensorflow-cpu` (same version range).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement

HERE = pathlib.Path(__file__).resolve().parent
BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
# Distributions replaced in the environments: see the module docstring.
CPU_BUILDS = {"tensorflow": "tensorflow-cpu"}


def find_one(dist: pathlib.Path, pattern: str) -> pathlib.Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        sys.exit(f"expected one {pattern} in {dist}, found {found}")
    return found[0]


def check_sdist(sdist: pathlib.Path) -> None:
    with tarfile.open(sdist) as archive:
        # Drop the leading "keras_ema-X.Y.Z/".
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    required = ["LICENSE", "README.md", "pyproject.toml", "keras_ema/__init__.py"]
    missing = [name for name in required if name not in names]
    for folder in ("tests/", "examples/"):
        if not any(n.startswith(folder) and n.endswith(".py") for n in names):
            missing.append(folder)
    if missing:
        sys.exit(f"{sdist.name} lacks {missing}")
    print(f"{sdist.name}: {len(names)} entries, with {required} and tests, examples")


def check_wheel(wheel: pathlib.Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    strays = [
        name
        for name in names
        if not name.startswith("keras_ema/") and ".dist-info/" not in name
    ]
    if strays or "keras_ema/__init__.py" not in names:
        sys.exit(f"{wheel.name} holds more or less than the package: {strays}")
    print(f"{wheel.name}: {len(names)} files, the package only")


def extra_requirements(wheel: pathlib.Path, extra: str) -> list[Requirement]:
    """The requirements that `extra` adds, from the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(
            n for n in archive.namelist() if n.endswith(".dist-info/METADATA")
        )
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist")]
    added = [
        r
        for r in requirements
        if r.marker is not None
        and r.marker.evaluate({"extra": extra})
        and not r.marker.evaluate({"extra": ""})
    ]
    if not added:
        sys.exit(f"{wheel.name} declares no extra {extra!r}")
    return added


def install_arguments(wheel: pathlib.Path, extra: str) -> list[list[str]]:
    """The `pip install` arguments, one list per pip call."""
    requirements = extra_requirements(wheel, extra)
    if not any(r.name in CPU_BUILDS for r in requirements):
        return [[f"{wheel}[{extra}]"]]
    replaced = [f"{CPU_BUILDS.get(r.name, r.name)}{r.specifier}" for r in requirements]
    return [[str(wheel)], replaced]


def smoke_test(wheel: pathlib.Path, extra: str, work: pathlib.Path) -> None:
    venv = work / f"venv-{extra}"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    for arguments in install_arguments(wheel, extra):
        print(f"[{extra}] pip install {' '.join(arguments)}", flush=True)
        # --no-compile: the smoke test compiles the modules it imports; pip
        # would compile every module of the backend, most never imported
        # here, and a module that does not compile fails no install.
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--no-compile", *arguments],
            check=True,
        )
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "KERAS_BACKEND")
    }
    env["KERAS_BACKEND"] = BACKENDS[extra]
    outside = work / f"run-{extra}"
    outside.mkdir()
    subprocess.run([python, HERE / "smoke.py"], cwd=outside, env=env, check=True)
    # Each environment is a few hundred MB: free it before the next one.
    shutil.rmtree(venv)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    dist = pathlib.Path(argv[0]).resolve()
    extras = argv[1:] or list(BACKENDS)
    sdist = find_one(dist, "*.tar.gz")
    wheel = find_one(dist, "*.whl")
    subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", sdist, wheel], check=True
    )
    check_sdist(sdist)
    check_wheel(wheel)
    with tempfile.TemporaryDirectory(prefix="keras-ema-package-") as work:
        for extra in extras:
            smoke_test(wheel, extra, pathlib.Path(work))
            print(f"[{extra}] smoke test passed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
