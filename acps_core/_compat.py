"""Old import paths keep working.

acps's modules once lived side by side in ``acps_core/``; they now live in sub-packages that follow the data
flow (``config``, ``graph``, ``layers``, ``methods``, ``search``, ``prune``, ``report``, ``cli``, ``_util``).
Plugins, scripts and pickled models may still name the old modules (``acps_core.bases``,
``acps_core.problem``, a pruned model pickled with ``acps_core.attention``'s classes). This finder makes each old
name import as the module that now holds its code: the same module object, so patching or pickling through
either name means the same thing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

#: Old module -> the module that holds its code now. The old modules ``config``, ``graph``, ``prune``,
#: ``report`` and ``cli`` are packages of the same name, whose ``__init__`` re-exports their public names.
MOVED = {
    "acps_core.api": "acps_core.search.run",
    "acps_core.atomic": "acps_core._util.atomic",
    "acps_core.attention": "acps_core.layers.attention",
    "acps_core.bases": "acps_core.methods.bases",
    "acps_core.data": "acps_core._util.data",
    "acps_core.demo": "acps_core.cli.demo",
    "acps_core.distributed": "acps_core._util.distributed",
    "acps_core.figure": "acps_core.report.figure",
    "acps_core.hookspecs": "acps_core.methods.hookspecs",
    "acps_core.journal": "acps_core._util.journal",
    "acps_core.loading": "acps_core.cli.loading",
    "acps_core.masking": "acps_core.graph.masking",
    "acps_core.model_checks": "acps_core._util.model_checks",
    "acps_core.norm_correction": "acps_core.prune.norm_correction",
    "acps_core.paths": "acps_core._util.paths",
    "acps_core.problem": "acps_core.search.problem",
    "acps_core.progress": "acps_core._util.progress",
    "acps_core.reading": "acps_core._util.reading",
    "acps_core.reconstruction": "acps_core.prune.reconstruction",
    "acps_core.registry": "acps_core.methods.registry",
    "acps_core.result": "acps_core.report.result",
    "acps_core.selection": "acps_core.config.selection",
    "acps_core.state": "acps_core._util.state",
    "acps_core.verify": "acps_core.graph.verify",
    "acps_core.wrappers": "acps_core._util.wrappers",
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as the module in :data:`MOVED`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was imported under its own name."""


def install() -> None:
    """Put the finder in ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _OldNames) for finder in sys.meta_path):
        sys.meta_path.append(_OldNames())


def old_module(package: str, name: str) -> ModuleType:
    """The module an old name ``package.name`` stands for, for attribute access on the package.

    Raises:
        AttributeError: ``name`` is no old module name.
    """
    moved = MOVED.get(f"{package}.{name}")
    if moved is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return importlib.import_module(moved)
