"""Attention with separate q/k/v/o projections is confirmed on its first call, once per class and head counts: a
forward that ties the heads to a constant is traced function by function instead, and its heads say why."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from acps_core.graph.build import build_channel_graph
from acps_core.graph.verify import verify_groups


class Attention(nn.Module):
    """Self-attention by its parts: four heads of 8, two key/value heads, any head count ``heads_seen``."""

    def __init__(self, heads_seen: int | None = None) -> None:
        super().__init__()
        self.head_dim, self.num_key_value_groups, self.heads_seen = 8, 2, heads_seen
        self.q_proj, self.o_proj = nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)
        self.k_proj, self.v_proj = nn.Linear(32, 16, bias=False), nn.Linear(32, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        heads = self.heads_seen or -1  # a constant head count does not follow a pruned q_proj
        q = self.q_proj(x).view(b, t, heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Model(nn.Module):
    def __init__(self, heads_seen: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Attention(heads_seen) for _ in range(2))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        out: torch.Tensor = self.head(x.mean(1))
        return out


def test_confirmed_attention_loses_whole_key_value_groups() -> None:
    model, x = Model().eval(), torch.randn(2, 5, 32)
    graph = build_channel_graph(model, x)
    heads = next(g for g in graph.groups if g.name == "blocks.0")  # the attention module, traced whole
    assert heads.prunable and heads.channels == 32
    assert verify_groups(model, graph, x) == []


def test_a_constant_head_count_refuses_the_adapter_and_says_why() -> None:
    # Modules of the class just confirmed above (in this process): another model's modules are tried again.
    model, x = Model(heads_seen=4).eval(), torch.randn(2, 5, 32)
    graph = build_channel_graph(model, x)
    q_groups = [g for g in graph.groups if "blocks.0.q_proj" in g.producers]
    assert q_groups and not q_groups[0].prunable
    assert "separate q/k/v/o projections" in q_groups[0].reasons[0]
