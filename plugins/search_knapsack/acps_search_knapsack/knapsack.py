"""Channel search as a multiple-choice knapsack, solved by Lagrangian relaxation.

Each channel group picks one kept count from its allowed counts (its "items"); keeping ``k`` loses the
sensitivity of its ``channels - k`` least sensitive channels and saves some cost. The search minimises the total
sensitivity lost subject to the exact model cost staying within the budget. With a multiplier ``lam`` on cost
the problem separates: every group independently picks the count minimising ``lost(k) - lam * saving(k)``, so
all counts of a group are weighed against each other at once, not one step at a time as a greedy search does
(which can commit to a step that a later, better step makes pointless). ``lam`` is found by bisection on the
exact cost of the resulting choice. A group's saving depends on its neighbours' sizes (a consumer's cost is
input by output channels), so the savings are taken at the current solution and the problem solved again a few
times; finally every step that still fits the budget is given back, most sensitive first.

Lagrangian relaxation of the multiple-choice knapsack: Sinha and Zoltners, "The Multiple-Choice Knapsack
Problem", Operations Research 27(3), 1979.
"""

from __future__ import annotations

import logging

from acps_core.plugin import (
    GraphInfo,
    MethodOptions,
    PruneSearchConfig,
    SearchChannelBase,
    SearchRecord,
    give_back,
    masks_for,
)

logger = logging.getLogger(__name__)

#: Times the savings are re-taken at the current solution and the relaxation solved again.
RELINEARISATIONS = 3
#: Bisection steps on the multiplier (the cost is piecewise constant in it, so this is ample).
BISECTION_STEPS = 60


class KnapsackSearch(SearchChannelBase):
    """Minimise the sensitivity lost under the cost budget over every group's allowed counts at once (see the
    module docs)."""

    class Options(MethodOptions):
        """:class:`KnapsackSearch` takes no options."""

    def channel_prune_search(self, graph_info: GraphInfo, search_records: list[SearchRecord],
                             prune_config: PruneSearchConfig) -> dict[str, list[int]]:
        """Knapsack search; returns a keep mask per producer of every group that loses channels."""
        full = {r.group_id: r.channels for r in search_records}
        smallest = {r.group_id: r.allowed_kept[-1] for r in search_records}
        if graph_info.cost(smallest) > graph_info.budget:
            logger.info("KnapsackSearch: the budget is out of reach; every group at its smallest allowed size")
            return masks_for(search_records, smallest)
        kept = dict(full)
        best: dict[int, int] | None = None
        for _ in range(RELINEARISATIONS):
            # Savings of every allowed count of every group, with the other groups at the current solution.
            savings = {r.group_id: {k: graph_info.saving(kept, r.group_id, k) - graph_info.saving(
                kept, r.group_id, r.channels) for k in r.allowed_kept} for r in search_records}
            kept = self._solve(graph_info, search_records, savings)
            if best is None or self._lost(search_records, kept) < self._lost(search_records, best):
                best = dict(kept)
        assert best is not None
        give_back(graph_info, search_records, best)
        return masks_for(search_records, best)

    @staticmethod
    def _lost(records: list[SearchRecord], kept: dict[int, int]) -> float:
        return sum(r.lost(kept[r.group_id]) for r in records)

    @staticmethod
    def _choose(records: list[SearchRecord], savings: dict[int, dict[int, float]], lam: float) -> dict[int, int]:
        """Every group's count minimising ``lost - lam * saving`` (ties: the larger count)."""
        return {r.group_id: min(r.allowed_kept, key=lambda k: (r.lost(k) - lam * savings[r.group_id][k], -k))
                for r in records}

    def _solve(self, graph_info: GraphInfo, records: list[SearchRecord],
               savings: dict[int, dict[int, float]]) -> dict[int, int]:
        """The cheapest-in-sensitivity choice whose exact cost fits the budget, by bisection on ``lam``."""
        high = 1.0
        while graph_info.cost(self._choose(records, savings, high)) > graph_info.budget:
            high *= 4.0
            if high > 1e30:
                return {r.group_id: r.allowed_kept[-1] for r in records}
        low = 0.0
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            if graph_info.cost(self._choose(records, savings, middle)) > graph_info.budget:
                low = middle
            else:
                high = middle
        return self._choose(records, savings, high)
