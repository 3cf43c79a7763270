"""Cutting channels out of a model: every layer a decision touches, sliced by its layer adapter.

A decision says, for each channel group, which channels it keeps; :func:`dropped_positions` works out what that
removes from every layer (its output channels, its input positions) and bare parameter, and
:func:`prune_channels` cuts them, each layer by its adapter (:mod:`acps_core.layers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from acps_core.errors import GraphError
from acps_core.graph.model import ChannelGraph
from acps_core.layers.base import LayerAdapter, adapter_for, take


def dropped_positions(graph: ChannelGraph, keep: Mapping[int, Sequence[int]]
                      ) -> tuple[dict[str, set[int]], dict[str, set[int]], dict[tuple[str, int], set[int]]]:
    """What keeping only ``keep[g]`` of each group ``g`` removes: (layer -> output channels, for producers and
    followers; layer -> input positions, for consumers; (bare parameter, dim) -> positions).

    Raises:
        GraphError: a group that is not prunable, indices out of range, or a keep set that breaks the group's
            units or blocks.
    """
    outputs: dict[str, set[int]] = {}
    inputs: dict[str, set[int]] = {}
    parameters: dict[tuple[str, int], set[int]] = {}
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
        removed = [c for c in range(group.channels) if c not in kept]
        for name in group.producers:
            outputs.setdefault(name, set()).update(removed)
        for use in group.followers:
            if use.kind == "Parameter":
                parameters.setdefault((use.layer, use.dim), set()).update(use.positions(removed, group.channels))
            else:
                outputs.setdefault(use.layer, set()).update(use.positions(removed, group.channels))
        for use in group.consumers:
            inputs.setdefault(use.layer, set()).update(use.positions(removed, group.channels))
    return outputs, inputs, parameters


def prune_channels(model: nn.Module, graph: ChannelGraph, keep: Mapping[int, Sequence[int]]) -> None:
    """Remove channels from ``model`` in place: group ``g`` keeps only the channel indices ``keep[g]``.

    ``graph`` must have been built from ``model`` (or an identical one). A layer touched by several groups (the
    consumer of a concat) is sliced once, with every group's removals combined; a layer's outputs are sliced
    before its inputs.

    Raises:
        GraphError: a group that is not prunable, indices out of range, or a keep set that breaks the group's
            units or blocks.
    """
    outputs, inputs, parameters = dropped_positions(graph, keep)
    for name, drop in outputs.items():
        module = model.get_submodule(name)
        adapter = _adapter(module, name)
        adapter.keep_outputs(module, _kept(adapter.out_size(module), drop))
        owner_name, _, child = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner_adapter = adapter_for(owner)
        if owner_adapter is not None:
            owner_adapter.child_pruned(owner, child)  # nn.MultiheadAttention, whose out projection lost outputs
    for name, drop in inputs.items():
        module = model.get_submodule(name)
        adapter = _adapter(module, name)
        adapter.keep_inputs(module, _kept(adapter.in_size(module), drop))
    for (name, dim), drop in parameters.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        param = getattr(owner, attr)
        setattr(owner, attr, take(param, dim, _kept(param.shape[dim], drop)))


def _kept(size: int, dropped: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in dropped], dtype=torch.long)


def _adapter(module: nn.Module, name: str) -> LayerAdapter:
    adapter = adapter_for(module)
    if adapter is None:
        raise GraphError(f"acps cannot slice {name} ({type(module).__name__}): no layer adapter is registered for "
                         "its type (acps_core.register_layer)")
    return adapter
