"""Write output files so that a reader never sees half a file and a failure never damages the old one.

Each file is written to a temporary file in the same folder (same file system, so the final rename is
atomic), flushed and fsync'ed, then moved over the target with :func:`os.replace`. If anything fails before
the move, the temporary file is removed and the existing target is left byte-identical.

:func:`check_writable_output` validates an output path up front, so a long search does not end in a write
error.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Union

from acps_core.errors import OutputPathError

logger = logging.getLogger(__name__)

#: What the functions here accept as a path.
StrPath = Union[str, "os.PathLike[str]"]

_TEMP_SUFFIX = ".acps-tmp"


def _target_path(path: StrPath, what: str) -> Path:
    """The absolute file to replace for ``path`` (a symlink is followed: the link stays a link).

    Raises:
        OutputPathError: ``path`` is a directory or something other than a regular file, or its folder is
            missing or not a folder.
    """
    if os.fspath(path) == "":
        raise OutputPathError(f"{what} is an empty path; give the path of the file to write")
    given = Path(os.fspath(path))
    # Replacing a symlink would turn it into a regular file; write through it instead, like an editor does.
    target = Path(os.path.realpath(given)) if given.is_symlink() else given.absolute()
    if target.is_dir():
        raise OutputPathError(
            f"{what}={os.fspath(given)!r} is a directory, not a file; give a file path inside it, "
            f"e.g. {os.fspath(given / 'channel_prune.cfg')!r}"
        )
    if target.exists() and not target.is_file():
        raise OutputPathError(
            f"{what}={os.fspath(given)!r} exists but is not a regular file (a device, socket or pipe); "
            "give the path of a regular file"
        )
    folder = target.parent
    if not folder.exists():
        raise OutputPathError(
            f"the folder of {what}={os.fspath(given)!r} does not exist: {os.fspath(folder)}; create it first "
            "(e.g. os.makedirs) or choose another path"
        )
    if not folder.is_dir():
        raise OutputPathError(
            f"the folder of {what}={os.fspath(given)!r} is not a folder: {os.fspath(folder)}; "
            "choose another path"
        )
    return target


def _open_temp(folder: Path, name: str) -> tuple[int, Path]:
    """Create a new, empty temporary file in ``folder`` and return its descriptor and path.

    ``os.open`` with mode 0o666 lets the process umask decide the permissions, as a plain ``open()`` would;
    ``tempfile.mkstemp`` would force 0o600 on every output file.
    """
    while True:
        temp = folder / f".{name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
    """Best effort: make the rename itself durable (POSIX only; Windows cannot open a folder)."""
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


def _write_temp(target: Path, data: bytes, what: str) -> Path:
    """Write ``data`` to a new temporary file beside ``target`` (flushed and fsync'ed) and return its path.

    The temporary file takes the existing target's permission bits, so replacing it changes only the content.

    Raises:
        OutputPathError: the folder is not writable or the disk is full (the temporary file is removed).
    """
    try:
        fd, temp = _open_temp(target.parent, target.name)
    except OSError as exc:
        raise _os_error(exc, f"cannot create a file in the folder of {what} ({os.fspath(target.parent)})",
                        "choose a writable folder or fix its permissions") from exc
    try:
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            if target.exists():
                os.chmod(temp, target.stat().st_mode & 0o7777)
        except OSError as exc:
            raise _os_error(exc, f"cannot write {what} ({os.fspath(target)})",
                            "check the free disk space and the folder's permissions") from exc
    except BaseException:
        _remove_quietly(temp)
        raise
    return temp


def _os_error(exc: OSError, what_failed: str, fix: str) -> OutputPathError:
    """An OutputPathError for a failed system call, keeping its errno for callers that test it."""
    error = OutputPathError(f"{what_failed}: {exc.strerror or exc}; {fix}")
    # Only errno is copied: setting filename would make OSError.__str__ replace the message.
    error.errno = exc.errno
    return error


def _remove_quietly(path: Path) -> None:
    """Delete a temporary file; a failure is only logged, so cleanup never hides the real error."""
    try:
        os.unlink(path)
    except OSError:
        logger.debug("could not remove temporary file %s", path, exc_info=True)


def check_writable_output(path: StrPath, what: str) -> Path:
    """Check, before any heavy work, that a file can be written at ``path``.

    The path must not be a directory, its folder must exist, and a file must be creatable there: the check
    creates and deletes an empty temporary file in that folder.

    Args:
        path: the output file the caller will write later.
        what: the parameter the path came from (e.g. ``"output_cfg"``), used in the error message.

    Returns:
        The absolute path (a symlink resolved to its target), which is what a later atomic write replaces.

    Raises:
        OutputPathError: naming the path, the parameter and how to fix it.
    """
    target = _target_path(path, what)
    try:
        fd, temp = _open_temp(target.parent, target.name)
    except OSError as exc:
        raise _os_error(exc, f"cannot create files in the folder of {what}={os.fspath(path)!r} "
                        f"({os.fspath(target.parent)})",
                        "choose a writable folder or fix its permissions") from exc
    os.close(fd)
    _remove_quietly(temp)
    return target


def _backup(target: Path) -> Path:
    """A second name for ``target``'s current content in its folder (a hard link, else a copy)."""
    fd, name = _open_temp(target.parent, target.name + ".old")
    os.close(fd)
    backup = Path(name)
    try:
        os.remove(backup)
        os.link(target, backup)
    except OSError:
        try:
            shutil.copy2(target, backup)
        except BaseException:
            _remove_quietly(backup)  # a partial copy must not stay behind
            raise
    return backup


def atomic_write_text(path: StrPath, text: str, encoding: str = "utf-8") -> None:
    """Replace the file at ``path`` with ``text`` in one step.

    On any failure the temporary file is removed and an existing file at ``path`` is left untouched.

    Args:
        path: the file to create or replace (a symlink is followed: its target is replaced).
        text: the complete new content.
        encoding: the text encoding.

    Raises:
        OutputPathError: ``path`` is a directory, its folder is missing or not writable, or the write failed.
        UnicodeEncodeError: ``text`` cannot be encoded (nothing is written).
    """
    atomic_write_many({path: text}, encoding=encoding)


def atomic_write_bytes(path: StrPath, data: bytes, what: str = "output file") -> None:
    """Replace the file at ``path`` with ``data`` in one step (see :func:`atomic_write_many`); ``what`` names the
    path in errors (e.g. the command-line option)."""
    atomic_write_many({check_writable_output(path, what): data})


def atomic_write_many(contents: Mapping[StrPath, str | bytes], encoding: str = "utf-8") -> None:
    """Write several files, each atomically: every temporary file is written before any target is replaced.

    A failure while encoding or writing leaves every target untouched. The replacements happen one after
    another, with the old files kept aside until the last one is done: if one fails, or the call is interrupted
    (Ctrl-C) half-way, the files already replaced get their old content back (or are removed, if they are
    new), so the targets are either all old or all new.

    Args:
        contents: target path -> complete new text (or bytes, written as they are).
        encoding: the text encoding of every file.

    Raises:
        OutputPathError: a path is a directory, its folder is missing or not writable, two paths name the same
            file, or a write or replacement failed.
        UnicodeEncodeError: a text cannot be encoded (nothing is written).
    """
    targets: dict[Path, bytes] = {}
    seen: set[str] = set()
    for path, text in contents.items():
        target = _target_path(path, "output file")
        # realpath catches "dir/../a.cfg" and "a.cfg" naming one file, which would otherwise race.
        if os.path.realpath(target) in seen:
            raise OutputPathError(f"two outputs name the same file {os.fspath(target)}; give distinct paths")
        seen.add(os.path.realpath(target))
        # Encode everything first, so an unencodable text fails before any file is touched.
        targets[target] = text if isinstance(text, bytes) else text.encode(encoding)

    temps: dict[Path, Path] = {}
    try:
        for target, data in targets.items():
            temps[target] = _write_temp(target, data, os.fspath(target))
    except BaseException:
        for temp in temps.values():
            _remove_quietly(temp)
        raise

    # The old files are kept aside (hard links, or copies) until every target is replaced: an error or a
    # Ctrl-C half-way puts the old ones back, so the set of files is never half old, half new.
    backups: dict[Path, Path] = {}
    replaced: list[Path] = []
    kept: list[Path] = []  # backups that could not be put back: left for the user, and named
    try:
        for target in temps:
            if target.exists():
                try:
                    backups[target] = _backup(target)
                except OSError as exc:
                    raise _os_error(exc, f"cannot keep the old {os.fspath(target)} aside while writing (no output "
                                    "was changed)", "check the folder's permissions and free space") from exc
        for target, temp in temps.items():
            try:
                os.replace(temp, target)
            except OSError as exc:
                raise _os_error(exc, f"cannot replace {os.fspath(target)} (no output was changed)",
                                "check the folder's permissions and write again") from exc
            replaced.append(target)
    except BaseException as failure:
        for target in reversed(replaced):  # each file on its own: one that cannot go back must not stop the rest
            try:
                if target in backups:
                    os.replace(backups[target], target)
                    del backups[target]
                else:
                    os.remove(target)
            except OSError:
                if target in backups:
                    kept.append(backups.pop(target))
        replaced.clear()
        if kept:
            names = ", ".join(os.fspath(p) for p in kept)
            raise OutputPathError(f"writing failed ({type(failure).__name__}: {failure}) and the old content of "
                                  f"some files could not be put back; it is kept in {names}") from failure
        raise
    finally:
        for target, temp in temps.items():
            if target not in replaced:
                _remove_quietly(temp)
        for backup in backups.values():
            _remove_quietly(backup)
    for folder in {target.parent for target in replaced}:
        _fsync_folder(folder)
    for target in replaced:
        logger.debug("wrote %s", target)
