"""The plugin registry: which sensitivity, search and gain methods are installed, and from where.

A method is a class of one of three kinds, each with its base class:

=============  =====================================  ==============================================
kind           base class                             users select it with
=============  =====================================  ==============================================
sensitivity    :class:`acps_core.SensitivityBase`     ``sensitivity="Name"``
search         :class:`acps_core.SearchChannelBase`   ``search_alg="Name"``
gain           :class:`acps_core.GainEstimatorBase`   ``gain="Name"``
=============  =====================================  ==============================================

A name may carry options, ``sensitivity="GroupTaylorSensitivity(terms='all')"`` (see
:mod:`acps_core.methods.spec`). Plugins hand their classes to ``register(name, cls)`` from the registration hooks
of :mod:`acps_core.methods.hookspecs`; :mod:`acps_core.methods.loading` finds and loads them. :class:`Registry`
calls each plugin's hooks on its own, so every method is attributed to the plugin and distribution that provided
it, and two plugins claiming one name is an error naming both. :func:`get_registry` keeps the registry of the
installed plugins.

This module is also where the rest of acps imports the registry's neighbours from: the loader
(:func:`get_plugin_manager`, :class:`PluginFailure`, ...), :func:`resolve_method` (:mod:`acps_core.methods.resolve`)
and :func:`format_plugins_table` (:mod:`acps_core.methods.table`).
"""

from __future__ import annotations

import difflib
import logging
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import pluggy

from acps_core.errors import PluginError
from acps_core.methods import hookspecs
from acps_core.methods.bases import KINDS, METHOD_BASES, PARAMETER_BY_KIND, kind_base
from acps_core.methods.hookspecs import HOOK_BY_KIND
from acps_core.methods.loading import (
    BUILT_IN_METHODS,
    DISABLE_ENV_VAR,
    IN_PROCESS,
    AcpsPluginManager,
    AcpsPluginWarning,
    PluginFailure,
    describe_origin,
    get_plugin_manager,
    origin_lookup,
    register_in_process,
)
from acps_core.methods.resolve import MethodArgumentError, resolve_method
from acps_core.methods.spec import METHOD_NAME
from acps_core.methods.table import format_plugins_table

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
        return describe_origin(self.plugin, self.distribution, self.version)


def _collect_methods(pm: pluggy.PluginManager, plugin: object, plugin_name: str, distribution: str,
                     version: str | None) -> tuple[list[MethodInfo], list[str]]:
    """Call one plugin's registration hooks; return its methods and the problems found (empty if none)."""
    methods: list[MethodInfo] = []
    problems: list[str] = []
    origin = describe_origin(plugin_name, distribution, version)
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
        if not isinstance(name, str) or not METHOD_NAME.fullmatch(name):
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
            kind_base(method.kind)
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
        origins = origin_lookup(pm)
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
                    f"acps {describe_origin(plugin_name, distribution, version)} is skipped: {reason}.",
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
            register_in_process(pm, plugin)
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
            kind_base(kind)
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
        kind_base(kind)
        method = self._methods.get((kind, name))
        if method is not None:
            return method
        installed = self.names(kind)
        sentences = [f"no {kind} method named {name!r} is installed"]
        if name in BUILT_IN_METHODS:
            sentences.append(f"It is one of acps's own methods, from the distribution {BUILT_IN_METHODS[name]}: "
                             "pip install 'acps-core[all]' installs them all.")
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
        plugin_name = register_in_process(manager, plugin, name)
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
