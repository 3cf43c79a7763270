"""What the report tells about the sensitivities: each layer's share of its group's sensitivity that was kept,
each channel's score against its group's mean, and a path from the full model to the decision."""

from __future__ import annotations

import torch

from acps_core.report.result import SearchResult
from acps_core.search.descent import Cut, descend
from acps_core.search.problem import Decision, GraphInfo, SearchRecord

#: The most steps the path shows of one group: the path is a picture of the decision, not the search itself.
PATH_STEPS = 8


def sensitivity_story(result: SearchResult, graph_info: GraphInfo, records: list[SearchRecord],
                      decision: Decision) -> None:
    """Fill in ``result.layers[...].sensitivity_kept``, ``result.scores`` and ``result.path`` (see
    :class:`~acps_core.report.result.SearchResult`)."""
    kept_counts = decision.kept_counts()
    total = sum(float(torch.as_tensor(r.sensitivity).sum()) for r in records) or 1.0
    chains: dict[int, list[int]] = {}  # group -> the counts it passes through, largest first
    for record in records:
        scores = torch.as_tensor(record.sensitivity, dtype=torch.float64)
        kept = set(decision.keep.get(record.group_id, range(record.channels)))
        group_total = float(scores.sum())
        share = float(scores[sorted(kept)].sum()) / group_total if group_total > 0 else 1.0
        for producer in record.producers:
            result.layers[producer].sensitivity_kept = share
        mean = float(scores.mean()) or 1.0
        result.scores[record.name] = [(float(v) / mean, c in kept) for c, v in enumerate(scores.tolist())]
        final = kept_counts.get(record.group_id, record.channels)
        counts = [c for c in record.allowed_kept if final <= c <= record.channels]
        if len(counts) > 1:
            stride = max(1, (len(counts) - 1) // PATH_STEPS)
            chains[record.group_id] = sorted(set(counts[::stride]) | {counts[-1]}, reverse=True)

    # From the full model to the decision, the step that loses the least sensitivity per cost saved first.
    def least_dense(cuts: list[Cut]) -> Cut:
        return min(cuts, key=lambda cut: cut.density)

    counts_now = {record.group_id: record.channels for record in records}
    full_cost, lost = graph_info.cost_model.full_cost, 0.0
    result.path = [(1.0, 0.0)]
    for cut in descend(graph_info, records, counts_now, least_dense, counts=chains, free=True):
        lost += cut.lost
        result.path.append((graph_info.cost(counts_now) / full_cost, lost / total))
