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
from dataclasses import dataclass

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


@dataclass
class _Cut:
    group_id: int
    new_count: int
    lost: float      # sensitivity of the channels removed
    saved: float     # exact cost saved

    @property
    def density(self) -> float:
        return self.lost / self.saved


class GreedySearch(SearchChannelBase):
    """Remove the lowest sensitivity-per-cost cuts first until the cost budget is met (see module docs)."""

    class Options(MethodOptions):
        """:class:`GreedySearch` takes no options."""

    def channel_prune_search(self, graph_info: GraphInfo, search_records: list[SearchRecord],
                             prune_config: PruneSearchConfig) -> dict[str, list[int]]:
        """Greedy search; returns a keep mask per producer of every group that loses channels."""
        records = {r.group_id: r for r in search_records}
        kept = {g: r.channels for g, r in records.items()}
        cost = graph_info.cost(kept)
        budget = graph_info.budget

        def next_cut(group_id: int) -> _Cut | None:
            record = records[group_id]
            for new_count in record.allowed_kept:
                if new_count >= kept[group_id]:
                    continue
                saved = graph_info.saving(kept, group_id, new_count)
                if saved <= 0:
                    continue  # a cut that saves nothing is never worth accuracy; look one step further
                return _Cut(group_id, new_count, record.lost(new_count) - record.lost(kept[group_id]), saved)
            return None

        cuts = {g: next_cut(g) for g in records}
        while cost > budget:
            available = [c for c in cuts.values() if c is not None]
            if not available:
                # The core warns the user (for any search method) and notes it in the result.
                logger.info("GreedySearch: budget %.6g not reachable; every group is at its smallest allowed "
                            "size (cost %.6g)", budget, cost)
                break
            finishing = [c for c in available if cost - c.saved <= budget]
            if finishing:
                cut = min(finishing, key=lambda c: (c.lost, -c.saved))
            else:
                cut = min(available, key=lambda c: (c.density, c.group_id))
            kept[cut.group_id] = cut.new_count
            cost = graph_info.cost(kept)
            for group_id in graph_info.cost_model.neighbours(cut.group_id) | {cut.group_id}:
                if group_id in records:
                    cuts[group_id] = next_cut(group_id)
        if cost <= budget:
            give_back(graph_info, search_records, kept)
        logger.debug("GreedySearch: cost %.6g of budget %.6g", graph_info.cost(kept), budget)

        return masks_for(search_records, kept)
