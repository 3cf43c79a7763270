"""Evaluating a pruning decision without changing the model: the removed channels are zeroed where they are read.

Zeroing the input channels a consumer layer would lose makes its output exactly what the physically pruned
layer computes, so ``masked_channels`` gives the pruned model's outputs (before fine-tuning) on the unpruned
model. Hooks are removed on exit; no parameter is touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from acps_core.graph import LINEAR_TYPES, ChannelGraph


def _removed_positions(graph: ChannelGraph, keep: Mapping[int, list[int]]) -> dict[str, list[int]]:
    """Consumer layer -> positions of its input channel dimension that the decision removes."""
    positions: dict[str, list[int]] = {}
    for group_id, kept in keep.items():
        group = graph.group(group_id)
        kept_set = set(kept)
        removed = [c for c in range(group.channels) if c not in kept_set]
        for use in group.consumers:
            positions.setdefault(use.layer, []).extend(
                use.offset + c * use.block + j for c in removed for j in range(use.block))
    return positions


@contextmanager
def masked_channels(model: nn.Module, graph: ChannelGraph, keep: Mapping[int, list[int]]) -> Iterator[None]:
    """Within the block, ``model`` behaves as if group ``g`` kept only the channels ``keep[g]``."""
    handles = []
    for name, positions in _removed_positions(graph, keep).items():
        module = model.get_submodule(name)
        dim = -1 if isinstance(module, LINEAR_TYPES) else 1
        index = torch.tensor(sorted(set(positions)), dtype=torch.long)

        def zero_inputs(_module: nn.Module, args: tuple[Any, ...], index: torch.Tensor = index,
                        dim: int = dim) -> tuple[Any, ...]:
            x = args[0].clone()
            x.index_fill_(dim % x.dim(), index.to(x.device), 0)
            return (x, *args[1:])

        handles.append(module.register_forward_pre_hook(zero_inputs))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
