"""Writing files safely: atomic replacement, the user's umask, one writer per file.

Every file this library writes (checkpoints, collected data) goes through
:func:`atomic_write`, and every training run holds :func:`exclusive_lock` on its
checkpoint. Whether a file *may* be written at all (never over a file the user named,
only over one of our own when asked) is decided by the callers, which know the formats.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

try:  # POSIX; elsewhere the lock falls back to an exclusively created file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class FileBusyError(OSError):
    """Another process is writing the same output file."""


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full_error(path: Path, exc: BaseException) -> OSError:
    """A readable OSError for a failed write; names the path and says when the disk is full.

    ``torch.save`` reports a full disk as ``RuntimeError: [enforce fail at
    inline_container.cc:...] . unexpected pos ...``; the free space tells the truth.
    """
    full = getattr(exc, "errno", None) == errno.ENOSPC
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(path.parent).free < 1 << 20
    if full:
        return OSError(errno.ENOSPC, "no space left on the disk; nothing was written", str(path))
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OSError(getattr(exc, "errno", None) or errno.EIO, f"write failed: {reason}", str(path))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes as hex, read in 1 MiB blocks (identifies data files and
    checkpoints whatever their name)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, then rename it over ``path``.

    A crash at any moment leaves the old file or the new one, never a torn file. The new
    file gets the permissions a plain ``open()`` would give (``0o666`` less the umask),
    not ``mkstemp``'s private ``0o600``. Parent folders are created.

    Raises:
        OSError: the write failed (a full disk says so, with the path); the temp file is
            removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _disk_full_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``path`` while writing ``path``; fail at once if taken.

    The lock is an OS file lock (``flock``), so it is released when its process dies and
    a killed run never leaves a stale lock behind.

    Raises:
        FileBusyError: another process holds the lock on ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    busy = FileBusyError(
        errno.EBUSY,
        "another training is writing this file; wait for it to finish or choose another output",
        str(path),
    )
    if fcntl is None:  # pragma: no cover - Windows: an exclusively created marker file
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise busy from None
    else:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # its holder just unlinked it
                raise OSError(errno.EBUSY, "lock file replaced")
        except OSError:
            os.close(fd)
            raise busy from None
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        # Unlink before unlocking, so a waiting writer never locks a file about to vanish.
        Path(lock).unlink(missing_ok=True)
        os.close(fd)
