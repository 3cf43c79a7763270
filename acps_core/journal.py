"""Folder locks, the journal of a write, and the recovery of writes a killed process left half done.

:mod:`acps_core.atomic` writes one call's outputs as one set; this module holds what makes that safe across
processes:

- **Locks.** A writer holds an advisory ``flock`` on every folder it writes in (taken in path order, so two
  processes never wait on each other); a reader holds them too, so it never reads while a set is replaced.
- **The journal.** Once every new file is written to its temporary name, the writer writes a journal listing
  every step (target, temporary file and its inode, the second name of the old file) into every folder of the
  set: from then on the set can be finished by anyone.
- **Recovery.** Whoever takes a folder's lock first finishes the journaled writes found there (or undoes them,
  see :func:`_replay`) and removes what killed writes left behind (temporary files, second names, markers):
  with the lock held, no live acps process is writing there, so all of it belongs to a process that died.

File names: ``.<name>.<8 hex digits>.acps-tmp`` (a new file being written), ``.acps-old`` (the second name of an
old file), ``.acps-journal`` and ``.acps-undo`` (a write being undone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
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
_LEFTOVER_SUFFIXES = (TEMP_SUFFIX, OLD_SUFFIX, UNDO_SUFFIX)
#: Seconds a writer waits for another process writing in the same folder (``ACPS_LOCK_TIMEOUT`` overrides).
LOCK_TIMEOUT_S = 120.0
#: Whether this system has the advisory locks the journal relies on.
LOCKS = fcntl is not None


# ----------------------------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------------
# Locks
# ----------------------------------------------------------------------------------------------------------------

def _lock_timeout() -> float:
    try:
        return float(os.environ.get("ACPS_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
    except ValueError:
        return LOCK_TIMEOUT_S


def _lock(folder: Path, wait: bool = True) -> int | None:
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
    deadline = time.monotonic() + _lock_timeout()
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


class Held:
    """The folders a process holds locked, and the targets of interrupted writes it could not finish (another
    process holds a folder they span): a new write to one of those targets must wait."""

    def __init__(self) -> None:
        self.folders: set[Path] = set()
        self.pending: set[Path] = set()


@contextlib.contextmanager
def locked_folders(folders: Iterable[Path], exclusive: bool = True) -> Iterator[Held]:
    """Hold the advisory lock of every folder inside the block (see the module docs), after recovering what
    killed writes left in them. ``exclusive=False`` (readers) lets other readers in once recovered."""
    held = Held()
    descriptors: list[int] = []
    try:
        targets = sorted({Path(os.path.realpath(f)) for f in folders})
        for folder in targets:
            fd = _lock(folder)
            if fd is not None:
                descriptors.append(fd)
                held.folders.add(folder)
        for folder in targets:
            if folder in held.folders:
                held.pending |= recover(folder, held.folders)
        if not exclusive and fcntl is not None:
            for fd in descriptors:
                fcntl.flock(fd, fcntl.LOCK_SH)  # recovered: other readers may read beside this one
        yield held
    finally:
        for fd in reversed(descriptors):
            _unlock(fd)


@contextlib.contextmanager
def reading(*paths: os.PathLike[str] | str) -> Iterator[None]:
    """Read files that belong together (a config and its selection) inside the block: no acps process replaces
    them meanwhile, and a set a killed process left half replaced is finished first."""
    folders = [Path(os.path.realpath(os.fspath(path))).parent for path in paths]
    with locked_folders(folders, exclusive=False):
        yield


# ----------------------------------------------------------------------------------------------------------------
# The journal
# ----------------------------------------------------------------------------------------------------------------

def write_journal(steps: list[Path], temps: Mapping[Path, Path], olds: Mapping[Path, Path]) -> list[Path]:
    """Write the journal of a write into every folder it touches (fsync'ed, with the folders); its copies.

    Raises:
        OSError: a copy could not be written (the copies already written are removed).
    """
    entries = [{"target": os.fspath(t), "temp": os.fspath(temps[t]) if t in temps else None,
                "temp_inode": inode(temps[t]) if t in temps else None,
                "old": os.fspath(olds[t]) if t in olds else None} for t in steps]
    data = json.dumps({"acps_journal": 1, "steps": entries}, indent=1).encode("utf-8")
    token = secrets.token_hex(4)
    copies: list[Path] = []
    try:
        for folder in sorted({t.parent for t in steps}):
            staged = write_new(folder, steps[0].name, TEMP_SUFFIX, data)
            copy = folder / f".{steps[0].name}.{token}{JOURNAL_SUFFIX}"
            os.rename(staged, copy)  # a new name: the copy appears complete or not at all
            copies.append(copy)
            fsync_folder(folder)
    except BaseException:
        for copy in copies:
            remove_quietly(copy)
        raise
    return copies


def mark_undo(copies: list[Path]) -> None:
    """Say that a journaled write is being undone (a process killed meanwhile is then undone, not finished)."""
    try:
        fd, _ = open_new(copies[0].parent, _stem(copies[0]), UNDO_SUFFIX, token=_token(copies[0]))
        os.close(fd)
        fsync_folder(copies[0].parent)
    except OSError:
        logger.debug("could not mark %s for undoing", copies[0], exc_info=True)


def remove_journal(copies: list[Path]) -> None:
    for copy in copies:
        remove_quietly(copy)
        remove_quietly(_undo_marker(copy))
    for folder in {copy.parent for copy in copies}:
        fsync_folder(folder)


def _stem(journal: Path) -> str:
    """``name`` of a journal ``.<name>.<token>.acps-journal``."""
    return journal.name[1: -len(JOURNAL_SUFFIX)].rsplit(".", 1)[0]


def _token(journal: Path) -> str:
    return journal.name[: -len(JOURNAL_SUFFIX)].rsplit(".", 1)[1]


def _undo_marker(journal: Path) -> Path:
    return journal.with_name(journal.name[: -len(JOURNAL_SUFFIX)] + UNDO_SUFFIX)


# ----------------------------------------------------------------------------------------------------------------
# Recovery
# ----------------------------------------------------------------------------------------------------------------

def recover(folder: Path, held: set[Path] | None = None) -> set[Path]:
    """Finish or undo the journaled writes a killed process left in ``folder`` and remove its leftovers.

    Must be called with the folder's lock held (``held``: every folder the caller holds): then no live acps
    process is writing there, and every journal, temporary file and second name belongs to a process that died.
    A journal that spans a folder another process holds now is left for later, with its files. Failures (a
    read-only folder) are logged, not raised: a reader can still read.

    Returns:
        The targets of the writes left for later.
    """
    held = {folder} if held is None else held
    try:
        names = os.listdir(folder)
    except OSError:
        return set()
    pending: set[Path] = set()
    needed: set[str] = set()  # files a journal left for later still refers to
    for name in sorted(names):
        if not (name.startswith(".") and name.endswith(JOURNAL_SUFFIX)) or not os.path.lexists(folder / name):
            continue
        journal = folder / name
        try:
            entries = json.loads(journal.read_text(encoding="utf-8"))["steps"]
            others = {Path(e["target"]).parent for e in entries} - held
            extra = [_lock(other, wait=False) for other in sorted(others) if os.path.isdir(other)]
            try:
                if None in extra and LOCKS:
                    pending |= {Path(e["target"]) for e in entries}
                    needed |= {journal.name, _undo_marker(journal).name}
                    needed |= {Path(e[key]).name for e in entries for key in ("temp", "old") if e[key] is not None}
                    continue
                _replay(journal, entries)
            finally:
                for fd in extra:
                    if fd is not None:
                        _unlock(fd)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("could not finish the interrupted write recorded in %s: %s", journal, exc)
            needed |= {journal.name, _undo_marker(journal).name}
    for name in names:
        path = folder / name
        if name.startswith(".") and name.endswith(_LEFTOVER_SUFFIXES) and name not in needed \
                and os.path.lexists(path):
            remove_quietly(path)
            logger.debug("removed %s, left by an interrupted write", path)
    return pending


def _replay(journal: Path, entries: list[dict]) -> None:  # type: ignore[type-arg]
    """Finish a journaled write, or undo it; then remove its journal copies and leftovers.

    A step is done when its target is the temporary file (same inode) or, for a file the set deletes, when the
    target is gone. The write is finished when every step that is not done can still be done (its temporary file
    is there) and nobody marked it for undoing; otherwise (a process marked it, or a copy of the journal was
    missing from a folder whose temporary files were cleaned) the done steps get their old files back.
    """
    token = _token(journal)
    copies = [Path(e["target"]).parent / f".{_stem(journal)}.{token}{JOURNAL_SUFFIX}" for e in entries]
    undo = any(os.path.lexists(_undo_marker(copy)) for copy in copies)

    def done(entry: dict) -> bool:  # type: ignore[type-arg]
        if entry["temp"] is None:
            return not os.path.lexists(entry["target"])
        return entry["temp_inode"] is not None and inode(entry["target"]) == entry["temp_inode"]

    finishable = all(done(e) or e["temp"] is None or os.path.lexists(e["temp"]) for e in entries)
    forward = finishable and not undo
    for entry in entries:
        target, temp, old = entry["target"], entry["temp"], entry["old"]
        if forward and not done(entry):
            if temp is not None:
                os.replace(temp, target)
            else:
                os.remove(target)
        elif not forward and done(entry):
            if old is not None and os.path.lexists(old):
                os.replace(old, target)
            elif old is None and os.path.lexists(target):
                os.remove(target)  # a file the write created
    for entry in entries:
        for leftover in (entry["temp"], entry["old"]):
            if leftover is not None:
                remove_quietly(Path(leftover))
    for folder in {Path(e["target"]).parent for e in entries}:
        fsync_folder(folder)
    remove_journal(sorted(set(copies)))
    logger.info("%s an interrupted write of %s", "finished" if forward else "undid",
                ", ".join(Path(e["target"]).name for e in entries))
