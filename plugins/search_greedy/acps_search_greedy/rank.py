"""Global ranking search: the least important channels of the whole model go first, whatever they cost.

Where :class:`~acps_search_greedy.GreedySearch` weighs each cut's sensitivity against the cost it saves, this
search ignores the cost when choosing and only uses it to stop: it repeatedly takes the cut (one allowed step of
one group) whose removed channels have the lowest sensitivity per channel, recomputing the exact cost after
every step, until the model is within the budget; then it gives back, most sensitive first, every step that
still fits the budget. This is the global pruning of Torch-Pruning (Fang et al., "DepGraph", CVPR 2023) with
the step and alignment constraints of acps's groups. With scores normalised per group (filter or group
magnitude divided by the group's mean) it spreads the cuts over the layers by relative importance instead of
emptying the layers whose channels are cheap to remove, which ``bench/quality.py`` found to keep more accuracy
before fine-tuning.
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


class GlobalRankSearch(SearchChannelBase):
    """Remove the channels with the lowest sensitivity across all groups first until the cost budget is met (see
    the module docs)."""

    class Options(MethodOptions):
        """:class:`GlobalRankSearch` takes no options."""

    def channel_prune_search(self, graph_info: GraphInfo, search_records: list[SearchRecord],
                             prune_config: PruneSearchConfig) -> dict[str, list[int]]:
        """Global ranking search; returns a keep mask per producer of every group that loses channels."""
        kept = {r.group_id: r.channels for r in search_records}
        cost = graph_info.cost(kept)

        def cheapest_channels(cuts: list[Cut]) -> Cut:
            return min(cuts, key=lambda c: (c.per_channel, c.group_id))

        if cost > graph_info.budget:
            for _ in descend(graph_info, search_records, kept, cheapest_channels):
                cost = graph_info.cost(kept)
                if cost <= graph_info.budget:
                    break
            else:
                logger.info("GlobalRankSearch: budget %.6g not reachable; every group is at its smallest allowed "
                            "size (cost %.6g)", graph_info.budget, cost)
        if cost <= graph_info.budget:
            give_back(graph_info, search_records, kept)
        return masks_for(search_records, kept)
