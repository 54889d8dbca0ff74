"""Crash-safe file writes (a temporary file beside the target, fsync, then an atomic rename) and
failed writes (a full disk, a quota, a read-only filesystem) as one line that says what is safe."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from distill.errors import DistillError

# errors of a write that the user fixes outside distill (free space, raise a quota, remount)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO,
                          errno.EACCES, errno.EPERM})
# how C++ writers (tensorstore under orbax, Arrow) spell the errno in their messages
_ERRNO_IN_TEXT = re.compile(r"os_error_code='(\d+)'|\[errno (\d+)\]", re.IGNORECASE)


def write_error(exc: BaseException) -> str | None:
    """The reason in words ("no space left on device") when `exc` (or an exception it was raised
    from) is a failed write, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None:
            m = _ERRNO_IN_TEXT.search(str(exc))
            code = int(m.group(1) or m.group(2)) if m else None
        if code in WRITE_ERRNOS:
            return os.strerror(code).lower()
        exc = exc.__cause__ or exc.__context__
    return None


FREE = "{free}"  # in a WriteFailed's `safe` words: "free space", or "fix that" for other reasons
_SPACE = frozenset(os.strerror(c).lower() for c in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG))


class WriteFailed(DistillError):
    """A write that failed for a reason outside distill: '<path>: cannot write (<reason>); <safe>'."""

    def __init__(self, path: str | Path, reason: str, safe: str = ""):
        self.path, self.reason, self.safe = Path(path), reason, safe
        safe = safe.replace(FREE, "free space" if reason in _SPACE else "fix that")
        super().__init__(f"{path}: cannot write ({reason})" + (f"; {safe}" if safe else ""))


@contextlib.contextmanager
def writing(path: str | Path, safe: str | Callable[[], str] = "") -> Iterator[None]:
    """Turn a failed write inside the block into a WriteFailed naming the file (or `path`) and
    saying what is safe (`safe`: the words, or a function that returns them when it fails)."""
    try:
        yield
    except WriteFailed as e:
        if e.safe:
            raise
        raise WriteFailed(e.path, e.reason, safe() if callable(safe) else safe) from e
    except Exception as e:
        reason = write_error(e)
        if reason is None:
            raise
        where = getattr(e, "filename", None) or path
        raise WriteFailed(where, reason, safe() if callable(safe) else safe) from e


def write_atomic(path: str | Path, data: bytes | Callable[[Path], None],
                 unique: bool = False) -> None:
    """Write `data` (bytes, or a function that writes the given temporary path) to `path` so that a
    crash at any point leaves either the old file or the complete new one, never a partial one; a
    failed write removes the temporary file and raises WriteFailed.
    `unique`: a temporary name of this process's own, for files several processes may write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if unique else f".{path.name}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = write_error(e) if isinstance(e, Exception) else None
        if reason is not None and not isinstance(e, WriteFailed):
            raise WriteFailed(path, reason) from e
        raise
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


@contextlib.contextmanager
def new_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of `out` to fill, renamed into place when the block ends (replacing
    `out` with `overwrite`) and removed when it fails: an interrupted write never leaves a
    directory that looks complete, and a failed write (a full disk) is one line (WriteFailed)
    that leaves `out` as it was. A non-empty `out` without `overwrite` is a DistillError."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DistillError(f"{out}: already exists and is not empty (pass overwrite/--force)")
    safe = f"{out} is as it was" if out.exists() else f"nothing was written to {out}"
    with writing(out, f"{safe}; {FREE} and rerun the same command"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            yield tmp
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
