"""GreedySearch (lowest sensitivity per cost first) and GlobalRankSearch (lowest sensitivity first): exact cost after
each step, constraints respected."""

from __future__ import annotations

import math

import torch
from torch import nn

from acps_core.graph.build import build_channel_graph
from acps_core.graph.model import LayerGeometry
from acps_core.methods.bases import GainEstimatorBase
from acps_core.methods.registry import get_registry
from acps_core.search.problem import CostModel, GraphInfo, PruneSearchConfig, SearchRecord, allowed_kept_counts
from acps_gain_ascend import BitComplexity
from acps_search_greedy import GlobalRankSearch, GreedySearch


def chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10)).eval()


def problem(ratio: float, aligned: bool, max_prune: float = 1.0, estimator: GainEstimatorBase | None = None,
            scores: dict[str, torch.Tensor] | None = None):
    model = chain()
    graph = build_channel_graph(model, torch.randn(2, 3, 8, 8))
    cost_model = CostModel(graph, estimator or BitComplexity())
    info = GraphInfo(graph, cost_model, {}, cost_model.full_cost / ratio)
    records = []
    generator = torch.Generator().manual_seed(0)
    for group in graph.prunable_groups:
        record = SearchRecord.for_group(group, allowed_kept_counts(group.channels, aligned, max_prune))
        record.sensitivity = (scores or {}).get(group.name, torch.rand(group.channels, generator=generator))
        records.append(record)
    return info, records, PruneSearchConfig(ratio, aligned, max_prune)


def kept_of(masks, records) -> dict[int, int]:
    return {r.group_id: sum(masks[r.producers[0]]) if r.producers[0] in masks else r.channels for r in records}


def test_meets_the_budget_and_cannot_give_back_a_single_step() -> None:
    info, records, config = problem(2.0, aligned=False)
    kept = kept_of(GreedySearch().channel_prune_search(info, records, config), records)
    assert info.cost(kept) <= info.budget
    for record in records:
        if kept[record.group_id] < record.channels:
            assert info.cost({**kept, record.group_id: kept[record.group_id] + 1}) > info.budget


def test_removes_the_least_sensitive_channels_of_a_group() -> None:
    scores = {"0": torch.arange(64, dtype=torch.float64)}  # channel i scores i: the low indices go first
    info, records, config = problem(1.5, aligned=False, scores=scores)
    masks = GreedySearch().channel_prune_search(info, records, config)
    mask = masks["0"]
    kept = [i for i, m in enumerate(mask) if m]
    assert kept == list(range(64 - len(kept), 64))


def test_prefers_the_group_with_the_lowest_sensitivity_per_cost() -> None:
    scores = {"0": torch.full((64,), 100.0), "2": torch.full((64,), 0.001), "4": torch.full((32,), 100.0)}
    info, records, config = problem(1.2, aligned=False, scores=scores)
    masks = GreedySearch().channel_prune_search(info, records, config)
    assert set(masks) == {"2"}


def test_aligned_counts_are_multiples_of_16_and_max_prune_ratio_holds() -> None:
    info, records, config = problem(4.0, aligned=True, max_prune=0.6)
    kept = kept_of(GreedySearch().channel_prune_search(info, records, config), records)
    for record in records:
        count = kept[record.group_id]
        assert count == record.channels or count % 16 == 0
        assert count >= math.ceil(record.channels * 0.4)


class OnlyLastConvCosts(GainEstimatorBase):
    """A staircase where only layer 4's output channels cost anything: cuts elsewhere save nothing."""

    def layer_cost(self, layer: LayerGeometry, in_channels: int, out_channels: int) -> float:
        return float(out_channels) if layer.name == "4" else 0.0


def test_never_spends_accuracy_on_a_cut_that_saves_no_cost() -> None:
    scores = {"0": torch.zeros(64), "2": torch.zeros(64), "4": torch.full((32,), 5.0)}
    info, records, config = problem(2.0, aligned=False, estimator=OnlyLastConvCosts(), scores=scores)
    masks = GreedySearch().channel_prune_search(info, records, config)
    assert set(masks) == {"4"} and sum(masks["4"]) == 16


def test_unreachable_budget_returns_the_smallest_allowed_model() -> None:
    info, records, config = problem(1000.0, aligned=False, max_prune=0.5)
    kept = kept_of(GreedySearch().channel_prune_search(info, records, config), records)
    assert kept == {r.group_id: r.allowed_kept[-1] for r in records}


def test_registered_by_name_from_its_distribution() -> None:
    info = get_registry(refresh=True).get("search", "GreedySearch")
    assert info.cls is GreedySearch
    assert info.distribution == "acps-search-greedy"


# GlobalRankSearch ------------------------------------------------------------------------------------------------
def test_rank_meets_the_budget_and_cannot_give_back_a_single_step() -> None:
    info, records, config = problem(2.0, aligned=False)
    kept = kept_of(GlobalRankSearch().channel_prune_search(info, records, config), records)
    assert info.cost(kept) <= info.budget
    for record in records:
        if kept[record.group_id] < record.channels:
            assert info.cost({**kept, record.group_id: kept[record.group_id] + 1}) > info.budget


def test_rank_takes_the_lowest_scores_first_where_greedy_weighs_them_by_cost() -> None:
    # Layer "4" (32 channels, read by the Linear only) saves less per channel than layer "2" (whose channels
    # conv 4 reads too); its scores are the lowest.
    scores = {"0": torch.full((64,), 1.0), "2": torch.full((64,), 1.0), "4": torch.full((32,), 0.9)}
    info, records, config = problem(1.1, aligned=False, scores=scores)
    ranked = GlobalRankSearch().channel_prune_search(info, records, config)
    assert set(ranked) == {"4"}
    greedy = GreedySearch().channel_prune_search(info, records, config)
    # Per unit of cost saved, layer 2's channels are the cheapest: GreedySearch cuts there.
    assert sum(1 - m for m in greedy["2"]) > sum(1 - m for m in greedy.get("4", [1]))


def test_rank_within_a_group_the_least_sensitive_channels_go_and_constraints_hold() -> None:
    scores = {"0": torch.arange(64, dtype=torch.float64)}
    info, records, config = problem(1.5, aligned=True, max_prune=0.6, scores=scores)
    masks = GlobalRankSearch().channel_prune_search(info, records, config)
    kept = kept_of(masks, records)
    for record in records:
        count = kept[record.group_id]
        assert count == record.channels or count % 16 == 0
        assert count >= math.ceil(record.channels * 0.4)
    if "0" in masks:
        kept_channels = [i for i, m in enumerate(masks["0"]) if m]
        assert kept_channels == list(range(64 - len(kept_channels), 64))


def test_rank_unreachable_budget_returns_the_smallest_allowed_model() -> None:
    info, records, config = problem(1000.0, aligned=False, max_prune=0.5)
    kept = kept_of(GlobalRankSearch().channel_prune_search(info, records, config), records)
    assert kept == {r.group_id: r.allowed_kept[-1] for r in records}


def test_rank_registered_by_name_from_its_distribution() -> None:
    info = get_registry(refresh=True).get("search", "GlobalRankSearch")
    assert info.cls is GlobalRankSearch
    assert info.distribution == "acps-search-greedy"
