"""Atomic writes: a file or a whole directory is written under a temporary name beside its target, flushed to
disk, then renamed into place, so a reader (or a resumed run) sees either the old one or the complete new one.
And the streaming sha256 of a file, which checkpoint manifests record (dit/export.py)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (the names created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Flush ``tmp`` (a file, or a directory and everything in it) to disk, rename it to ``final`` in one step,
    and flush that rename. A directory ``final`` must not exist (os.replace does not merge directories)."""
    tmp, final = Path(tmp), Path(final)
    paths = [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]
    for p in paths:
        if p.is_dir():
            fsync_dir(p)
        else:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on a clean exit it becomes ``path`` (``publish``), on an
    error it is removed. A crash leaves only a hidden ``.NAME.*.tmp`` file, never a half-written ``path``."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in chunks (a checkpoint file may be GBs; memory stays flat)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
