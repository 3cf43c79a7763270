"""Read the files acps is given: regular files only, streamed, never past a size limit.

A path may name something that is not a file: a FIFO (reading it waits for a writer that never comes), a
device such as ``/dev/zero`` (endless), a folder; or a file far larger than any config (a model or a data set
passed by mistake, a sparse file). Every read here opens the path without blocking, checks on the open
descriptor that it is a regular file, refuses it at once when the descriptor's size is over the limit, and reads
in chunks, stopping with a clear error as soon as the limit is passed (a file that grows while it is read, or
reports a wrong size, cannot get past it).

The limits, by kind of file (each raised by an environment variable):

====================  ===========================================================  =====================
kind                  files                                                        default (variable)
====================  ===========================================================  =====================
``config``            search config, channel-prune config, override file           16 MiB (``ACPS_MAX_CONFIG_BYTES``)
``record``            selection and record files, JSON reports, latency caches     256 MiB (``ACPS_MAX_RECORD_BYTES``)
``data``              calibration data, checkpoints, pickled models (torch.load)   64 GiB (``ACPS_MAX_DATA_BYTES``)
====================  ===========================================================  =====================
"""

from __future__ import annotations

import io
import os
import stat
from typing import BinaryIO

from acps_core._util.atomic import StrPath
from acps_core.errors import AcpsError, ArgumentError, ConfigError

#: kind -> (environment variable, default limit in bytes)
LIMITS = {
    "config": ("ACPS_MAX_CONFIG_BYTES", 16 << 20),
    "record": ("ACPS_MAX_RECORD_BYTES", 256 << 20),
    "data": ("ACPS_MAX_DATA_BYTES", 64 << 30),
}
_CHUNK = 1 << 20


def size_limit(kind: str) -> int:
    """The size limit in bytes for files of ``kind`` (see the module docs).

    Raises:
        ArgumentError: the environment variable that sets it is not a positive integer.
    """
    variable, default = LIMITS[kind]
    raw = os.environ.get(variable)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ArgumentError(f"the environment variable {variable}={raw!r} must be a positive number of bytes "
                            f"(the default is {default})")
    return value


def _error(error: type[AcpsError], message: str, path: str) -> AcpsError:
    """``error`` for ``path``: a ConfigError carries the path itself, other errors name it in the message."""
    if issubclass(error, ConfigError):
        return error(message, path=path)
    return error(f"{path}: {message}")


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _open_descriptor(path: StrPath, what: str, error: type[AcpsError]) -> int:
    """An open, read-only descriptor of the regular file at ``path``.

    Raises:
        ``error``: the path does not exist, cannot be opened, or is not a regular file.
    """
    shown = os.fspath(path)
    if isinstance(shown, bytes):
        shown = os.fsdecode(shown)
    if "\x00" in shown:
        raise _error(error, f"{what} path holds a NUL character; give the path of the file", shown)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting forever; it stays set, so
        # a special file that passes for a regular one but would block (/proc/kmsg) fails instead of hanging.
        fd = os.open(shown, flags)
    except FileNotFoundError as exc:
        where = "" if os.path.isabs(shown) else f" (relative to the current directory {os.getcwd()})"
        raise _error(error, f"{what} does not exist{where}; check the path", shown) from exc
    except IsADirectoryError as exc:
        raise _error(error, f"{what} is a directory, not a file; give the path of the file", shown) from exc
    except OSError as exc:
        raise _error(error, f"cannot open the {what}: {exc.strerror or exc}", shown) from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise _error(error, f"{what} is a directory, not a file; give the path of the file", shown)
        if not stat.S_ISREG(mode):
            raise _error(error, f"{what} is {_kind_of(mode)}, not a regular file, so acps does not read it (it "
                                "could block or never end); copy the content to a regular file first", shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _too_large(what: str, kind: str, limit: int) -> str:
    variable = LIMITS[kind][0]
    return (f"{what} is over the {limit} byte limit for {kind} files, so it is probably not the file meant; if it "
            f"is, raise the limit with the environment variable {variable}")


def read_bytes(path: StrPath, what: str, kind: str, error: type[AcpsError] = ConfigError) -> bytes:
    """The content of the regular file at ``path``, read in chunks and refused past the limit for ``kind``.

    Args:
        path: the file.
        what: what the file is, for messages (e.g. ``"search config"``).
        kind: ``"config"``, ``"record"`` or ``"data"`` (see the module docs).
        error: the error class to raise (a ConfigError names the file as its path).

    Raises:
        ``error``: the file is missing, not a regular file, unreadable or over the limit.
    """
    limit = size_limit(kind)
    fd = _open_descriptor(path, what, error)
    chunks: list[bytes] = []
    size = 0
    try:
        with os.fdopen(fd, "rb", buffering=0) as stream:
            if os.fstat(stream.fileno()).st_size > limit:  # known too large already (the reads below stop anyway)
                raise _error(error, _too_large(what, kind, limit), os.fspath(path))
            while True:
                chunk = stream.read(min(_CHUNK, limit + 1 - size))
                if chunk is None:  # nothing to read yet, and it would wait: not a regular file's content
                    raise BlockingIOError
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise _error(error, _too_large(what, kind, limit), os.fspath(path))
    except BlockingIOError as exc:
        raise _error(error, f"{what} would block when read (it is no regular file's content); copy the content "
                            "to a regular file first", os.fspath(path)) from exc
    except OSError as exc:
        raise _error(error, f"cannot read the {what}: {exc.strerror or exc}", os.fspath(path)) from exc
    return b"".join(chunks)


class _Limited(io.RawIOBase):
    """A read-only view of an open file that refuses to read past ``limit`` bytes (for ``torch.load``)."""

    def __init__(self, raw: BinaryIO, limit: int, fail: AcpsError) -> None:
        super().__init__()
        self._raw = raw
        self._limit = limit
        self._fail = fail

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        if count and self._raw.tell() > self._limit:
            raise self._fail
        return int(count or 0)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_limited(path: StrPath, what: str, kind: str = "data", error: type[AcpsError] = ConfigError) -> BinaryIO:
    """The regular file at ``path``, opened for reading as a binary stream that refuses to read past the limit
    for ``kind`` (for readers that seek, such as ``torch.load``). Close it when done.

    Raises:
        ``error``: the file is missing, not a regular file or cannot be opened; reading past the limit raises
            it too.
    """
    limit = size_limit(kind)
    fd = _open_descriptor(path, what, error)
    raw = os.fdopen(fd, "rb", buffering=0)
    if os.fstat(fd).st_size > limit:
        raw.close()
        raise _error(error, _too_large(what, kind, limit), os.fspath(path))
    return io.BufferedReader(_Limited(raw, limit, _error(error, _too_large(what, kind, limit), os.fspath(path))))
