"""Loading acps plugins: the plugin manager, the ``acps`` entry points, and where each plugin came from.

Plugins are modules named by entry points in the ``acps`` group; each implements the registration hooks of
:mod:`acps_core.methods.hookspecs`. :func:`get_plugin_manager` loads them one at a time, so one broken plugin is
skipped with an :class:`AcpsPluginWarning` and never takes the others down, and remembers the distribution of
each, so messages can name it. The environment variable ``ACPS_DISABLE_PLUGINS`` (comma-separated entry point
or distribution names) skips the named plugins, e.g. to choose between two plugins that register the same name.
Which methods the plugins provide is the registry's business (:mod:`acps_core.methods.registry`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import pluggy

from acps_core.errors import PluginError
from acps_core.methods import hookspecs
from acps_core.methods.hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME

if sys.version_info >= (3, 10):
    from importlib import metadata as importlib_metadata
else:  # the stdlib API before 3.10 cannot select entry points by group
    import importlib_metadata

__all__ = [
    "DISABLE_ENV_VAR",
    "IN_PROCESS",
    "AcpsPluginManager",
    "AcpsPluginWarning",
    "PluginFailure",
    "describe_origin",
    "get_plugin_manager",
    "origin_lookup",
    "register_in_process",
]

logger = logging.getLogger(__name__)

#: Environment variable naming plugins (entry point or distribution names, comma-separated) not to load.
DISABLE_ENV_VAR = "ACPS_DISABLE_PLUGINS"

#: The distribution shown for a plugin registered in-process rather than installed.
IN_PROCESS = "(in-process)"

_UNKNOWN_DISTRIBUTION = "(unknown distribution)"

#: acps's own methods and the distribution that holds each (``pip install 'acps-core[all]'`` installs them all).
BUILT_IN_METHODS = {
    **dict.fromkeys(("TaylorLossSensitivity", "NormalizedTaylorSensitivity", "FisherSensitivity",
                     "GroupTaylorSensitivity", "OutputChangeSensitivity", "BalancedL2NormSensitivity",
                     "GroupMagnitudeSensitivity", "MeasuredSensitivity"), "acps-sensitivity-methods"),
    **dict.fromkeys(("GreedySearch", "GlobalRankSearch"), "acps-search-greedy"),
    "KnapsackSearch": "acps-search-knapsack",
    **dict.fromkeys(("BitComplexity", "AscendLatency", "MeasuredLatency"), "acps-gain-estimators"),
}


class AcpsPluginWarning(UserWarning):
    """A plugin was skipped because it failed to import or to register its methods."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that provides no methods because it failed to load or was disabled.

    Attributes:
        plugin: the plugin's name (its entry point name for installed plugins).
        distribution: the distribution that installed it, or :data:`IN_PROCESS`.
        version: that distribution's version, when known.
        reason: why it was skipped, in a sentence a user can act on.
        disabled: ``True`` when skipped on purpose through ``ACPS_DISABLE_PLUGINS``; ``False`` when it failed.
    """

    plugin: str
    distribution: str
    version: str | None
    reason: str
    disabled: bool = False

    @property
    def origin(self) -> str:
        """Plugin, distribution and version in one phrase, for messages."""
        return describe_origin(self.plugin, self.distribution, self.version)


@dataclass(frozen=True)
class _PluginOrigin:
    """Where a registered plugin came from."""

    distribution: str
    version: str | None


def describe_origin(plugin: str, distribution: str, version: str | None) -> str:
    """``plugin 'x' (distribution acps-x 1.0)``, or ``plugin 'x' (in-process)``."""
    if distribution == IN_PROCESS:
        return f"plugin {plugin!r} {IN_PROCESS}"
    return f"plugin {plugin!r} (distribution {distribution}{' ' + version if version else ''})"


def _normalize(name: str) -> str:
    """PEP 503 normalisation, so ``acps_foo``, ``acps-foo`` and ``ACPS.Foo`` name the same distribution."""
    return re.sub(r"[-_.]+", "-", name).strip().lower()


def _disabled_plugin_names() -> set[str]:
    """The normalised names listed in ``ACPS_DISABLE_PLUGINS``."""
    raw = os.environ.get(DISABLE_ENV_VAR, "")
    return {_normalize(part) for part in raw.split(",") if part.strip()}


def _distribution_of(entry_point: Any) -> tuple[str, str | None]:
    """Name and version of the distribution declaring an entry point (``(unknown distribution)`` if none)."""
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return _UNKNOWN_DISTRIBUTION, None
    try:
        name = dist.metadata["Name"]
    except KeyError:  # newer importlib.metadata raises instead of returning None for a missing field
        name = None
    return (name or _UNKNOWN_DISTRIBUTION), dist.version


def _default_plugin_name(plugin: object) -> str:
    """A readable plugin name for an in-process plugin: a module's or class's name, else its type's name."""
    name = getattr(plugin, "__name__", None)
    return name if isinstance(name, str) and name else type(plugin).__name__


class AcpsPluginManager(pluggy.PluginManager):
    """A pluggy plugin manager for acps that remembers where each plugin came from and which ones failed.

    Build one with :func:`get_plugin_manager`. Plugins registered with :meth:`register` (not from an entry
    point) count as in-process plugins.

    Attributes:
        failures: plugins that failed to import or register, or that ``ACPS_DISABLE_PLUGINS`` skipped.
    """

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._origins: dict[str, _PluginOrigin] = {}

    def origin_of(self, plugin_name: str) -> tuple[str, str | None]:
        """``(distribution, version)`` of a registered plugin; ``(IN_PROCESS, None)`` for in-process ones."""
        origin = self._origins.get(plugin_name)
        return (origin.distribution, origin.version) if origin else (IN_PROCESS, None)

    def unregister(self, plugin: Any | None = None, name: str | None = None) -> Any | None:
        """Unregister a plugin object or name, forgetting where it came from (see pluggy's ``unregister``)."""
        if name is None and plugin is not None:
            name = self.get_name(plugin)
        removed = super().unregister(plugin=plugin, name=name)
        if name is not None:
            self._origins.pop(name, None)
        return removed

    def load_entrypoints(self, group: str = ENTRY_POINT_GROUP) -> int:
        """Load and register every plugin named by an entry point of ``group``, one at a time.

        Unlike pluggy's ``load_setuptools_entrypoints``, a plugin that fails to import or register is skipped
        with an :class:`AcpsPluginWarning` and recorded in :attr:`failures` while the others still load; a
        plugin named in ``ACPS_DISABLE_PLUGINS`` is recorded as disabled; and an entry point seen twice
        (its distribution found twice on ``sys.path``) is loaded once.

        Returns:
            The number of plugins registered.
        """
        disabled = _disabled_plugin_names()
        seen: set[tuple[str, str, str]] = set()
        loaded = 0
        for entry_point in importlib_metadata.entry_points(group=group):
            distribution, version = _distribution_of(entry_point)
            key = (_normalize(distribution), entry_point.name, entry_point.value)
            if key in seen:
                logger.debug("entry point %s of %s listed twice; loading it once",
                             entry_point.name, distribution)
                continue
            seen.add(key)
            if _normalize(entry_point.name) in disabled or _normalize(distribution) in disabled:
                logger.info("acps plugin %r (%s) disabled by %s",
                            entry_point.name, distribution, DISABLE_ENV_VAR)
                self.failures.append(PluginFailure(entry_point.name, distribution, version,
                                                   f"listed in {DISABLE_ENV_VAR}", disabled=True))
                continue
            if self._load_one(entry_point, distribution, version):
                loaded += 1
        return loaded

    def _load_one(self, entry_point: Any, distribution: str, version: str | None) -> bool:
        """Import and register one entry point; on failure warn, record it, and return False."""
        plugin_name = entry_point.name
        try:
            plugin = entry_point.load()
            if self.is_registered(plugin):
                # Two entry points naming one module: its hooks must run once, or every name would clash.
                logger.debug("acps plugin %r (%s) is already registered", plugin_name, distribution)
                return False
            if self.has_plugin(plugin_name):
                # Two distributions may pick the same entry point name; pluggy needs unique plugin names.
                plugin_name = f"{plugin_name}@{distribution}"
            self.register(plugin, name=plugin_name)
        except Exception as exc:  # any error in third-party code must skip that plugin only
            reason = f"{type(exc).__name__}: {exc}"
            self.failures.append(PluginFailure(plugin_name, distribution, version, reason))
            warnings.warn(
                f"acps {describe_origin(entry_point.name, distribution, version)}, entry point "
                f"{entry_point.name} = {entry_point.value}, failed to load and is skipped: {reason}. Fix or "
                f"uninstall it, or set {DISABLE_ENV_VAR}={entry_point.name} to skip it quietly.",
                AcpsPluginWarning,
                stacklevel=2,
            )
            return False
        self._origins[plugin_name] = _PluginOrigin(distribution, version)
        logger.debug("loaded acps plugin %r from %s %s", plugin_name, distribution, version)
        return True


def get_plugin_manager(load_entrypoints: bool = True) -> AcpsPluginManager:
    """Build a plugin manager holding the acps hookspecs and, optionally, the installed plugins.

    Args:
        load_entrypoints: load the plugins named by entry points of the ``acps`` group (see
            :meth:`AcpsPluginManager.load_entrypoints`). Tests pass ``False`` to get a clean manager and
            register in-process plugins on it.
    """
    manager = AcpsPluginManager()
    if load_entrypoints:
        manager.load_entrypoints()
    return manager


def origin_lookup(pm: pluggy.PluginManager) -> dict[str, tuple[str, str | None]]:
    """Plugin name -> (distribution, version) for every plugin registered on ``pm``."""
    origins: dict[str, tuple[str, str | None]] = {}
    if not isinstance(pm, AcpsPluginManager):
        # A plain pluggy manager knows the distributions of what load_setuptools_entrypoints loaded.
        for plugin, dist in pm.list_plugin_distinfo():
            name = pm.get_name(plugin)
            if name is not None:
                origins[name] = (dist.project_name, dist.version)
    for name, _plugin in pm.list_name_plugin():
        if name not in origins:
            origins[name] = pm.origin_of(name) if isinstance(pm, AcpsPluginManager) else (IN_PROCESS, None)
    return origins


def _unique_plugin_name(pm: pluggy.PluginManager, plugin: object, name: str | None = None) -> str:
    """``name`` (default: the plugin's own name), suffixed with a counter if another plugin already has it."""
    base = name or _default_plugin_name(plugin)
    candidate, counter = base, 1
    while pm.has_plugin(candidate):
        counter += 1
        candidate = f"{base}#{counter}"
    return candidate


def register_in_process(pm: pluggy.PluginManager, plugin: object, name: str | None = None) -> str:
    """Register an in-process plugin on ``pm`` under a unique name; return the name.

    Raises:
        PluginError: pluggy rejects it (already registered, or a hook whose arguments the hookspec lacks).
    """
    plugin_name = _unique_plugin_name(pm, plugin, name)
    try:
        pm.register(plugin, name=plugin_name)
    except Exception as exc:  # pluggy's validation errors are not acps errors; translate them
        raise PluginError(f"cannot register {describe_origin(plugin_name, IN_PROCESS, None)}: "
                          f"{type(exc).__name__}: {exc}") from exc
    return plugin_name
