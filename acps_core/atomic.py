"""Write one call's outputs as one transaction: a reader sees every old file or every new one, never a mix.

A search writes a channel-prune config with its selection file and reports; ``acps prune`` a record and a saved
model. Each such set is written in these steps:

1. The folders of the outputs are locked (an advisory ``flock`` on each folder, in path order), so that two
   processes writing there take turns. Whatever a process killed in an earlier write left there is dealt with
   first (:func:`recover`).
2. Every new file is written to a temporary file beside its target (``.<name>.<random>.acps-tmp``), flushed and
   fsync'ed. A failure here removes the temporary files: no output has changed.
3. Each existing target gets a second name (a hard link, ``.<name>.<random>.acps-old``), to put it back.
4. A journal listing the steps (``.<name>.<random>.acps-journal``) is written and fsync'ed: the commit point.
5. The temporary files are renamed over their targets (``os.replace``: atomic per file) and the files the set
   no longer has are deleted.
6. The journal and the second names are removed.

A failure or Ctrl-C in step 5 puts the old files back before the error reaches the caller. A process killed
(SIGKILL, a power cut) may stop anywhere: before step 4 the old set is intact, after it the journal says how to
finish. The next acps call that locks the folder, to write or to read a config with its selection, finishes
a committed journal (or completes a roll-back), and removes temporary files and second names, so no reader
sees a mix and nothing stays behind. Readers take the lock too (:func:`reading`), so they never read while a
set is being replaced.

Locks are advisory: programs other than acps do not see them. Where ``flock`` is missing (Windows) or not
supported by the file system, files are still written atomically one by one, but without the lock and the
journal a kill between two replacements can leave a mix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Union

from acps_core.errors import OutputPathError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: What the functions here accept as a path.
StrPath = Union[str, "os.PathLike[str]"]

_TEMP_SUFFIX = ".acps-tmp"
_OLD_SUFFIX = ".acps-old"
_JOURNAL_SUFFIX = ".acps-journal"
_ROLLBACK_SUFFIX = ".acps-rollback"
_LEFTOVER_SUFFIXES = (_TEMP_SUFFIX, _OLD_SUFFIX, _ROLLBACK_SUFFIX)
#: The longest file name acps writes beside an output is the output's name plus this many bytes
#: (``.<name>.<8 hex digits>.acps-journal``).
NAME_OVERHEAD = 23
#: Seconds a writer waits for another process writing in the same folder (``ACPS_LOCK_TIMEOUT`` overrides).
LOCK_TIMEOUT_S = 120.0


# ----------------------------------------------------------------------------------------------------------------
# Checking output paths
# ----------------------------------------------------------------------------------------------------------------

def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _target_path(path: StrPath, what: str) -> Path:
    """The absolute file to replace for ``path`` (a symlink is followed: the link stays a link).

    Raises:
        OutputPathError: ``path`` is empty, holds a NUL character, has a name too long for the file system, is a
            directory or something other than a regular file, or its folder is missing or not a folder.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text == "":
        raise OutputPathError(f"{what} is an empty path; give the path of the file to write")
    if "\x00" in text:
        raise OutputPathError(f"{what}={text!r} holds a NUL character, which no file name can; give another path")
    given = Path(text)
    if given.name in ("", ".", "..") or text.endswith(os.sep):
        raise OutputPathError(f"{what}={text!r} is a directory, not a file; give a file path inside it, "
                              f"e.g. {os.fspath(given / 'channel_prune.cfg')!r}")
    try:
        # Replacing a symlink would turn it into a regular file; write through it instead, like an editor does.
        target = Path(os.path.realpath(given)) if given.is_symlink() else given.absolute()
        if target.is_dir():
            raise OutputPathError(
                f"{what}={text!r} is a directory, not a file; give a file path inside it, "
                f"e.g. {os.fspath(given / 'channel_prune.cfg')!r}")
        if target.exists() and not target.is_file():
            raise OutputPathError(
                f"{what}={text!r} exists but is not a regular file (a device, socket or pipe); give the path of "
                "a regular file")
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
    fd, temp = _open_temp(folder, "probe", _TEMP_SUFFIX)
    os.close(fd)
    _remove_quietly(temp)


# ----------------------------------------------------------------------------------------------------------------
# Folder locks and recovery
# ----------------------------------------------------------------------------------------------------------------

def _lock_timeout() -> float:
    try:
        return float(os.environ.get("ACPS_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
    except ValueError:
        return LOCK_TIMEOUT_S


def _lock(folder: Path, exclusive: bool) -> int | None:
    """An open descriptor of ``folder`` holding its advisory lock, or None where locks are not available.

    Raises:
        OutputPathError: another process held the lock for longer than the timeout.
    """
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None  # a folder acps cannot open is reported by the read or write itself
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + _lock_timeout()
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise OutputPathError(
                    f"another process has been writing in {os.fspath(folder)} for over {_lock_timeout():g} s (an "
                    "acps search or prune with outputs in that folder); wait for it to finish or stop it, or "
                    "raise ACPS_LOCK_TIMEOUT") from None
            time.sleep(0.02)
        except OSError:
            os.close(fd)
            return None  # the file system does not lock (some network mounts)
        except BaseException:
            os.close(fd)
            raise


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def locked_folders(folders: Iterable[Path], exclusive: bool = True) -> Iterator[None]:
    """Hold the advisory lock of every folder (in path order, so two processes never wait on each other) inside
    the block, after recovering what a killed write left in them (see the module docs)."""
    held: list[int] = []
    try:
        for folder in sorted({Path(os.path.realpath(f)) for f in folders}):
            fd = _lock(folder, exclusive=True)
            if fd is None:
                continue
            held.append(fd)
            recover(folder)
            if not exclusive and fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_SH)  # recovered: other readers may read beside this one
        yield
    finally:
        for fd in reversed(held):
            _unlock(fd)


@contextlib.contextmanager
def reading(*paths: StrPath) -> Iterator[None]:
    """Read files that belong together (a config and its selection) inside the block: no acps process replaces
    them meanwhile, and a set a killed process left half-replaced is finished first."""
    with locked_folders((Path(os.path.realpath(os.fspath(p))).parent for p in paths), exclusive=False):
        yield


def recover(folder: Path) -> None:
    """Finish or undo the writes a killed process left in ``folder`` and remove its leftovers.

    Must be called with the folder's lock held: then no live acps process has a write in progress there, and every
    journal, temporary file and second name belongs to a process that died. Failures (a read-only folder) are
    logged, not raised: a reader can still read.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return
    needed: set[str] = set()  # files a journal that could not be replayed still refers to
    for name in sorted(names):
        if name.startswith(".") and name.endswith(_JOURNAL_SUFFIX):
            try:
                _replay(folder / name)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("could not finish the interrupted write recorded in %s: %s", folder / name, exc)
                needed.add(_marker(folder / name).name)
                needed.update(_referenced(folder / name))
    for name in names:
        path = folder / name
        if name.startswith(".") and name.endswith(_LEFTOVER_SUFFIXES) and name not in needed \
                and os.path.lexists(path):
            _remove_quietly(path)
            logger.debug("removed %s, left by an interrupted write", path)


def _marker(journal: Path) -> Path:
    """The file whose presence says a journaled write was being undone."""
    return journal.with_name(journal.name[: -len(_JOURNAL_SUFFIX)] + _ROLLBACK_SUFFIX)


def _referenced(journal: Path) -> set[str]:
    """The names of the temporary files and second names a journal lists (empty if it cannot be read)."""
    try:
        entries = json.loads(journal.read_text(encoding="utf-8"))["steps"]
        return {Path(e[key]).name for e in entries for key in ("temp", "old") if e[key] is not None}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _replay(journal: Path) -> None:
    """Roll a journaled write forward (it committed) or back (it was being undone), then remove the journal."""
    entries = json.loads(journal.read_text(encoding="utf-8"))["steps"]
    marker = _marker(journal)
    undo = marker.exists()
    touched = set()
    for entry in entries:
        target, temp, old = Path(entry["target"]), entry["temp"], entry["old"]
        touched.add(target.parent)
        if undo:
            if old is not None and os.path.lexists(old):
                os.replace(old, target)
            elif old is None and (temp is None or not os.path.lexists(temp)) and os.path.lexists(target):
                os.remove(target)  # a new file that was already in place
        elif temp is not None and os.path.lexists(temp):
            os.replace(temp, target)
        elif temp is None and os.path.lexists(target):
            os.remove(target)
    for entry in entries:
        for leftover in (entry["temp"], entry["old"]):
            if leftover is not None:
                _remove_quietly(Path(leftover))
    for folder in touched:
        _fsync_folder(folder)
    os.remove(journal)
    _remove_quietly(marker)
    _fsync_folder(journal.parent)
    logger.info("%s an interrupted write of %s", "undid" if undo else "finished",
                ", ".join(Path(e["target"]).name for e in entries))


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

def _open_temp(folder: Path, name: str, suffix: str) -> tuple[int, Path]:
    """Create a new, empty file ``.<name>.<random><suffix>`` in ``folder``; return its descriptor and path.

    ``os.open`` with mode 0o666 lets the process umask decide the permissions, as a plain ``open()`` would;
    ``tempfile.mkstemp`` would force 0o600 on every output file.
    """
    while True:
        temp = folder / f".{name}.{secrets.token_hex(4)}{suffix}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
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


def _write_new(folder: Path, name: str, suffix: str, data: bytes) -> Path:
    """Write ``data`` to a new file ``.<name>.<random><suffix>`` in ``folder``, flushed and fsync'ed."""
    fd, path = _open_temp(folder, name, suffix)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        _remove_quietly(path)
        raise
    return path


def _write_temp(target: Path, data: bytes, what: str) -> Path:
    """Write ``data`` to a new temporary file beside ``target`` (flushed and fsync'ed) and return its path.

    The temporary file takes the existing target's permission bits, so replacing it changes only the content.

    Raises:
        OutputPathError: the folder is not writable or the disk is full (the temporary file is removed).
    """
    try:
        fd, temp = _open_temp(target.parent, target.name, _TEMP_SUFFIX)
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
    """Delete a file acps made; a failure is only logged, so cleanup never hides the real error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        logger.debug("could not remove %s", path, exc_info=True)


def _second_name(target: Path) -> Path:
    """A second name for ``target``'s current content in its folder (a hard link, else a copy)."""
    while True:
        old = target.parent / f".{target.name}.{secrets.token_hex(4)}{_OLD_SUFFIX}"
        try:
            os.link(target, old)
            return old
        except FileExistsError:
            continue
        except OSError:
            break  # no hard links here (some file systems): copy
    fd, old = _open_temp(target.parent, target.name, _OLD_SUFFIX)
    os.close(fd)
    try:
        shutil.copy2(target, old)
    except BaseException:
        _remove_quietly(old)  # a partial copy must not stay behind
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
        target = _target_path(path, "output file")
        if target in targets or os.path.realpath(target) in {os.path.realpath(t) for t in targets}:
            raise OutputPathError(f"two outputs name the same file {os.fspath(target)}; give distinct paths")
        # Encode everything first, so an unencodable text fails before any file is touched.
        targets[target] = text if text is None or isinstance(text, bytes) else text.encode(encoding)
    with locked_folders(target.parent for target in targets):
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
            _remove_quietly(temp)
        raise
    steps = [target for target in targets if target in temps or os.path.lexists(target)]
    olds: dict[Path, Path] = {}
    journal: Path | None = None
    applied: list[Path] = []
    try:
        for target in steps:
            if os.path.lexists(target):
                try:
                    olds[target] = _second_name(target)
                except OSError as exc:
                    raise _os_error(exc, f"cannot keep the old {os.fspath(target)} aside while writing (no output "
                                    "was changed)", "check the folder's permissions and free space") from exc
        if len(steps) > 1 and fcntl is not None:
            journal = _write_journal(steps, temps, olds)
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
        _fsync_folder(folder)
    if journal is not None:
        _remove_quietly(journal)
    for old in olds.values():
        _remove_quietly(old)
    for target in applied:
        logger.debug("wrote %s", target)


def _write_journal(steps: list[Path], temps: Mapping[Path, Path], olds: Mapping[Path, Path]) -> Path:
    """Write the journal of a transaction (fsync'ed, with its folder): from here on it can be finished."""
    entries = [{"target": os.fspath(t), "temp": os.fspath(temps[t]) if t in temps else None,
                "old": os.fspath(olds[t]) if t in olds else None} for t in steps]
    data = json.dumps({"acps_journal": 1, "steps": entries}, indent=1).encode("utf-8")
    folder = steps[0].parent
    try:
        staged = _write_new(folder, steps[0].name, _TEMP_SUFFIX, data)
        journal = staged.with_name(staged.name[: -len(_TEMP_SUFFIX)] + _JOURNAL_SUFFIX)
        os.rename(staged, journal)  # a new name: the journal appears complete or not at all
    except OSError as exc:
        raise _os_error(exc, f"cannot write the journal of the outputs in {os.fspath(folder)} (no output was "
                        "changed)", "check the free disk space and the folder's permissions") from exc
    _fsync_folder(folder)
    return journal


def _undo(applied: list[Path], temps: Mapping[Path, Path], olds: Mapping[Path, Path],
          journal: Path | None) -> list[Path]:
    """Put back the old content of every applied target; returns the second names that could not go back."""
    if journal is not None:
        marker = _marker(journal)
        try:
            # From here on a kill is finished by undoing, since some targets may already be back.
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o666))
            _fsync_folder(marker.parent)
        except OSError:
            logger.debug("could not mark %s for undoing", journal, exc_info=True)
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
        _remove_quietly(temp)
    for old in olds.values():
        if old not in kept:
            _remove_quietly(old)
    if journal is not None and not kept:
        _remove_quietly(journal)
        _remove_quietly(_marker(journal))
    return kept
