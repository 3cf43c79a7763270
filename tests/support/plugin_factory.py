"""Build and really install throwaway acps plugin distributions, for tests of entry-point discovery.

Each distribution is a one-module project with a ``pyproject.toml`` declaring entry points in the ``acps``
group. It is installed with pip (no network, no build isolation) into a folder under the test's ``tmp_path``,
which is then put at the front of ``sys.path``, so ``importlib.metadata`` finds it exactly as it finds a
distribution installed by a user. Use it through a fixture::

    @pytest.fixture
    def installer(tmp_path, monkeypatch):
        with PluginInstaller(tmp_path, monkeypatch) as plugin_installer:
            yield plugin_installer

    def test_something(installer):
        installer.install("acps-demo", "acps_demo", PLUGIN_SOURCE)
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path
from types import TracebackType

import pytest

from acps_core.methods import registry as registry_module


class PluginInstaller:
    """Installs throwaway plugin distributions for one test and undoes their effects afterwards.

    While active, the module-level registry cache of :mod:`acps_core.methods.registry` starts empty, so the next
    :func:`acps_core.registry.get_registry` call discovers what the test installed; on exit the cache and
    ``sys.path`` are restored and the installed modules are dropped from ``sys.modules``.

    Args:
        tmp_path: the test's temporary folder (sources and install targets go below it).
        monkeypatch: the test's monkeypatch, which restores ``sys.path`` and the registry cache.
    """

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self._modules: list[str] = []
        self._count = 0

    def __enter__(self) -> PluginInstaller:
        self.monkeypatch.setattr(registry_module, "_default_manager", None)
        self.monkeypatch.setattr(registry_module, "_default_registry", None)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for module in self._modules:
            sys.modules.pop(module, None)
        importlib.invalidate_caches()

    def install(self, dist_name: str, module_name: str, module_source: str,
                entry_points: dict[str, str] | None = None, version: str = "0.1.0",
                site: Path | None = None) -> Path:
        """Build ``dist_name`` from one module and install it where ``importlib.metadata`` will find it.

        Args:
            dist_name: the distribution's name (``[project] name``).
            module_name: the top-level module the distribution installs.
            module_source: that module's source (dedented).
            entry_points: entry point name -> object reference in the ``acps`` group; default
                ``{module_name: module_name}``.
            version: the distribution's version.
            site: install into this folder (default: a fresh one); installing one distribution into two
                folders puts it on ``sys.path`` twice.

        Returns:
            The folder it was installed into (already at the front of ``sys.path``).

        Raises:
            RuntimeError: pip failed (its output is in the message).
        """
        self._count += 1
        source = self.tmp_path / f"src{self._count}-{dist_name}"
        source.mkdir(parents=True)
        (source / f"{module_name}.py").write_text(textwrap.dedent(module_source))
        entry_lines = "\n".join(
            f'"{name}" = "{target}"' for name, target in (entry_points or {module_name: module_name}).items()
        )
        (source / "pyproject.toml").write_text(
            '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n\n'
            f'[project]\nname = "{dist_name}"\nversion = "{version}"\n\n'
            f"[project.entry-points.acps]\n{entry_lines}\n\n"
            f'[tool.setuptools]\npy-modules = ["{module_name}"]\n'
        )
        target = site or self.tmp_path / f"site{self._count}"
        completed = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
             "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)],
            capture_output=True, text=True, check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"pip could not install {dist_name} from {source}:\n{completed.stdout}"
                               f"\n{completed.stderr}")
        self.monkeypatch.syspath_prepend(str(target))
        # A module of the same name imported by an earlier test must not shadow the one just installed.
        sys.modules.pop(module_name, None)
        self._modules.append(module_name)
        importlib.invalidate_caches()
        return target
