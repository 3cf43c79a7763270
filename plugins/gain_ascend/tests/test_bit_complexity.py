"""BitComplexity: MACs from the traced geometry x activation bits x weight bits."""

from __future__ import annotations

import torch
from torch import nn

from acps_core.graph.build import build_channel_graph
from acps_core.methods.registry import get_registry
from acps_gain_ascend import BitComplexity


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)  # (batch, 16 tokens, 8)
        return self.head(self.proj(tokens).mean(1))


def test_conv_cost_uses_the_output_feature_map_and_32_bit_operands() -> None:
    graph = build_channel_graph(Mixed().eval(), torch.randn(2, 3, 8, 8))
    conv = graph.layers["conv"].geometry
    # stride 2 on 8x8: a 4x4 output map; 8 filters of 3x3x3
    assert BitComplexity().layer_cost(conv, 3, 8) == 4 * 4 * 8 * 3 * 9 * 32 * 32
    assert BitComplexity().layer_cost(conv, 3, 4) == 4 * 4 * 4 * 3 * 9 * 32 * 32


def test_linear_on_a_token_sequence_counts_every_token() -> None:
    graph = build_channel_graph(Mixed().eval(), torch.randn(2, 3, 8, 8))
    proj = graph.layers["proj"].geometry
    assert proj.input_shape == (1, 16, 8)
    assert BitComplexity().layer_cost(proj, 8, 12) == 16 * 8 * 12 * 32 * 32


def test_bit_widths_come_from_the_activation_and_weight_dtypes() -> None:
    model = Mixed().eval().to(torch.bfloat16)
    graph = build_channel_graph(model, torch.randn(2, 3, 8, 8, dtype=torch.bfloat16))
    conv = graph.layers["conv"].geometry
    assert BitComplexity().layer_cost(conv, 3, 8) == 4 * 4 * 8 * 3 * 9 * 16 * 16


def test_cost_grows_with_channels() -> None:
    graph = build_channel_graph(Mixed().eval(), torch.randn(2, 3, 8, 8))
    conv = graph.layers["conv"].geometry
    costs = [BitComplexity().layer_cost(conv, 3, c) for c in range(1, 9)]
    assert costs == sorted(costs) and len(set(costs)) == 8


def test_registered_by_name_from_its_distribution() -> None:
    info = get_registry(refresh=True).get("gain", "BitComplexity")
    assert info.cls is BitComplexity
    assert info.distribution == "acps-gain-estimators"
