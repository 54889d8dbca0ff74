"""Crash-safe file writes: a temporary file beside the target, fsync, then an atomic rename."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | Callable[[Path], None],
                 unique: bool = False) -> None:
    """Write `data` (bytes, or a function that writes the given temporary path) to `path` so that a
    crash at any point leaves either the old file or the complete new one, never a partial one.
    `unique`: a temporary name of this process's own, for files several processes may write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if unique else f".{path.name}.tmp")
    if callable(data):
        data(tmp)
    else:
        tmp.write_bytes(data)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the directory entry (a no-op where the OS does not allow it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
