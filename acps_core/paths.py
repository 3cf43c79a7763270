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

from acps_core.atomic import StrPath, check_writable_output
from acps_core.errors import OutputPathError

#: ``(role, path)``: what the path is for (a parameter or option name) and the path as given (None: not used).
Role = tuple[str, Optional[StrPath]]


def same_file(first: StrPath, second: StrPath) -> bool:
    """Whether two paths name one file: after following links and ``..``, or as two names of one inode."""
    a, b = os.fspath(first), os.fspath(second)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False  # one of them does not exist (yet)


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
            :func:`~acps_core.atomic.check_writable_output`), is the same file as an input, or is the same file as
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
