"""Folder locks for writers and readers: a writer holds an advisory ``flock`` on every folder it writes in (taken
in path order, so two processes never wait on each other); a reader holds them too, so it never reads while a set
is replaced. Whoever takes a folder's lock first finishes what killed writes left there
(:func:`acps_core._util.journal.recover`)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from acps_core._util.files import LOCK_TIMEOUT_S, lock_folder, share_lock, unlock_folder
from acps_core._util.journal import recover
from acps_core.errors import ArgumentError


def _lock_timeout() -> float:
    """Seconds to wait for a folder's lock (``ACPS_LOCK_TIMEOUT``).

    Raises:
        ArgumentError: the variable is not a finite number of seconds >= 0.
    """
    raw = os.environ.get("ACPS_LOCK_TIMEOUT", "")
    if raw.strip() == "":
        return LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ArgumentError(f"the environment variable ACPS_LOCK_TIMEOUT={raw!r} must be a number of seconds >= 0 "
                            f"(the default is {LOCK_TIMEOUT_S:g})")
    return value



class Held:
    """The folders a process holds locked, and the targets of interrupted writes it could not finish (another
    process holds a folder they span): a new write to one of those targets must wait."""

    def __init__(self) -> None:
        self.folders: set[Path] = set()
        self.pending: set[Path] = set()


def _distinct(folders: Iterable[Path]) -> list[Path]:
    """The folders in path order, one name for each folder (two paths to one folder, a bind mount, would lock it
    twice: a process waits on its own lock)."""
    seen: set[tuple[int, int]] = set()
    distinct = []
    for folder in sorted(set(folders)):
        try:
            info = os.stat(folder)
            key = (info.st_dev, info.st_ino)
        except OSError:
            distinct.append(folder)
            continue
        if key not in seen:
            seen.add(key)
            distinct.append(folder)
    return distinct


@contextlib.contextmanager
def locked_folders(folders: Iterable[Path], exclusive: bool = True) -> Iterator[Held]:
    """Hold the advisory lock of every folder inside the block (see the module docs), after recovering what
    killed writes left in them. ``exclusive=False`` (readers) lets other readers in once recovered."""
    held = Held()
    descriptors: list[int] = []
    try:
        targets = _distinct(Path(os.path.realpath(f)) for f in folders)
        timeout = _lock_timeout()
        for folder in targets:
            fd = lock_folder(folder, timeout=timeout)
            if fd is not None:
                descriptors.append(fd)
                held.folders.add(folder)
        for folder in targets:
            if folder in held.folders:
                held.pending |= recover(folder, held.folders)
        if not exclusive:
            for fd in descriptors:
                share_lock(fd)  # recovered: other readers may read beside this one
        yield held
    finally:
        for fd in reversed(descriptors):
            unlock_folder(fd)


@contextlib.contextmanager
def reading(*paths: os.PathLike[str] | str) -> Iterator[None]:
    """Read files that belong together (a config and its selection) inside the block: no acps process replaces
    them meanwhile, and a set a killed process left half replaced is finished first."""
    folders = [Path(os.path.realpath(os.fspath(path))).parent for path in paths]
    with locked_folders(folders, exclusive=False):
        yield


