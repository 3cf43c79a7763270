"""Every hook an acps plugin can implement, in one module.

A plugin is a module (or object) named by an entry point in the ``acps`` group. It implements one or more of
the hooks below with the :data:`hookimpl` marker imported from ``acps_core`` (not from pluggy), and hands its
method classes to the ``register`` callback::

    # pyproject.toml of the plugin distribution
    [project.entry-points.acps]
    my_plugin = "my_package.plugin"

    # my_package/plugin.py
    from acps_core import hookimpl

    @hookimpl
    def acps_register_sensitivities(register):
        register("MySensitivity", MySensitivity)

The name given to ``register`` is the string users pass as ``sensitivity=``, ``search_alg=`` or ``gain=``.
Two installed distributions registering the same name of the same kind is an error naming both.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT_NAME = "acps"
ENTRY_POINT_GROUP = "acps"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: The callback a registration hook receives: ``register(name, cls)``.
Register = Callable[[str, type], None]


@hookspec
def acps_register_sensitivities(register: Register) -> None:
    """Register channel-sensitivity methods.

    Called once per plugin when the registry is first built. Call ``register(name, cls)`` for each method, where
    ``cls`` is a subclass of :class:`acps_core.SensitivityBase`. Return nothing.
    """


@hookspec
def acps_register_search_algorithms(register: Register) -> None:
    """Register channel-search methods.

    Called once per plugin when the registry is first built. Call ``register(name, cls)`` for each method, where
    ``cls`` is a subclass of :class:`acps_core.SearchChannelBase`. Return nothing.
    """


@hookspec
def acps_register_gain_estimators(register: Register) -> None:
    """Register gain (cost) estimators.

    Called once per plugin when the registry is first built. Call ``register(name, cls)`` for each method, where
    ``cls`` is a subclass of :class:`acps_core.GainEstimatorBase`. Return nothing.
    """


#: Method kind -> the name of the hook through which plugins register methods of that kind.
HOOK_BY_KIND: dict[str, str] = {
    "sensitivity": "acps_register_sensitivities",
    "search": "acps_register_search_algorithms",
    "gain": "acps_register_gain_estimators",
}
