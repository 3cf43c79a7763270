"""Write one call's outputs as one transaction: a reader sees every old file or every new one, never a mix.

A search writes a channel-prune config with its selection file, reports and figure; ``acps prune`` a record and
a saved model. Each such set is written in these steps (the locks, the journal and the recovery live in
:mod:`acps_core._util.journal`):

1. The folders of the outputs are locked, so that two processes writing there take turns, and whatever a process
   killed in an earlier write left there is finished or undone first.
2. Every new file is written to a temporary file beside its target (``.<name>.<random>.acps-tmp``), flushed and
   fsync'ed. A failure here removes the temporary files: no output has changed.
3. Each existing target gets a second name (a hard link, ``.<name>.<random>.acps-old``), to put it back.
4. A journal listing the steps is written into every folder of the set and fsync'ed: the commit point.
5. The temporary files are renamed over their targets (``os.replace``: atomic per file) and the files the set
   no longer has are deleted.
6. The journal and the second names are removed.

A failure or Ctrl-C in step 5 puts the old files back before the error reaches the caller. A process killed
(SIGKILL, a power cut) may stop anywhere: before step 4 the old set is intact, after it the journal says how to
finish. The next acps call that locks the folder, to write or to read a config with its selection, finishes
the write (or undoes one that was being undone) and removes the leftovers, so no reader sees a mix and nothing
stays behind. Readers take the lock too (:func:`reading`), so they never read while a set is being replaced.

Locks are advisory: programs other than acps do not see them. Where ``flock`` is missing (Windows) or not
supported by the file system, every file is still replaced atomically on its own, but without the lock and the
journal a kill between two replacements can leave a mix.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Union

from acps_core._util.files import LOCKS, OLD_SUFFIX, TEMP_SUFFIX, fsync_folder, open_new, remove_quietly
from acps_core._util.journal import mark_undo, recover, remove_journal, write_journal
from acps_core._util.locks import locked_folders, reading
from acps_core.errors import OutputPathError

logger = logging.getLogger(__name__)

#: What the functions here accept as a path.
StrPath = Union[str, "os.PathLike[str]"]

#: The longest file name acps writes beside an output is the output's name plus this many bytes
#: (``.<name>.<8 hex digits>.acps-journal``).
NAME_OVERHEAD = 23

__all__ = ["NAME_OVERHEAD", "StrPath", "atomic_write_bytes", "atomic_write_many", "atomic_write_text",
           "check_writable_output", "locked_folders", "reading", "recover"]


# ----------------------------------------------------------------------------------------------------------------
# Checking output paths
# ----------------------------------------------------------------------------------------------------------------

def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _example(what: str) -> str:
    """A file name that fits the role ``what``, for messages."""
    for word, name in (("onnx", "model.onnx"), ("save_path", "model.onnx"), ("record", "prune.record"),
                       ("save", "pruned.pt"),
                       ("figure", "prune.cfg.report.png"), ("report", "prune.cfg.report.json")):
        if word in what.lower():
            return name
    return "channel_prune.cfg"


def _target_path(path: StrPath, what: str, follow_link: bool = True) -> Path:
    """The file to replace for ``path``: its folder as the file system names it (symbolic links and ``..``
    resolved), and a symlinked file followed to its target (so the link stays a link) unless ``follow_link`` is
    False (a file to delete: the link itself goes).

    Raises:
        OutputPathError: ``path`` is empty, holds a NUL character, names a folder, has a name too long for the
            file system, is something other than a regular file, or its folder is missing or not a folder.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text == "":
        raise OutputPathError(f"{what} is an empty path; give the path of the file to write")
    if "\x00" in text:
        raise OutputPathError(f"{what}={text!r} holds a NUL character, which no file name can; give another path")
    given = Path(text)
    if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise OutputPathError(f"{what}={text!r} ends with a slash, so it names a folder; give a file path, e.g. "
                              f"{os.path.join(text.rstrip(os.sep), _example(what))!r}")
    if given.name in ("", ".", ".."):
        raise OutputPathError(f"{what}={text!r} is a directory, not a file; give a file path inside it, "
                              f"e.g. {os.fspath(given / _example(what))!r}")
    try:
        target = Path(os.path.realpath(given.parent)) / given.name
        if follow_link and target.is_symlink():
            # Replacing a symlink would turn it into a regular file; write through it, like an editor does.
            target = Path(os.path.realpath(target))
        if target.is_dir() and not (target.is_symlink() and not follow_link):
            raise OutputPathError(
                f"{what}={text!r} is a directory, not a file; give a file path inside it, "
                f"e.g. {os.fspath(given / _example(what))!r}")
        if target.exists() and not target.is_file() and not target.is_symlink():
            raise OutputPathError(
                f"{what}={text!r} exists but is not a regular file (a device, socket or pipe); give the path of "
                "a regular file")
    except OutputPathError:
        raise
    except OSError as exc:  # a name too long, a loop of links, ...
        raise _os_error(exc, f"{what}={text!r} cannot be used as a file path", "give a shorter or plainer path") \
            from exc
    folder = target.parent
    if not folder.exists():
        raise OutputPathError(
            f"the folder of {what}={text!r} does not exist: {os.fspath(folder)}; create it first "
            "(e.g. os.makedirs) or choose another path")
    if not folder.is_dir():
        raise OutputPathError(
            f"the folder of {what}={text!r} is not a folder: {os.fspath(folder)}; choose another path")
    longest = _name_max(folder) - NAME_OVERHEAD
    if len(os.fsencode(target.name)) > longest:
        raise OutputPathError(
            f"the file name of {what}={text!r} is {len(os.fsencode(target.name))} bytes long; acps writes it "
            f"through a temporary name {NAME_OVERHEAD} bytes longer, so names of at most {longest} bytes fit "
            "this file system; choose a shorter name")
    return target


def check_writable_output(path: StrPath, what: str) -> Path:
    """Check, before any heavy work, that a file can be written at ``path``.

    The path must be a plain file path whose folder exists, and a file must be creatable there (checked with a
    nameless temporary file where the system has them, else a named one removed at once).

    Args:
        path: the output file the caller will write later.
        what: the parameter the path came from (e.g. ``"output_cfg"``), used in the error message.

    Returns:
        The absolute path (a symlink resolved to its target), which is what a later write replaces.

    Raises:
        OutputPathError: naming the path, the parameter and how to fix it.
    """
    target = _target_path(path, what)
    try:
        _probe(target.parent)
    except OSError as exc:
        raise _os_error(exc, f"cannot create files in the folder of {what}={os.fspath(path)!r} "
                        f"({os.fspath(target.parent)})", "choose a writable folder or fix its permissions") from exc
    return target


def _probe(folder: Path) -> None:
    """Create a file in ``folder`` and remove it again (raises OSError when that is not allowed)."""
    nameless = getattr(os, "O_TMPFILE", 0)
    if nameless:
        try:
            os.close(os.open(folder, nameless | os.O_WRONLY, 0o600))
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    fd, temp = open_new(folder, "probe", TEMP_SUFFIX)
    os.close(fd)
    remove_quietly(temp)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

def _write_temp(target: Path, data: bytes, what: str) -> Path:
    """Write ``data`` to a new temporary file beside ``target`` (flushed and fsync'ed) and return its path.

    The temporary file takes the existing target's permission bits, so replacing it changes only the content.

    Raises:
        OutputPathError: the folder is not writable or the disk is full (the temporary file is removed).
    """
    try:
        fd, temp = open_new(target.parent, target.name, TEMP_SUFFIX)
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
            raise _os_error(exc, f"cannot write {what}",
                            "check the free disk space and the folder's permissions") from exc
    except BaseException:
        remove_quietly(temp)
        raise
    return temp


def _os_error(exc: OSError, what_failed: str, fix: str) -> OutputPathError:
    """An OutputPathError for a failed system call, keeping its errno for callers that test it."""
    error = OutputPathError(f"{what_failed}: {exc.strerror or exc}; {fix}")
    # Only errno is copied: setting filename would make OSError.__str__ replace the message.
    error.errno = exc.errno
    return error


def _second_name(target: Path) -> Path:
    """A second name for ``target``'s current content in its folder (a hard link, else a copy)."""
    while True:
        old = target.parent / f".{target.name}.{secrets.token_hex(4)}{OLD_SUFFIX}"
        try:
            os.link(target, old, follow_symlinks=False)  # a symbolic link about to be deleted: the link itself
            return old
        except FileExistsError:
            continue
        except OSError:
            break  # no hard links here (some file systems): copy
    fd, old = open_new(target.parent, target.name, OLD_SUFFIX)  # the name is reserved, then copied onto
    os.close(fd)
    try:
        os.remove(old)
        shutil.copy2(target, old, follow_symlinks=False)
    except BaseException:
        remove_quietly(old)  # a partial copy must not stay behind
        raise
    return old


def atomic_write_text(path: StrPath, text: str, encoding: str = "utf-8") -> None:
    """Replace the file at ``path`` with ``text`` in one step (see :func:`atomic_write_many`).

    Raises:
        OutputPathError: ``path`` is a directory, its folder is missing or not writable, or the write failed.
        UnicodeEncodeError: ``text`` cannot be encoded (nothing is written).
    """
    atomic_write_many({path: text}, encoding=encoding)


def atomic_write_bytes(path: StrPath, data: bytes, what: str = "output file") -> None:
    """Replace the file at ``path`` with ``data`` in one step (see :func:`atomic_write_many`); ``what`` names the
    path in errors (e.g. the command-line option)."""
    atomic_write_many({check_writable_output(path, what): data})


def atomic_write_many(contents: Mapping[StrPath, str | bytes | None], encoding: str = "utf-8") -> None:
    """Write several files as one transaction (see the module docs): all old or all new, whatever happens.

    Args:
        contents: target path -> complete new text (or bytes, written as they are), or None for a file the new
            set does not have (deleted if it exists; e.g. the figure of an earlier search).
        encoding: the text encoding of every file.

    Raises:
        OutputPathError: a path is a directory, its folder is missing or not writable, two paths name the same
            file, another process keeps the folder locked, or a write or replacement failed (every target is then
            as before; if one could not be put back, the message names where its old content is kept, and the
            next acps call in that folder puts it back).
        UnicodeEncodeError: a text cannot be encoded (nothing is written).
    """
    targets: dict[Path, bytes | None] = {}
    for path, text in contents.items():
        target = _target_path(path, "output file", follow_link=text is not None)
        if target in targets or os.path.realpath(target) in {os.path.realpath(t) for t in targets}:
            raise OutputPathError(f"two outputs name the same file {os.fspath(target)}; give distinct paths")
        # Encode everything first, so an unencodable text fails before any file is touched.
        targets[target] = text if text is None or isinstance(text, bytes) else text.encode(encoding)
    with locked_folders(target.parent for target in targets) as held:
        pending = sorted(os.fspath(t) for t in targets if Path(os.path.realpath(t)) in held.pending)
        if pending:
            raise OutputPathError(
                f"an interrupted write of {', '.join(pending)} is still to be finished, and another process holds a "
                "folder it spans; write again once that process is done")
        _transaction(targets)


def _transaction(targets: Mapping[Path, bytes | None]) -> None:
    """Steps 2 to 6 of the module docs, with the folders locked."""
    temps: dict[Path, Path] = {}
    try:
        for target, data in targets.items():
            if data is not None:
                temps[target] = _write_temp(target, data, os.fspath(target))
    except BaseException:
        for temp in temps.values():
            remove_quietly(temp)
        raise
    steps = [target for target in targets if target in temps or os.path.lexists(target)]
    olds: dict[Path, Path] = {}
    journal: list[Path] = []
    applied: list[Path] = []
    try:
        for target in steps:
            if os.path.lexists(target):
                try:
                    olds[target] = _second_name(target)
                except OSError as exc:
                    raise _os_error(exc, f"cannot keep the old {os.fspath(target)} aside while writing (no output "
                                    "was changed)", "check the folder's permissions and free space") from exc
        if len(steps) > 1 and LOCKS:
            try:
                journal = write_journal(steps, temps, olds)
            except OSError as exc:
                raise _os_error(exc, "cannot write the journal of the outputs (no output was changed)",
                                "check the free disk space and the folders' permissions") from exc
        for target in steps:
            try:
                if target in temps:
                    os.replace(temps[target], target)
                else:
                    os.remove(target)
            except OSError as exc:
                raise _os_error(exc, f"cannot replace {os.fspath(target)} (no output was changed)",
                                "check the folder's permissions and write again") from exc
            applied.append(target)
    except BaseException as failure:
        kept = _undo(applied, temps, olds, journal)
        if kept:
            names = ", ".join(os.fspath(p) for p in kept)
            raise OutputPathError(f"writing failed ({type(failure).__name__}: {failure}) and the old content of "
                                  f"some files could not be put back; it is kept in {names}, and the next acps "
                                  "call that writes or reads in that folder puts it back") from failure
        raise
    for folder in {target.parent for target in steps}:
        fsync_folder(folder)
    remove_journal(journal)
    for old in olds.values():
        remove_quietly(old)
    for target in applied:
        logger.debug("wrote %s", target)


def _undo(applied: list[Path], temps: Mapping[Path, Path], olds: Mapping[Path, Path],
          journal: list[Path]) -> list[Path]:
    """Put back the old content of every applied target; returns the second names that could not go back."""
    if journal:
        mark_undo(journal)  # from here on a kill is undone too, since some targets may already be back
    kept: list[Path] = []
    for target in reversed(applied):  # each file on its own: one that cannot go back must not stop the rest
        try:
            if target in olds:
                os.replace(olds[target], target)
            else:
                os.remove(target)
        except OSError:
            if target in olds:
                kept.append(olds[target])
    for temp in temps.values():
        remove_quietly(temp)
    for old in olds.values():
        if old not in kept:
            remove_quietly(old)
    if not kept:
        remove_journal(journal)
    return kept
