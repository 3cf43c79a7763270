"""Greedy channel search by value density.

The search is a knapsack: keep the channels whose summed sensitivity is largest while the model's cost stays
within the budget. Greedily, it repeatedly takes the cut (one alignment step of one group, its least sensitive
channels) that loses the least sensitivity per unit of cost saved, recomputing the exact cost saved by every
candidate cut after each step (a cut's saving changes when a neighbouring group shrinks). When some cuts
would reach the budget, it ends with the one of those that loses the least, so it lands on the target with at
most one step of overshoot. A late, large cut can make an earlier small one unnecessary, so the search finally
gives back, most sensitive first, every step that still fits the budget: no single step of the result can be
undone without exceeding it. Cuts that save nothing are never taken.
"""

from __future__ import annotations

import logging

from acps_core.plugin import (
    Cut,
    GraphInfo,
    MethodOptions,
    PruneSearchConfig,
    SearchChannelBase,
    SearchRecord,
    descend,
    give_back,
    masks_for,
)

logger = logging.getLogger(__name__)


class GreedySearch(SearchChannelBase):
    """Remove the lowest sensitivity-per-cost cuts first until the cost budget is met (see module docs)."""

    class Options(MethodOptions):
        """:class:`GreedySearch` takes no options."""

    def channel_prune_search(self, graph_info: GraphInfo, search_records: list[SearchRecord],
                             prune_config: PruneSearchConfig) -> dict[str, list[int]]:
        """Greedy search; returns a keep mask per producer of every group that loses channels."""
        kept = {r.group_id: r.channels for r in search_records}
        cost, budget = graph_info.cost(kept), graph_info.budget

        def choose(cuts: list[Cut]) -> Cut:
            finishing = [c for c in cuts if cost - c.saved <= budget]
            if finishing:
                return min(finishing, key=lambda c: (c.lost, -c.saved))
            return min(cuts, key=lambda c: (c.density, c.group_id))

        if cost > budget:
            for cut in descend(graph_info, search_records, kept, choose):
                # A cut's saving is exact given the counts it was priced at; the full sum is taken again near
                # the budget, where rounding could decide.
                cost -= cut.saved
                if cost <= budget * (1 + 1e-6):
                    cost = graph_info.cost(kept)
                if cost <= budget:
                    break
            else:
                # The core warns the user (for any search method) and notes it in the result.
                logger.info("GreedySearch: budget %.6g not reachable; every group is at its smallest allowed "
                            "size (cost %.6g)", budget, cost)
        if cost <= budget:
            give_back(graph_info, search_records, kept)
        logger.debug("GreedySearch: cost %.6g of budget %.6g", graph_info.cost(kept), budget)

        return masks_for(search_records, kept)
