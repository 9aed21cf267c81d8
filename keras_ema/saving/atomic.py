"""The one way `keras_ema` writes a file, and the one way it reads one.

`write_atomically` writes a new file beside the target and moves it into
place: a crash leaves the previous file, or none, never a partial one.
`reading` turns any failure to read a file into a `ValueError` naming it;
`open_npz` opens an `.npz` archive without pickle and closes its file
whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

# The most temporary names tried before giving up: a clash means another
# writer picked the same 64 random bits, so one retry all but always does.
_NAME_TRIES = 100


class FolderNotFoundError(FileNotFoundError):
    """The folder a file is to be written in does not exist; `filename` is
    the folder."""


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes `path` with `write(file)`, atomically.

    The contents go to a new hidden file in `path`'s folder (never through a
    symbolic link where the platform can tell), which is synced, moved onto
    `path` with `os.replace`, and the folder synced where the platform
    allows it. Raises `FolderNotFoundError` if the folder does not exist.
    """
    handle, temporary = _create_temporary_beside(path)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _sync_folder(os.path.dirname(os.path.abspath(path)))


def _create_temporary_beside(path: str) -> tuple[int, str]:
    """Creates a new, empty file in `path`'s folder; returns its descriptor
    and path.

    `tempfile.mkstemp` would create it with mode `0o600` whatever the umask,
    and `os.replace` keeps that mode. Created with `0o666` here, the file
    gets `0o666 & ~umask`, as with `open(path, "w")` and as Keras' weights
    file beside it does.
    """
    folder, name = os.path.split(os.path.abspath(path))
    flags = (
        os.O_WRONLY
        | os.O_CREAT
        | os.O_EXCL
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_BINARY", 0)
    )
    for _ in range(_NAME_TRIES):
        temporary = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
        except FileNotFoundError as error:
            raise FolderNotFoundError(error.errno, error.strerror, folder) from None
    raise FileExistsError(f"No free temporary file name beside {path!r}.")


def _sync_folder(folder: str) -> None:
    """Makes the rename durable where the platform allows it."""
    with contextlib.suppress(OSError, AttributeError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@contextlib.contextmanager
def reading(
    path: str,
    what: str,
    damage: str = "unreadable, truncated or corrupt",
    missing: Callable[[], Exception] | None = None,
) -> Iterator[None]:
    """Turns any failure inside the block into a `ValueError` naming `path`.

    A `ValueError` (a check that failed) becomes `"<path> is not <what>:
    <reason>"`; any other exception `"<path> is not <what> (<damage>):
    <type>: <message>"`: a damaged zip can fail deep inside `zipfile`,
    `zlib` or `json` with almost any exception type (NotImplementedError for
    a flipped compression flag, RuntimeError for a flipped encryption bit,
    ...), and every one of them means the file cannot be used. With
    `missing`, a `FileNotFoundError` becomes `missing()` instead.
    """
    try:
        yield
    except FileNotFoundError as error:
        if missing is None:
            raise _damaged(path, what, damage, error) from None
        raise missing() from None
    except ValueError as error:
        raise ValueError(f"{path!r} is not {what}: {error}") from None
    except Exception as error:
        raise _damaged(path, what, damage, error) from None


@contextlib.contextmanager
def open_npz(path: str) -> Iterator[np.lib.npyio.NpzFile]:
    """The `.npz` archive at `path`, read without pickle; anything else
    (a single `.npy` array) is a `ValueError`.

    The file is opened here, not by `np.load`: on a damaged zip, `np.load`
    raises from inside `NpzFile` after opening the file and never closes it.
    """
    with open(path, "rb") as file:
        archive = np.load(file, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it is a single .npy array, not an .npz archive")
        with archive:
            yield archive


def _damaged(path: str, what: str, damage: str, error: Exception) -> ValueError:
    return ValueError(
        f"{path!r} is not {what} ({damage}): {type(error).__name__}: {error}"
    )
