"""Atomic file writes, shared by images (imageio) and model files (modelfile).

A file is written to a hidden temporary file beside its path, then moved into place, so
an interrupted run never leaves a partial output or checkpoint behind.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


class WriteError(OSError):
    """A file that cannot be written; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


@contextmanager
def atomic_write(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Write to a hidden temporary file beside `path`, then move it into place.

    On any exception (Ctrl-C and SIGTERM included) the temporary file is removed and
    `path` is untouched: creating, committing and removing the temporary file happen
    with those signals held back, so an interruption cannot fall between the steps.
    Without `overwrite`, an existing `path` is never replaced, even if it appeared while
    we were writing (the final step is an exclusive link).
    """
    path = Path(path)
    tmp = None
    try:
        with _signals_held():
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".psal-tmp", dir=path.parent)
            except OSError as e:
                raise WriteError(path, f"cannot write ({e.strerror})") from None
            f = os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with _signals_held():
            os.chmod(tmp, 0o666 & ~_umask())
            _commit(tmp, path, overwrite)
    finally:
        with _signals_held():
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)


def _commit(tmp: str, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    exists = WriteError(path, "already exists")
    try:
        os.link(tmp, path)  # fails if path exists: no check-then-write race
    except FileExistsError:
        raise exists from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise exists from None
        os.replace(tmp, path)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back (main thread, POSIX) until the block is done."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
