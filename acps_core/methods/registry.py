"""The plugin registry: which sensitivity, search and gain methods are installed, and from where.

A method is a class of one of three kinds, each with its base class:

=============  =====================================  ==============================================
kind           base class                             users select it with
=============  =====================================  ==============================================
sensitivity    :class:`acps_core.SensitivityBase`     ``sensitivity="Name"``
search         :class:`acps_core.SearchChannelBase`   ``search_alg="Name"``
gain           :class:`acps_core.GainEstimatorBase`   ``gain="Name"``
=============  =====================================  ==============================================

Plugins are modules named by entry points in the ``acps`` group; each implements the registration hooks of
:mod:`acps_core.methods.hookspecs` and hands its classes to ``register(name, cls)``. :func:`get_plugin_manager` loads
them one at a time, so one broken plugin is skipped with an :class:`AcpsPluginWarning` and never takes the
others down; :class:`Registry` calls each plugin's hooks on its own, so every method is attributed to the
plugin and distribution that provided it, and two plugins claiming one name is an error naming both.

The environment variable ``ACPS_DISABLE_PLUGINS`` (comma-separated entry point or distribution names) skips
the named plugins, e.g. to choose between two plugins that register the same name.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, overload

import pluggy

from acps_core.errors import PluginError
from acps_core.methods import hookspecs
from acps_core.methods.bases import GainEstimatorBase, SearchChannelBase, SensitivityBase
from acps_core.methods.hookspecs import ENTRY_POINT_GROUP, HOOK_BY_KIND, PROJECT_NAME

if sys.version_info >= (3, 10):
    from importlib import metadata as importlib_metadata
else:  # the stdlib API before 3.10 cannot select entry points by group
    import importlib_metadata

__all__ = [
    "DISABLE_ENV_VAR",
    "IN_PROCESS",
    "KINDS",
    "METHOD_BASES",
    "PARAMETER_BY_KIND",
    "AcpsPluginManager",
    "AcpsPluginWarning",
    "MethodArgumentError",
    "MethodInfo",
    "PluginFailure",
    "Registry",
    "format_plugins_table",
    "get_plugin_manager",
    "get_registry",
    "register_plugin",
    "resolve_method",
    "unregister_plugin",
]

logger = logging.getLogger(__name__)

#: Environment variable naming plugins (entry point or distribution names, comma-separated) not to load.
DISABLE_ENV_VAR = "ACPS_DISABLE_PLUGINS"

#: The distribution shown for a plugin registered in-process rather than installed.
IN_PROCESS = "(in-process)"

#: The base class every method of a kind must subclass.
METHOD_BASES: dict[str, type] = {
    "sensitivity": SensitivityBase,
    "search": SearchChannelBase,
    "gain": GainEstimatorBase,
}

#: The method kinds, in the order the pipeline uses them (and :meth:`Registry.methods` lists them).
KINDS: tuple[str, ...] = tuple(HOOK_BY_KIND)

#: The keyword argument of the public call through which users select a method of each kind.
PARAMETER_BY_KIND: dict[str, str] = {"sensitivity": "sensitivity", "search": "search_alg", "gain": "gain"}

_UNKNOWN_DISTRIBUTION = "(unknown distribution)"

# Names users type as strings: letters, digits, '_', '-' and '.', starting with a letter or '_'.
_METHOD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


class AcpsPluginWarning(UserWarning):
    """A plugin was skipped because it failed to import or to register its methods."""


class MethodArgumentError(PluginError, TypeError):
    """A ``sensitivity=``/``search_alg=``/``gain=`` argument is neither a method name nor an instance."""


@dataclass(frozen=True)
class MethodInfo:
    """One installed method: what it is called, its class, and which plugin and distribution provide it.

    Attributes:
        kind: ``"sensitivity"``, ``"search"`` or ``"gain"``.
        name: the name users pass to select it.
        cls: the method class (a subclass of ``METHOD_BASES[kind]``).
        plugin: name of the plugin that registered it (its entry point name for installed plugins).
        distribution: the distribution that installed the plugin, or :data:`IN_PROCESS`.
        version: that distribution's version (``None`` for in-process plugins).
    """

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str | None

    @property
    def class_path(self) -> str:
        """The class as ``module:qualname``."""
        return f"{self.cls.__module__}:{self.cls.__qualname__}"

    @property
    def origin(self) -> str:
        """Plugin, distribution and version in one phrase, for messages."""
        return _describe_origin(self.plugin, self.distribution, self.version)


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
        return _describe_origin(self.plugin, self.distribution, self.version)


@dataclass(frozen=True)
class _PluginOrigin:
    """Where a registered plugin came from."""

    distribution: str
    version: str | None


def _describe_origin(plugin: str, distribution: str, version: str | None) -> str:
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


def _kind_base(kind: str) -> type:
    """The base class of a method kind; PluginError for an unknown kind."""
    try:
        return METHOD_BASES[kind]
    except KeyError:
        raise PluginError(f"unknown method kind {kind!r}; the kinds are {', '.join(KINDS)}") from None


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
                f"acps {_describe_origin(entry_point.name, distribution, version)}, entry point "
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


def _origin_lookup(pm: pluggy.PluginManager) -> dict[str, tuple[str, str | None]]:
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


def _collect_methods(pm: pluggy.PluginManager, plugin: object, plugin_name: str, distribution: str,
                     version: str | None) -> tuple[list[MethodInfo], list[str]]:
    """Call one plugin's registration hooks; return its methods and the problems found (empty if none)."""
    methods: list[MethodInfo] = []
    problems: list[str] = []
    origin = _describe_origin(plugin_name, distribution, version)
    hook_names = {hook: kind for kind, hook in HOOK_BY_KIND.items()}
    for caller in pm.get_hookcallers(plugin) or []:
        impls = [impl for impl in caller.get_hookimpls() if impl.plugin is plugin]
        if not caller.has_spec():
            # A misspelt hook would otherwise do nothing at all, silently.
            if any(not impl.optionalhook for impl in impls):
                close = difflib.get_close_matches(caller.name, list(hook_names), n=1, cutoff=0.6)
                hint = f"rename it to {close[0]}" if close else f"the hooks are {', '.join(hook_names)}"
                problems.append(f"it implements unknown hook {caller.name}(); {hint}")
            continue
        kind = hook_names.get(caller.name)
        if kind is None:
            continue
        for impl in impls:
            if impl.hookwrapper or impl.wrapper:
                problems.append(f"its {caller.name}() is a hook wrapper; registration hooks must be plain")
                continue
            register = _make_register(kind, plugin_name, distribution, version, origin, methods, problems)
            arguments = {"register": register}
            try:
                impl.function(*[arguments[name] for name in impl.argnames])
            except Exception as exc:  # third-party code: report it against the plugin, never crash
                problems.append(f"its {caller.name}() raised {type(exc).__name__}: {exc}")
    return methods, problems


def _make_register(kind: str, plugin_name: str, distribution: str, version: str | None, origin: str,
                   methods: list[MethodInfo], problems: list[str]) -> hookspecs.Register:
    """The ``register(name, cls)`` callback handed to one plugin's hook for one kind."""
    base = METHOD_BASES[kind]

    def register(name: str, cls: type) -> None:
        """Record ``cls`` as the ``kind`` method called ``name`` (problems are collected, not raised)."""
        if not isinstance(name, str) or not _METHOD_NAME.fullmatch(name):
            problems.append(
                f"it registered a {kind} method under the name {name!r}; a method name must be a non-empty "
                "string of letters, digits, '_', '-' or '.', starting with a letter or '_'"
            )
            return
        if not isinstance(cls, type):
            problems.append(
                f"it registered {cls!r} (a {type(cls).__name__}) as {kind} method {name!r}; register the "
                f"class itself, a subclass of acps_core.{base.__name__}"
            )
            return
        if not issubclass(cls, base):
            problems.append(
                f"it registered {cls.__module__}:{cls.__qualname__} as {kind} method {name!r}, but that "
                f"class is not a subclass of acps_core.{base.__name__}; a {kind} method must subclass "
                f"acps_core.{base.__name__}"
            )
            return
        for earlier in methods:
            if earlier.kind == kind and earlier.name == name and earlier.cls is not cls:
                problems.append(
                    f"it registered two classes as {kind} method {name!r}: {earlier.class_path} and "
                    f"{cls.__module__}:{cls.__qualname__}"
                )
                return
        methods.append(MethodInfo(kind, name, cls, plugin_name, distribution, version))
        logger.debug("%s registered %s method %r: %s", origin, kind, name, cls.__qualname__)

    return register


class Registry:
    """The installed methods of every kind, each attributed to its plugin and distribution.

    Build one with :meth:`from_plugin_manager` or :meth:`build`; :func:`get_registry` keeps the one built
    from the installed plugins.

    Args:
        methods: the methods; each (kind, name) pair may be claimed by one class only.
        failures: plugins that failed to load or were disabled.

    Raises:
        PluginError: two plugins register the same name for the same kind (names both, and how to choose).
    """

    def __init__(self, methods: Iterable[MethodInfo] = (), failures: Iterable[PluginFailure] = ()) -> None:
        self._methods: dict[tuple[str, str], MethodInfo] = {}
        self._failures = list(failures)
        conflicts: list[str] = []
        for method in methods:
            _kind_base(method.kind)
            key = (method.kind, method.name)
            earlier = self._methods.get(key)
            if earlier is None:
                self._methods[key] = method
            elif earlier.cls is not method.cls:
                conflicts.append(
                    f"{method.kind} method {method.name!r} is registered twice: by {earlier.origin} as "
                    f"{earlier.class_path} and by {method.origin} as {method.class_path}"
                )
            else:
                # The same class under the same name loses nothing; keep the first attribution.
                logger.debug("%s method %r registered again by %s", method.kind, method.name, method.origin)
        if conflicts:
            raise PluginError(
                "; ".join(conflicts) + f". Uninstall one of them, or set {DISABLE_ENV_VAR} to the entry "
                "point or distribution name of the one you do not want (e.g. "
                f"{DISABLE_ENV_VAR}=<distribution>)."
            )

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registry:
        """Collect the methods of every plugin registered on ``pm``.

        Each plugin's registration hooks are called on their own, so every method is attributed to its plugin.
        A plugin whose hook raises, or that registers an invalid name or a class not derived from the kind's
        base class, provides no methods: it is recorded in :attr:`failures` with the reason and an
        :class:`AcpsPluginWarning` is issued.

        Raises:
            PluginError: two plugins register the same name for the same kind.
        """
        failures = list(getattr(pm, "failures", ()))
        origins = _origin_lookup(pm)
        methods: list[MethodInfo] = []
        for plugin_name, plugin in pm.list_name_plugin():
            if plugin is None:  # a name pluggy blocks has no plugin object
                continue
            distribution, version = origins.get(plugin_name, (IN_PROCESS, None))
            found, problems = _collect_methods(pm, plugin, plugin_name, distribution, version)
            if problems:
                # All or nothing: a half-registered plugin would make names appear and vanish confusingly.
                reason = "; ".join(problems)
                failures.append(PluginFailure(plugin_name, distribution, version, reason))
                warnings.warn(
                    f"acps {_describe_origin(plugin_name, distribution, version)} is skipped: {reason}.",
                    AcpsPluginWarning,
                    stacklevel=2,
                )
                continue
            methods.extend(found)
        return cls(methods, failures)

    @classmethod
    def build(cls, extra_plugins: Iterable[object] = (), load_entrypoints: bool = True) -> Registry:
        """A fresh registry from the installed plugins (optional) plus in-process plugin objects.

        Args:
            extra_plugins: modules or objects implementing the registration hooks; their distribution shows as
                :data:`IN_PROCESS`.
            load_entrypoints: also load the plugins installed through entry points.
        """
        pm = get_plugin_manager(load_entrypoints=load_entrypoints)
        for plugin in extra_plugins:
            _register_in_process(pm, plugin)
        return cls.from_plugin_manager(pm)

    @property
    def failures(self) -> list[PluginFailure]:
        """Plugins that provide no methods because they failed to load or were disabled."""
        return list(self._failures)

    def methods(self, kind: str | None = None) -> list[MethodInfo]:
        """Every method, or those of one kind, sorted by kind (pipeline order) then name.

        Raises:
            PluginError: ``kind`` is not one of :data:`KINDS`.
        """
        if kind is not None:
            _kind_base(kind)
        return sorted(
            (m for m in self._methods.values() if kind is None or m.kind == kind),
            key=lambda m: (KINDS.index(m.kind), m.name),
        )

    def names(self, kind: str) -> list[str]:
        """The sorted names of the installed methods of one kind."""
        return [method.name for method in self.methods(kind)]

    def get(self, kind: str, name: str) -> MethodInfo:
        """The method of ``kind`` registered as ``name``.

        Raises:
            PluginError: no such method; the message lists the installed names of that kind, a close match,
                and any plugin that failed to load (it might have provided the name).
        """
        _kind_base(kind)
        method = self._methods.get((kind, name))
        if method is not None:
            return method
        installed = self.names(kind)
        sentences = [f"no {kind} method named {name!r} is installed"]
        close = difflib.get_close_matches(name, installed, n=1, cutoff=0.6)
        # difflib misses abbreviations ("Taylor" for "TaylorLossSensitivity"); a substring match catches them.
        close += [other for other in installed
                  if name and name.lower() in other.lower() and other not in close]
        if close:
            sentences.append(f"Did you mean {close[0]!r}?")
        sentences.append(f"Installed {kind} methods: {', '.join(installed)}." if installed
                         else f"No {kind} methods are installed; install a plugin that provides one.")
        failed = [failure for failure in self._failures if not failure.disabled]
        disabled = [failure for failure in self._failures if failure.disabled]
        if failed:
            sentences.append("Plugins that failed to load (one may provide it): " + "; ".join(
                f"{failure.origin}: {failure.reason}" for failure in failed) + ".")
        if disabled:
            sentences.append(f"Plugins disabled by {DISABLE_ENV_VAR}: "
                             + ", ".join(failure.origin for failure in disabled) + ".")
        raise PluginError(sentences[0] + ". " + " ".join(sentences[1:]))


def _unique_plugin_name(pm: pluggy.PluginManager, plugin: object, name: str | None = None) -> str:
    """``name`` (default: the plugin's own name), suffixed with a counter if another plugin already has it."""
    base = name or _default_plugin_name(plugin)
    candidate, counter = base, 1
    while pm.has_plugin(candidate):
        counter += 1
        candidate = f"{base}#{counter}"
    return candidate


def _register_in_process(pm: pluggy.PluginManager, plugin: object, name: str | None = None) -> str:
    """Register an in-process plugin on ``pm`` under a unique name; return the name.

    Raises:
        PluginError: pluggy rejects it (already registered, or a hook whose arguments the hookspec lacks).
    """
    plugin_name = _unique_plugin_name(pm, plugin, name)
    try:
        pm.register(plugin, name=plugin_name)
    except Exception as exc:  # pluggy's validation errors are not acps errors; translate them
        raise PluginError(f"cannot register {_describe_origin(plugin_name, IN_PROCESS, None)}: "
                          f"{type(exc).__name__}: {exc}") from exc
    return plugin_name


# The registry built from the installed plugins, and the manager it came from (which register_plugin extends).
_lock = threading.RLock()
_default_manager: AcpsPluginManager | None = None
_default_registry: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The registry of the installed plugins (plus any added by :func:`register_plugin`), built on first use.

    Args:
        refresh: rediscover the installed plugins (e.g. after installing one); this drops the plugins added
            with :func:`register_plugin`.

    Raises:
        PluginError: two plugins register the same name for the same kind.
    """
    global _default_manager, _default_registry
    with _lock:
        if refresh or _default_manager is None:
            _default_manager = get_plugin_manager(load_entrypoints=True)
            _default_registry = None
        if _default_registry is None:
            _default_registry = Registry.from_plugin_manager(_default_manager)
        return _default_registry


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Add an in-process plugin (a module or object implementing the hooks) to :func:`get_registry`.

    Its methods become selectable by name, with the distribution shown as :data:`IN_PROCESS`.

    Args:
        plugin: the module or object.
        name: the plugin's name in messages (default: its ``__name__`` or type name).

    Returns:
        The name it was registered under (pass it to :func:`unregister_plugin`).

    Raises:
        PluginError: the plugin is invalid (a hook signature, a class not derived from the kind's base) or
            registers a name another plugin already has; it is then not added.
    """
    global _default_registry
    with _lock:
        get_registry()
        manager = _default_manager
        assert manager is not None  # get_registry() just built it
        plugin_name = _register_in_process(manager, plugin, name)
        try:
            with warnings.catch_warnings():
                # Raised below for this plugin; warnings about installed plugins were shown when first built.
                warnings.simplefilter("ignore", AcpsPluginWarning)
                registry = Registry.from_plugin_manager(manager)
        except PluginError:
            manager.unregister(name=plugin_name)
            raise
        own = [failure for failure in registry.failures if failure.plugin == plugin_name]
        if own:
            manager.unregister(name=plugin_name)
            raise PluginError(f"cannot register {own[0].origin}: {own[0].reason}")
        _default_registry = registry
        return plugin_name


def unregister_plugin(name: str) -> None:
    """Remove a plugin added with :func:`register_plugin` (by the name it returned) from :func:`get_registry`.

    Raises:
        PluginError: no plugin of that name is registered.
    """
    global _default_registry
    with _lock:
        if _default_manager is None or not _default_manager.has_plugin(name):
            raise PluginError(f"no acps plugin named {name!r} is registered")
        _default_manager.unregister(name=name)
        _default_registry = None


@overload
def resolve_method(kind: Literal["sensitivity"], value: object, parameter: str,
                   registry: Registry | None = None) -> SensitivityBase: ...
@overload
def resolve_method(kind: Literal["search"], value: object, parameter: str,
                   registry: Registry | None = None) -> SearchChannelBase: ...
@overload
def resolve_method(kind: Literal["gain"], value: object, parameter: str,
                   registry: Registry | None = None) -> GainEstimatorBase: ...
@overload
def resolve_method(kind: str, value: object, parameter: str, registry: Registry | None = None) -> object: ...


def resolve_method(kind: str, value: object, parameter: str, registry: Registry | None = None) -> object:
    """Turn a ``sensitivity=``/``search_alg=``/``gain=`` argument into a method instance.

    Args:
        kind: ``"sensitivity"``, ``"search"`` or ``"gain"``.
        value: a registered method name (the class is instantiated with no arguments) or an instance of the
            kind's base class (returned as is).
        parameter: the argument's name, for messages.
        registry: where to look names up (default: :func:`get_registry`).

    Raises:
        MethodArgumentError: ``value`` is a class (pass an instance) or neither a name nor an instance.
        PluginError: the name is not installed, or the plugin's class failed to instantiate.
    """
    base = _kind_base(kind)
    if isinstance(value, str):
        method = (registry or get_registry()).get(kind, value)
        try:
            return method.cls()
        except Exception as exc:  # the class is plugin code; say whose it is
            raise PluginError(
                f"{kind} method {value!r} ({method.class_path}, {method.origin}) could not be created with "
                f"no arguments: {type(exc).__name__}: {exc}"
            ) from exc
    if isinstance(value, base):
        return value
    if isinstance(value, type) and issubclass(value, base):
        raise MethodArgumentError(
            f"{parameter}= got the class {value.__module__}.{value.__qualname__}; pass an instance instead, "
            f"e.g. {parameter}={value.__qualname__}()"
        )
    try:
        names = (registry or get_registry()).names(kind)
        installed = ", ".join(repr(name) for name in names) or "none installed"
    except PluginError:  # a broken installation must not hide the caller's own mistake
        installed = "the registry could not be built"
    hint = ""
    for other_kind, other_base in METHOD_BASES.items():
        if other_kind != kind and (isinstance(value, other_base) or
                                   (isinstance(value, type) and issubclass(value, other_base))):
            hint = f" (that is a {other_kind} method; pass it as {PARAMETER_BY_KIND[other_kind]}=)"
    raise MethodArgumentError(
        f"{parameter}= got {type(value).__module__}.{type(value).__qualname__} {value!r:.80}{hint}; expected "
        f"a {kind} method name ({installed}) or an instance of a subclass of acps_core.{base.__name__}"
    )


def format_plugins_table(registry: Registry) -> str:
    """The text ``acps plugins`` prints: each method with its class and distribution, then skipped plugins."""
    header = ("kind", "name", "class", "distribution", "version")
    rows = [(m.kind, m.name, m.class_path, m.distribution, m.version or "-") for m in registry.methods()]
    lines: list[str] = []
    if rows:
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip())
        lines.append("  ".join("-" * width for width in widths))
        lines.extend("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)
    else:
        lines.append("No acps methods are installed.")
    failures = registry.failures
    if failures:
        lines.append("")
        lines.append("Plugins not loaded:")
        for failure in failures:
            status = "disabled" if failure.disabled else "failed"
            version = f" {failure.version}" if failure.version else ""
            reason = failure.reason.replace("\n", "\n      ")  # keep multi-line reasons inside the entry
            lines.append(f"  {failure.plugin} ({failure.distribution}{version}): {status}: {reason}")
    return "\n".join(lines) + "\n"
