"""What a pruning decision removes, layer by layer: the one place that maps a decision (which channels each group
keeps) to positions in the layers and parameters, used alike to slice a model (:mod:`acps_core.prune.slicing`)
and to mask one (:mod:`acps_core.graph.masking`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from acps_core.errors import GraphError
from acps_core.graph.model import ChannelGraph


@dataclass
class Removal:
    """The positions a decision removes.

    Attributes:
        producers: layer -> its output channels removed (the layers that produce a group's channels).
        followers: layer -> its channels removed (norms, depthwise convs and other layers that follow a group).
        inputs: layer -> its input positions removed (the layers that consume a group's channels).
        parameters: (bare parameter, dim) -> its positions removed along ``dim`` (a layer scale, a position
            embedding).
    """

    producers: dict[str, set[int]] = field(default_factory=dict)
    followers: dict[str, set[int]] = field(default_factory=dict)
    inputs: dict[str, set[int]] = field(default_factory=dict)
    parameters: dict[tuple[str, int], set[int]] = field(default_factory=dict)

    @property
    def outputs(self) -> dict[str, set[int]]:
        """Layer -> output channels removed, producers and followers together."""
        outputs = {name: set(positions) for name, positions in self.producers.items()}
        for name, positions in self.followers.items():
            outputs.setdefault(name, set()).update(positions)
        return outputs


def removal(graph: ChannelGraph, keep: Mapping[int, Sequence[int]]) -> Removal:
    """What keeping only ``keep[g]`` of each group ``g`` removes (see :class:`Removal`); ``keep`` is not checked
    (see :func:`check_decision`)."""
    removed = Removal()
    for group_id, kept_list in keep.items():
        group = graph.group(group_id)
        kept = set(kept_list)
        dropped = [c for c in range(group.channels) if c not in kept]
        for name in group.producers:
            removed.producers.setdefault(name, set()).update(dropped)
        for use in group.followers:
            positions = use.positions(dropped, group.channels)
            if use.kind in ("Parameter", "Buffer"):
                removed.parameters.setdefault((use.layer, use.dim), set()).update(positions)
            else:
                removed.followers.setdefault(use.layer, set()).update(positions)
        for use in group.consumers:
            removed.inputs.setdefault(use.layer, set()).update(use.positions(dropped, group.channels))
    return removed


def check_decision(graph: ChannelGraph, keep: Mapping[int, Sequence[int]]) -> None:
    """Check that a decision can be carried out.

    Raises:
        GraphError: a group that is not prunable, indices out of range, or a keep set that breaks the group's
            units or blocks.
    """
    for group_id, kept_list in keep.items():
        group = graph.group(group_id)
        if not group.prunable:
            raise GraphError(f"channel group {group.name} cannot be pruned: {'; '.join(group.reasons)}")
        kept = set(kept_list)
        if not kept or any(c < 0 or c >= group.channels for c in kept):
            raise GraphError(f"channel group {group.name} has {group.channels} channels; keep indices must be a "
                             f"non-empty subset of 0..{group.channels - 1}")
        broken = group.check_keep(sorted(kept))
        if broken:
            raise GraphError(f"cannot keep those channels of group {group.name}: {broken}")
