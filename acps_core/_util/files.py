"""The small file operations of acps's atomic writes: new files under names nobody else uses, fsync, quiet
removal, inodes, and a folder's advisory lock (see :mod:`acps_core._util.atomic` for how they fit together).

File names: ``.<name>.<8 hex digits>.acps-tmp`` (a new file being written), ``.acps-old`` (the second name of an
old file), ``.acps-journal`` and ``.acps-undo`` (a write being undone). Only files named exactly so are ever
removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from pathlib import Path

from acps_core.errors import OutputPathError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".acps-tmp"
OLD_SUFFIX = ".acps-old"
JOURNAL_SUFFIX = ".acps-journal"
UNDO_SUFFIX = ".acps-undo"
#: The names acps gives the files of a write in progress; nothing else is ever removed.
LEFTOVER = re.compile(r"\..+\.[0-9a-f]{8}\.acps-(tmp|old|undo)")
JOURNAL = re.compile(r"\.(.+)\.([0-9a-f]{8})\.acps-journal")
#: Seconds a writer waits for another process writing in the same folder (``ACPS_LOCK_TIMEOUT`` overrides).
LOCK_TIMEOUT_S = 120.0
#: Whether this system has the advisory locks the journal relies on.
LOCKS = fcntl is not None


def open_new(folder: Path, name: str, suffix: str, token: str | None = None) -> tuple[int, Path]:
    """Create a new, empty file ``.<name>.<token or random><suffix>`` in ``folder``; its descriptor and path.

    ``os.open`` with mode 0o666 lets the process umask decide the permissions, as a plain ``open()`` would;
    ``tempfile.mkstemp`` would force 0o600 on every output file.
    """
    while True:
        path = folder / f".{name}.{token or secrets.token_hex(4)}{suffix}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            if token is not None:
                raise
            continue


def write_new(folder: Path, name: str, suffix: str, data: bytes, token: str | None = None) -> Path:
    """Write ``data`` to a new file made by :func:`open_new`, flushed and fsync'ed; its path."""
    fd, path = open_new(folder, name, suffix, token)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        remove_quietly(path)
        raise
    return path


def fsync_folder(folder: Path) -> None:
    """Best effort: make renames in ``folder`` durable (POSIX only; Windows cannot open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    """Delete a file acps made; a failure is only logged, so cleanup never hides the real error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        logger.debug("could not remove %s", path, exc_info=True)


def inode(path: Path | str) -> list[int] | None:
    """``[device, inode]`` of the file at ``path`` (not following a link), or None when there is none."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return [info.st_dev, info.st_ino]


def lock_folder(folder: Path, wait: bool = True, timeout: float = LOCK_TIMEOUT_S) -> int | None:
    """An open descriptor of ``folder`` holding its exclusive lock; None where locks are not available (or, with
    ``wait=False``, when another process holds it).

    Raises:
        OutputPathError: another process held the lock for longer than the timeout.
    """
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None  # a folder acps cannot open is reported by the read or write itself
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return None
            if time.monotonic() > deadline:
                os.close(fd)
                raise OutputPathError(
                    f"another process has been writing in {os.fspath(folder)} for over {timeout:g} s (an acps "
                    "search or prune with outputs in that folder); wait for it to finish or stop it, or raise "
                    "ACPS_LOCK_TIMEOUT") from None
            time.sleep(0.02)
        except OSError:
            os.close(fd)
            return None  # the file system does not lock (some network mounts)
        except BaseException:
            os.close(fd)
            raise


def share_lock(fd: int) -> None:
    """Turn a folder's exclusive lock taken by :func:`lock_folder` into a shared one (readers beside readers)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)


def unlock_folder(fd: int) -> None:
    """Release a lock taken by :func:`lock_folder` and close its descriptor."""
    with contextlib.suppress(OSError):
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

