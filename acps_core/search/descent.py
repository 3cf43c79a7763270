"""Descending through the allowed channel counts one cut at a time: the loop that greedy searches share.

A *cut* moves one group from its current kept count to a smaller allowed one. :func:`descend` repeatedly offers
every group's next cut to a chooser, applies the chosen one, and re-prices only the groups whose cost it
changed (those that share a layer with the cut group), so each step costs a few layer evaluations rather than a
pass over the model. What differs between searches is only which cut they choose and when they stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from acps_core.search.problem import GraphInfo, SearchRecord


@dataclass(frozen=True)
class Cut:
    """One step of one group: from ``old_count`` to ``new_count`` kept channels.

    Attributes:
        group_id: the group's id.
        old_count: the channels it keeps before the cut.
        new_count: the channels it keeps after.
        lost: the sensitivity of the channels the cut removes (its least sensitive remaining ones).
        saved: the exact cost the cut saves, everything else as it is.
        members: how many groups move with the cut (a set of groups tied by ``uniform_widths``), each losing
            ``old_count - new_count`` channels.
    """

    group_id: int
    old_count: int
    new_count: int
    lost: float
    saved: float
    members: int = 1

    @property
    def density(self) -> float:
        """Sensitivity lost per unit of cost saved (infinite for a cut that saves nothing)."""
        return self.lost / self.saved if self.saved > 0 else math.inf

    @property
    def per_channel(self) -> float:
        """Sensitivity lost per channel removed (in every group the cut moves)."""
        return self.lost / ((self.old_count - self.new_count) * self.members)


def next_cut(graph_info: GraphInfo, record: SearchRecord, kept: Mapping[int, int],
             counts: Sequence[int] | None = None, free: bool = False) -> Cut | None:
    """The group's next cut: to the largest count below its current one that saves cost.

    Args:
        graph_info: prices the cut (the fixed groups at their counts).
        record: the group.
        kept: every searched group's current count, by group id.
        counts: the counts to step through, largest first; the record's ``allowed_kept`` by default.
        free: also offer a cut that saves nothing (by default such a cut is passed over for the next count: it
            would lose sensitivity for no gain).

    Returns:
        The cut, or None when the group cannot go lower.
    """
    current = kept[record.group_id]
    for new_count in record.allowed_kept if counts is None else counts:
        if new_count >= current:
            continue
        saved = graph_info.saving(kept, record.group_id, new_count)
        if saved <= 0 and not free:
            continue
        return Cut(record.group_id, current, new_count, record.lost(new_count) - record.lost(current), saved,
                   len(graph_info.ties.members(record.group_id)))
    return None


def descend(graph_info: GraphInfo, records: Sequence[SearchRecord], kept: dict[int, int],
            choose: Callable[[list[Cut]], Cut | None],
            counts: Mapping[int, Sequence[int]] | None = None, free: bool = False) -> Iterator[Cut]:
    """Take cuts one at a time, as ``choose`` picks them, updating ``kept`` in place; yields each cut taken.

    The caller stops the descent by leaving the loop (a budget met) or by ``choose`` returning None; it ends by
    itself when no group can go lower.

    Args:
        graph_info: prices the cuts.
        records: the groups searched.
        kept: every searched group's current count, by group id; changed as cuts are taken.
        choose: picks one of the available cuts (never an empty list), or None to stop.
        counts: per group id, the counts it may step through (see :func:`next_cut`); allowed_kept by default.
        free: offer cuts that save nothing too (see :func:`next_cut`).
    """
    by_id = {record.group_id: record for record in records}

    def cut_of(group_id: int) -> Cut | None:
        steps = counts.get(group_id) if counts is not None else None
        if counts is not None and steps is None:
            return None
        return next_cut(graph_info, by_id[group_id], kept, steps, free)

    cuts = {group_id: cut_of(group_id) for group_id in by_id}
    while True:
        available = [cut for cut in cuts.values() if cut is not None]
        if not available:
            return
        cut = choose(available)
        if cut is None:
            return
        kept[cut.group_id] = cut.new_count
        yield cut
        for group_id in graph_info.neighbours(cut.group_id) | {cut.group_id}:
            if group_id in by_id:
                cuts[group_id] = cut_of(group_id)
