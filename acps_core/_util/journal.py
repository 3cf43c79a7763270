"""Folder locks, the journal of a write, and the recovery of writes a killed process left half done.

:mod:`acps_core._util.atomic` writes one call's outputs as one set; this module and :mod:`~acps_core._util.locks`
hold what makes that safe across processes:

- **Locks** (:mod:`~acps_core._util.locks`). A writer holds an advisory ``flock`` on every folder it writes
  in (taken in path order, so two processes never wait on each other); a reader holds them too, so it never
  reads while a set is replaced.
- **The journal.** Once every new file is written to its temporary name, the writer writes a journal into every
  folder of the set. The copy in a folder lists that folder's steps only, by bare file name (target, temporary
  file and its inode, the second name of the old file), and the folders of the whole set: from then on the set
  can be finished by anyone, and a journal never makes acps touch a file outside its own folder (a folder
  someone else prepared cannot aim it at the user's files; a folder copied or moved after a kill recovers
  itself).
- **Recovery.** Whoever takes a folder's lock first finishes the journaled writes found there (or undoes them,
  see :func:`_replay`) and removes what killed writes left behind (temporary files, second names, markers):
  with the lock held, no live acps process is writing there, so all of it belongs to a process that died.

File names: ``.<name>.<8 hex digits>.acps-tmp`` (a new file being written), ``.acps-old`` (the second name of an
old file), ``.acps-journal`` and ``.acps-undo`` (a write being undone). Only files named exactly so are ever
removed; a journal that does not read as one is left alone, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from acps_core._util.files import (
    JOURNAL,
    JOURNAL_SUFFIX,
    LEFTOVER,
    OLD_SUFFIX,
    TEMP_SUFFIX,
    UNDO_SUFFIX,
    fsync_folder,
    inode,
    lock_folder,
    remove_quietly,
    unlock_folder,
    write_new,
)
from acps_core.errors import AcpsError, OutputPathError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# The journal
# ----------------------------------------------------------------------------------------------------------------

def write_journal(steps: list[Path], temps: Mapping[Path, Path], olds: Mapping[Path, Path]) -> list[Path]:
    """Write the journal of a write into every folder it touches (fsync'ed, with the folders); its copies.

    Every copy is named ``.<first target's name>.<token>.acps-journal`` and lists its own folder's steps.

    Raises:
        OSError: a copy could not be written (the copies already written are removed).
    """
    folders = sorted({t.parent for t in steps})
    token = secrets.token_hex(4)
    copies: list[Path] = []
    try:
        for folder in folders:
            entries = [{"target": t.name, "temp": temps[t].name if t in temps else None,
                        "temp_inode": inode(temps[t]) if t in temps else None,
                        "old": olds[t].name if t in olds else None} for t in steps if t.parent == folder]
            data = json.dumps({"acps_journal": 2, "folders": [os.fspath(f) for f in folders], "steps": entries},
                              indent=1).encode("utf-8")
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
        os.close(os.open(_undo_marker(copies[0]), os.O_WRONLY | os.O_CREAT, 0o666))
        fsync_folder(copies[0].parent)
    except OSError:
        logger.debug("could not mark %s for undoing", copies[0], exc_info=True)


def remove_journal(copies: list[Path]) -> None:
    for copy in copies:
        remove_quietly(copy)
        remove_quietly(_undo_marker(copy))
    for folder in {copy.parent for copy in copies}:
        fsync_folder(folder)


def _undo_marker(journal: Path) -> Path:
    return journal.with_name(journal.name[: -len(JOURNAL_SUFFIX)] + UNDO_SUFFIX)


class _Journal:
    """One folder's copy of a journal, read and checked: its steps name files in its own folder only."""

    def __init__(self, path: Path) -> None:
        from acps_core._util.reading import read_bytes

        self.path = path
        self.folder = path.parent
        try:
            content = json.loads(read_bytes(path, "journal", "record", OutputPathError).decode("utf-8"))
        except (AcpsError, ValueError, RecursionError) as exc:
            raise ValueError(f"not a journal acps can read ({exc})") from exc
        if not isinstance(content, dict) or not isinstance(content.get("steps"), list) \
                or not isinstance(content.get("folders"), list) or not content["steps"]:
            raise ValueError("not an acps journal (no steps and folders)")
        self.folders = [Path(f) for f in content["folders"] if isinstance(f, str)]
        self.steps: list[dict[str, Any]] = []
        for entry in content["steps"]:
            self.steps.append(self._step(entry))

    def _step(self, entry: Any) -> dict[str, Any]:
        """A step with its files as paths in this folder; a name that leaves the folder, or that is not the
        name acps gives such a file, makes the journal one acps did not write."""
        if not isinstance(entry, dict):
            raise ValueError("a step is not an object")
        target = entry.get("target")
        if not isinstance(target, str) or not _bare(target):
            raise ValueError(f"the target {target!r} is not a file name in the journal's folder")
        step: dict[str, Any] = {"target": self.folder / target, "temp": None, "old": None,
                                "temp_inode": entry.get("temp_inode")}
        for key, suffix in (("temp", TEMP_SUFFIX), ("old", OLD_SUFFIX)):
            name = entry.get(key)
            if name is None:
                continue
            if not _bare(name) or not re.fullmatch(re.escape(f".{target}.") + r"[0-9a-f]{8}" + re.escape(suffix),
                                                   name):
                raise ValueError(f"the {key} file {name!r} is not one acps names for {target!r}")
            step[key] = self.folder / name
        return step

    def done(self, step: dict[str, Any]) -> bool:
        """Whether a step happened: its target is the new file (same inode), or, for a deletion, is gone."""
        if step["temp"] is None:
            return not os.path.lexists(step["target"])
        return step["temp_inode"] is not None and inode(step["target"]) == step["temp_inode"]

    def can_finish(self, step: dict[str, Any]) -> bool:
        return self.done(step) or step["temp"] is None or os.path.lexists(step["temp"])


def _bare(name: Any) -> bool:
    """A file name with no folder in it."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\x00" not in name \
        and (os.altsep is None or os.altsep not in name) and os.sep not in name


def _partners(journal: Path, folders: list[Path], own: Path) -> list[Path] | None:
    """The copies of a journal in the other folders of its write; None when one of them is missing (the write
    never reached its commit point there, or the folder was moved or copied)."""
    found = []
    for folder in folders:
        if folder == own:
            continue
        copy = folder / journal.name
        if not os.path.lexists(copy):
            return None
        found.append(copy)
    return found


# ----------------------------------------------------------------------------------------------------------------
# Recovery
# ----------------------------------------------------------------------------------------------------------------

def recover(folder: Path, held: set[Path] | None = None) -> set[Path]:
    """Finish or undo the journaled writes a killed process left in ``folder`` and remove its leftovers.

    Must be called with the folder's lock held (``held``: every folder the caller holds): then no live acps
    process is writing there, and every journal, temporary file and second name belongs to a process that died.
    A journal whose write spans a folder another process holds now is left for later, with its files. A file
    named like a journal that does not read as one is left alone, with a warning. Failures (a read-only folder)
    are logged, not raised: a reader can still read.

    Returns:
        The targets of the writes left for later.
    """
    own = Path(os.path.realpath(folder))
    held = {own} if held is None else held
    try:
        names = sorted(os.listdir(own))
    except OSError:
        return set()
    pending: set[Path] = set()
    needed: set[str] = set()  # files of journals left for later
    for name in names:
        if not JOURNAL.fullmatch(name) or not os.path.isfile(own / name):
            continue
        try:
            journal = _Journal(own / name)
        except ValueError as exc:
            logger.warning("%s is named like an acps journal but is not one (%s); it is left alone", own / name, exc)
            continue
        partners = _partners(journal.path, journal.folders, own) if own in journal.folders else None
        others = [copy.parent for copy in partners or []]
        extra = [lock_folder(other, wait=False) for other in others if other not in held]
        try:
            if None in extra:  # another process holds a folder of this write: it is finished later
                pending |= {s["target"] for s in journal.steps}
                needed |= {name, _undo_marker(journal.path).name}
                needed |= {s[key].name for s in journal.steps for key in ("temp", "old") if s[key] is not None}
                continue
            _replay(journal, [_Journal(copy) for copy in partners] if partners is not None else None)
        except (OSError, ValueError) as exc:
            logger.warning("could not finish the interrupted write recorded in %s: %s", journal.path, exc)
            needed |= {name, _undo_marker(journal.path).name}
        finally:
            for fd in extra:
                if fd is not None:
                    unlock_folder(fd)
    for name in names:
        path = own / name
        if LEFTOVER.fullmatch(name) and name not in needed and os.path.lexists(path) and not os.path.isdir(path):
            remove_quietly(path)
            logger.debug("removed %s, left by an interrupted write", path)
    return pending


def _replay(journal: _Journal, partners: list[_Journal] | None) -> None:
    """Finish a journaled write, or undo it; then remove its journal copies and leftovers.

    With every copy of the journal at hand (``partners``), the write is finished when every step that did not
    happen yet still can (its temporary file is there) and nobody marked it for undoing; otherwise the steps that
    happened get their old files back. A copy missing from another folder means the write never reached its
    commit point there, or the folder was moved or copied since: then only this folder's steps are known, and
    they are kept if all of them happened (the write was finished), else undone.
    """
    copies = [journal, *(partners or [])]
    steps = [(copy, step) for copy in copies for step in copy.steps]
    undo = any(os.path.lexists(_undo_marker(copy.path)) for copy in copies)
    if partners is None and len(journal.folders) > 1:
        forward = not undo and all(journal.done(step) for step in journal.steps)
    else:
        forward = not undo and all(copy.can_finish(step) for copy, step in steps)
    for copy, step in steps:
        target, temp, old = step["target"], step["temp"], step["old"]
        if forward and not copy.done(step):
            if temp is not None:
                os.replace(temp, target)
            else:
                os.remove(target)
        elif not forward and copy.done(step):
            if old is not None and os.path.lexists(old):
                os.replace(old, target)
            elif old is None and os.path.lexists(target):
                os.remove(target)  # a file the write created
    for _, step in steps:
        for leftover in (step["temp"], step["old"]):
            if leftover is not None:
                remove_quietly(leftover)
    for folder in {copy.folder for copy in copies}:
        fsync_folder(folder)
    remove_journal([copy.path for copy in copies])
    logger.info("%s an interrupted write of %s", "finished" if forward else "undid",
                ", ".join(step["target"].name for _, step in steps))
