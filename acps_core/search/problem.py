"""The search problem handed to sensitivity and search methods: records, exact cost, budget.

One :class:`SearchRecord` per channel group the search may shrink. The cost of the model for any choice of
kept channels comes from :class:`CostModel`, which sums a gain estimator's per-layer cost over every
Conv/Linear layer, so a search can recompute it exactly after every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from acps_core.errors import PluginError
from acps_core.graph.model import ChannelGraph, ChannelGroup, LayerInfo, channel_atoms, structure_violation
from acps_core.methods.bases import GainEstimatorBase

if TYPE_CHECKING:
    from acps_core.search.ties import Ties

#: Channel counts are kept at multiples of this when ``ascend_optimized`` (the Cube unit's 16x16 fractal).
ASCEND_ALIGNMENT = 16


class PruneSearchConfig(NamedTuple):
    """The reference's ``prune_config`` tuple: ``(compress_ratio, ascend_optimized, max_prune_ratio)``."""

    compress_ratio: float
    ascend_optimized: bool
    max_prune_ratio: float


def alignment(ascend_optimized: bool) -> int:
    """The step kept channel counts move in."""
    return ASCEND_ALIGNMENT if ascend_optimized else 1


def kept_step(ascend_optimized: bool, atom: int = 1) -> int:
    """Kept counts of a pruned group are multiples of this: its atom (whole units in every block, see
    :class:`~acps_core.graph.ChannelGroup`) and, with ``ascend_optimized``, 16."""
    return math.lcm(alignment(ascend_optimized), atom)


def allowed_kept_counts(channels: int, ascend_optimized: bool, max_prune_ratio: float, atom: int = 1) -> list[int]:
    """Every kept count the search may give a group of ``channels``, largest (all kept) first.

    A group keeps at least one step and at least ``(1 - max_prune_ratio)`` of its channels; a pruned group keeps
    a multiple of :func:`kept_step` (with ``ascend_optimized``, of 16: the reference's rule).
    """
    step = kept_step(ascend_optimized, atom)
    # The small epsilon keeps 64 * (1 - 0.75) = 16.000000000000004 from rounding up to 17.
    floor = max(step, math.ceil(channels * (1.0 - max_prune_ratio) - 1e-9))
    counts = [channels]
    first = (channels - 1) // step * step
    counts += [k for k in range(first, floor - 1, -step) if k >= floor and k > 0]
    return counts


def kept_from_ratio(channels: int, prune_ratio: float, ascend_optimized: bool, atom: int = 1) -> int:
    """How many of ``channels`` a ``prune_ratio`` (pruned / total) keeps: at least one, rounded up to a
    multiple of :func:`kept_step` (never above ``channels``)."""
    kept = max(1, round(channels * (1.0 - prune_ratio)))
    step = kept_step(ascend_optimized, atom)
    return min(channels, math.ceil(kept / step) * step)


@dataclass
class SearchRecord:
    """One channel group the search decides on.

    Attributes:
        group_id: index of the group in ``graph.groups``.
        name: the group's name, its first producer layer.
        producers: layers whose output channels these are.
        followers: layers that follow the channels one to one (norms, depthwise convs).
        consumers: layers that lose the matching input channels.
        channels: number of channels.
        allowed_kept: kept counts the search may choose, largest first (``channels`` itself first).
        sensitivity: per-channel importance (higher matters more), set by the sensitivity method.
        gain: per-channel cost saved by removing one channel from the unpruned model.
        unit: channels go in whole units of this many (a GroupNorm group, an attention head).
        blocks: the channels form this many equal blocks that must keep equal counts (a grouped conv's groups).
        aligned: the channels form this many equal blocks that must keep the same channels (a channel shuffle).
    """

    group_id: int
    name: str
    producers: list[str]
    followers: list[str]
    consumers: list[str]
    channels: int
    allowed_kept: list[int]
    sensitivity: torch.Tensor | None = None
    gain: torch.Tensor | None = None
    unit: int = 1
    blocks: int = 1
    aligned: int = 1
    _order: list[int] | None = field(default=None, repr=False, compare=False)
    _cumulative: list[float] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def for_group(cls, group: ChannelGroup, allowed_kept: list[int]) -> SearchRecord:
        """The record of a channel group of the graph, to be searched over ``allowed_kept``."""
        return cls(group_id=group.id, name=group.name, producers=list(group.producers),
                   followers=[use.layer for use in group.followers], consumers=[use.layer for use in group.consumers],
                   channels=group.channels, allowed_kept=list(allowed_kept), unit=group.unit, blocks=group.blocks,
                   aligned=group.aligned)

    def atoms(self) -> list[list[int]]:
        """The channels in the steps a search removes them, least sensitive first: one whole unit from every
        block at a time (single channels for an unconstrained group)."""
        return channel_atoms(self.channels, self.unit, self.blocks, self.sensitivity, self.aligned)

    def removal_order(self) -> list[int]:
        """Every channel, least sensitive first, in whole atoms: keeping ``k`` (an allowed count) removes the
        first ``channels - k``."""
        if self._order is None:
            self._order = [c for atom in self.atoms() for c in atom]
        return self._order

    def lost(self, kept: int) -> float:
        """The sensitivity removed when the group keeps ``kept`` channels (its least sensitive ones go)."""
        if self._cumulative is None:
            scores = torch.as_tensor(self.sensitivity, dtype=torch.float64)[self.removal_order()]
            self._cumulative = [0.0, *torch.cumsum(scores, 0).tolist()]
        return self._cumulative[self.channels - kept]

    def keep_mask(self, kept: int) -> list[int]:
        """The keep mask (1 = keep) over the channels when the group keeps ``kept`` of them."""
        removed = set(self.removal_order()[: self.channels - kept])
        return [0 if c in removed else 1 for c in range(self.channels)]


class CostModel:
    """The model's cost for any kept-channel counts: the sum of ``estimator.layer_cost`` over every traced
    Conv/Linear layer. Layer costs are cached, so repeated queries during a search are cheap."""

    def __init__(self, graph: ChannelGraph, estimator: GainEstimatorBase, model: Any = None,
                 sample: Any = None) -> None:
        self.graph = graph
        self.estimator = estimator
        self.layers: list[LayerInfo] = [layer for layer in graph.layers.values() if layer.geometry is not None]
        try:
            estimator.prepare([layer.geometry for layer in self.layers])  # type: ignore[misc]
            if model is not None:
                estimator.observe_model(model, sample)
            dtype = self.layers[0].geometry.dtype if self.layers else torch.float32  # type: ignore[union-attr]
            self.fixed = float(estimator.fixed_cost()) + float(estimator.computation_cost(graph.other_macs, dtype))
        except Exception as exc:
            raise PluginError(f"gain estimator {type(estimator).__name__} raised {type(exc).__name__} in "
                              f"prepare(), observe_model(), fixed_cost() or computation_cost(): {exc}") from exc
        if not math.isfinite(self.fixed) or self.fixed < 0:
            raise PluginError(f"gain estimator {type(estimator).__name__} returned a fixed cost of {self.fixed}; it "
                              "must be finite and non-negative")
        self._cache: dict[tuple[str, int, int], float] = {}
        self._layers_of_group: dict[int, list[LayerInfo]] = {}
        for layer in self.layers:
            touched = set(layer.in_groups)
            if layer.out_group is not None:
                touched.add(layer.out_group)
            for group_id in touched:
                self._layers_of_group.setdefault(group_id, []).append(layer)
        self.full_cost = self.cost({})
        fixed_layers = sum(self.layer_cost(layer, {}) for layer in self.layers
                           if not any(graph.group(g).prunable for g in self._touched(layer)))
        #: The share of the model's cost in layers that touch a prunable group: what pruning can act on.
        self.prunable_share = 1.0 - (fixed_layers + self.fixed) / self.full_cost if self.full_cost > 0 else 0.0

    @staticmethod
    def _touched(layer: LayerInfo) -> set[int]:
        return set(layer.in_groups) | ({layer.out_group} if layer.out_group is not None else set())

    def layer_cost(self, layer: LayerInfo, kept: Mapping[int, int]) -> float:
        cin, cout = self.graph.channel_counts(layer, kept)
        key = (layer.name, cin, cout)
        cost = self._cache.get(key)
        if cost is None:
            try:
                cost = float(self.estimator.layer_cost(layer.geometry, cin, cout))  # type: ignore[arg-type]
            except Exception as exc:
                raise PluginError(f"gain estimator {type(self.estimator).__name__} raised {type(exc).__name__} "
                                  f"for layer {layer.name} at {cin} input / {cout} output channels: {exc}") from exc
            if not math.isfinite(cost) or cost < 0:
                raise PluginError(f"gain estimator {type(self.estimator).__name__} returned {cost} for layer "
                                  f"{layer.name} at {cin} input / {cout} output channels; a cost must be finite "
                                  "and non-negative")
            self._cache[key] = cost
        return cost * layer.calls  # (the estimator's cost is one call's)

    def cost(self, kept: Mapping[int, int]) -> float:
        """Total cost when group ``g`` keeps ``kept[g]`` channels (groups not named keep all), with the
        estimator's fixed cost."""
        return sum(self.layer_cost(layer, kept) for layer in self.layers) + self.fixed

    def layers_of_group(self, group_id: int) -> list[LayerInfo]:
        """The layers whose cost depends on group ``group_id``."""
        return self._layers_of_group.get(group_id, [])

    def saving(self, kept: Mapping[int, int], group_id: int, new_count: int) -> float:
        """Cost saved by moving group ``group_id`` from its count in ``kept`` to ``new_count``, all else equal.

        Only the layers the group touches are evaluated, so this is cheap enough to call at every search step.
        """
        return self.change_saving(kept, {group_id: new_count})

    def change_saving(self, kept: Mapping[int, int], changes: Mapping[int, int]) -> float:
        """Cost saved by moving several groups at once (group id -> new count) from their counts in ``kept``."""
        layers = {layer.name: layer for group_id in changes for layer in self.layers_of_group(group_id)}.values()
        before = sum(self.layer_cost(layer, kept) for layer in layers)
        changed = {**kept, **changes}
        after = sum(self.layer_cost(layer, changed) for layer in layers)
        return before - after

    def neighbours(self, group_id: int) -> set[int]:
        """Groups whose savings change when ``group_id`` changes (they share a layer with it)."""
        out: set[int] = set()
        for layer in self.layers_of_group(group_id):
            out.update(layer.in_groups)
            if layer.out_group is not None:
                out.add(layer.out_group)
        return out


class GraphInfo(dict):  # type: ignore[type-arg]
    """The reference's ``graph_info``: ``{layer_name: {"cin", "cout", "ori_cout", "bitops"}}``, plus what a
    search needs to respect the exact cost.

    Attributes:
        graph: the :class:`~acps_core.graph.model.ChannelGraph`.
        cost_model: the :class:`CostModel`.
        fixed_kept: kept counts of groups the search must not change (user overrides and skips).
        full_cost: cost of the unpruned model.
        budget: the most the pruned model may cost: ``full_cost / compress_ratio``.
        ties: groups that move with another (:mod:`~acps_core.search.ties`): a count given to a set's leader is
            every member's.
    """

    def __init__(self, graph: ChannelGraph, cost_model: CostModel, fixed_kept: Mapping[int, int],
                 budget: float, ties: Ties | None = None) -> None:
        from acps_core.search.ties import Ties  # ties builds on this module's records

        super().__init__()
        self.graph = graph
        self.cost_model = cost_model
        self.fixed_kept = dict(fixed_kept)
        self.ties = ties or Ties()
        self._leader_of = {member: leader for leader, members in self.ties.sets.items() for member in members}
        self.full_cost = cost_model.full_cost
        self.budget = budget
        for layer in cost_model.layers:
            cin, cout = graph.channel_counts(layer, self.fixed_kept)
            self[layer.name] = {"cin": cin, "cout": cout, "ori_cout": layer.geometry.out_channels,  # type: ignore[union-attr]
                                "bitops": cost_model.layer_cost(layer, self.fixed_kept)}

    def cost(self, kept: Mapping[int, int]) -> float:
        """Model cost with the fixed groups at their counts and ``kept`` (group id -> count) for the others."""
        return self.cost_model.cost(self.ties.expand({**self.fixed_kept, **kept}))

    def neighbours(self, group_id: int) -> set[int]:
        """Groups whose savings change when ``group_id`` (with the groups tied to it) changes, each named by the
        leader of its set (see :meth:`CostModel.neighbours`)."""
        return {self._leader_of.get(g, g) for member in self.ties.members(group_id)
                for g in self.cost_model.neighbours(member)}

    def saving(self, kept: Mapping[int, int], group_id: int, new_count: int) -> float:
        """Cost saved by moving one group (with the groups tied to it) to ``new_count`` (see
        :meth:`CostModel.saving`)."""
        changes = dict.fromkeys(self.ties.members(group_id), new_count)
        return self.cost_model.change_saving(self.ties.expand({**self.fixed_kept, **kept}), changes)


@dataclass
class Decision:
    """Which channels each group keeps (sorted indices), as checked by the core."""

    keep: dict[int, list[int]] = field(default_factory=dict)

    def kept_counts(self) -> dict[int, int]:
        return {g: len(idx) for g, idx in self.keep.items()}


def masks_to_decision(masks: Any, records: Sequence[SearchRecord], method: str) -> Decision:
    """Check a search method's ``{layer_name: [0/1] * ori_cout}`` and turn it into kept indices per group.

    Raises:
        SearchError: for a mask of the wrong length or values, producers of one group given different masks,
            a layer that is not a searchable producer, or a kept count the group's constraints do not allow.
    """
    from acps_core.errors import SearchError

    if not isinstance(masks, Mapping):
        raise SearchError(f"search method {method} returned {type(masks).__name__}; it must return "
                          "{layer_name: [0 or 1] * ori_cout}")
    by_producer = {p: r for r in records for p in r.producers}
    unknown = [name for name in masks if name not in by_producer]
    if unknown:
        raise SearchError(f"search method {method} returned masks for {', '.join(map(str, unknown[:5]))}, which "
                          "are not producers of a searchable channel group; only these are: "
                          + ", ".join(sorted(by_producer)[:20]))
    decision = Decision()
    for record in records:
        given = {p: masks[p] for p in record.producers if p in masks}
        if not given:
            continue
        keeps = []
        for producer, mask in given.items():
            values = torch.as_tensor(mask).flatten().tolist()
            if len(values) != record.channels or any(v not in (0, 1) for v in values):
                raise SearchError(f"search method {method} returned a mask for layer {producer} with "
                                  f"{len(values)} entries; it must hold {record.channels} entries of 0 or 1")
            keeps.append([i for i, v in enumerate(values) if v == 1])
        if any(k != keeps[0] for k in keeps):
            raise SearchError(f"search method {method} gave different masks to {', '.join(given)}, whose channels "
                              f"are coupled (group {record.name}); they must get the same mask")
        broken = structure_violation(record.channels, record.unit, record.blocks, keeps[0], record.aligned)
        if broken:
            raise SearchError(f"search method {method} keeps channels of layer {record.name} that break its "
                              f"structure: {broken}")
        if len(keeps[0]) not in record.allowed_kept:
            raise SearchError(f"search method {method} keeps {len(keeps[0])} of {record.channels} channels of "
                              f"layer {record.name}; allowed counts are {record.allowed_kept[:12]}"
                              + (" ..." if len(record.allowed_kept) > 12 else "")
                              + " (alignment and max_prune_ratio)")
        if len(keeps[0]) < record.channels:
            decision.keep[record.group_id] = keeps[0]
    return decision


def masks_for(records: Sequence[SearchRecord], kept: Mapping[int, int]) -> dict[str, list[int]]:
    """``{producer: keep mask}`` for every record that keeps fewer than all its channels (``kept`` by group id),
    dropping the least sensitive channels: what a search method returns."""
    masks: dict[str, list[int]] = {}
    for record in records:
        count = kept.get(record.group_id, record.channels)
        if count < record.channels:
            mask = record.keep_mask(count)
            for producer in record.producers:
                masks[producer] = list(mask)
    return masks


def give_back(graph_info: GraphInfo, records: Sequence[SearchRecord], kept: dict[int, int]) -> None:
    """Grow groups back one allowed step at a time, most regained sensitivity first, while the exact cost stays
    within the budget: afterwards no single step of the result can be undone without exceeding it."""
    by_id = {r.group_id: r for r in records}
    while True:
        best: tuple[float, int, int] | None = None
        for group_id, record in by_id.items():
            larger = [k for k in record.allowed_kept if k > kept[group_id]]
            if not larger:
                continue
            new_count = min(larger)
            if graph_info.cost({**kept, group_id: new_count}) > graph_info.budget:
                continue
            regained = record.lost(kept[group_id]) - record.lost(new_count)
            if best is None or regained > best[0]:
                best = (regained, group_id, new_count)
        if best is None:
            return
        kept[best[1]] = best[2]
