"""The cost a channel graph counts, and what torch's FLOP counter counts, for tests that compare the two."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from acps_core.graph.model import ChannelGraph


def graph_macs(graph: ChannelGraph, kept: dict[int, int]) -> float:
    """Multiply-accumulates per sample the graph counts when group ``g`` keeps ``kept[g]`` channels (every layer
    and the products outside them)."""
    total = graph.other_macs
    for layer in graph.layers.values():
        if layer.geometry is not None:
            total += layer.geometry.macs(*graph.channel_counts(layer, kept)) * layer.calls
    return total


def counted_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass on the first sample of ``x``, as ``FlopCounterMode`` counts them."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x[:1])
    return counter.get_total_flops() / 2
