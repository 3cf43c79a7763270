"""The files one call reads and writes, checked together before anything is written.

Every public call and command lists the paths it reads (configs, their selection files, data, checkpoints) and
the paths it writes (outputs and the side files beside them). :func:`check_paths` refuses, before any heavy work
and before a single byte is written, an output that cannot be written, an output that is one of the inputs
(also through a symbolic link, ``..`` or a hard link), and two outputs that are one file; the error names both
roles, so the user sees which argument to change.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from acps_core._util.atomic import StrPath, check_writable_output
from acps_core.errors import OutputPathError

#: ``(role, path)``: what the path is for (a parameter or option name) and the path as given (None: not used).
Role = tuple[str, Optional[StrPath]]


def same_file(first: StrPath, second: StrPath) -> bool:
    """Whether two paths name one file: after following links and ``..``, as two names of one inode, or (for a
    file not there yet) as one name in one folder reached by two paths (a bind mount, a case-insensitive name)."""
    a, b = os.path.realpath(os.fspath(first)), os.path.realpath(os.fspath(second))
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        pass  # one of them does not exist (yet)
    if os.path.lexists(a) != os.path.lexists(b):
        return False
    try:
        same_folder = os.path.samefile(os.path.dirname(a), os.path.dirname(b))
    except (OSError, ValueError):
        return False
    names = os.path.basename(a), os.path.basename(b)
    return same_folder and (names[0] == names[1] or (names[0].lower() == names[1].lower()
                                                     and _folds_case(os.path.dirname(a))))


def _folds_case(folder: str) -> bool:
    """Whether names in ``folder`` ignore case (macOS and Windows by default): its own name in other case is
    the same folder."""
    swapped = os.path.join(os.path.dirname(folder), os.path.basename(folder).swapcase())
    if swapped == folder:
        return False
    try:
        return os.path.samefile(folder, swapped)
    except (OSError, ValueError):
        return False


def _shown(role: str, path: StrPath) -> str:
    return f"{role}={os.fspath(path)!r}"


def check_paths(reads: Sequence[Role], writes: Sequence[Role]) -> list[Path]:
    """Check every output of a call against the others and against every input.

    Args:
        reads: the files the call reads, as ``(role, path)``; ``None`` paths are skipped.
        writes: the files the call writes, as ``(role, path)``; ``None`` paths are skipped.

    Returns:
        The absolute write targets (a symbolic link resolved to its target), in the order given.

    Raises:
        OutputPathError: an output cannot be written (see
            :func:`~acps_core._util.atomic.check_writable_output`), is the same file as an input, or is the same file as
            another output; naming both roles and paths.
    """
    outputs = [(role, path) for role, path in writes if path is not None]
    inputs = [(role, path) for role, path in reads if path is not None]
    targets = [check_writable_output(path, role) for role, path in outputs]
    for index, (role, path) in enumerate(outputs):
        for in_role, in_path in inputs:
            if same_file(path, in_path):
                raise OutputPathError(
                    f"{_shown(role, path)} is the same file as the input {_shown(in_role, in_path)}: writing it "
                    f"would destroy that input; give {role} another path")
        for other_role, other_path in outputs[index + 1:]:
            if same_file(path, other_path):
                raise OutputPathError(
                    f"{_shown(role, path)} and {_shown(other_role, other_path)} are the same file, and one "
                    "would overwrite the other; give them different paths")
    return targets
