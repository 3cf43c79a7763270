"""Registers the plugin's methods with acps (named by the ``acps`` entry point)."""

from __future__ import annotations

from acps_core.plugin import Register, hookimpl


@hookimpl
def acps_register_search_algorithms(register: Register) -> None:
    from acps_search_knapsack.knapsack import KnapsackSearch

    register("KnapsackSearch", KnapsackSearch)
