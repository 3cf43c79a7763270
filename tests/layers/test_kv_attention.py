"""Attention with separate q and kv projections, keys and values possibly from a spatial reduction of the tokens
(PVT-v2's way): heads pruned whole, pruned == masked, the input left alone where the reduction keeps its width,
and the cost what a FLOP counter counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.graph.build import build_channel_graph
from acps_core.graph.verify import verify_groups
from acps_core.layers import KVAttentionAdapter, adapter_for, fused_attention, kv_attention
from acps_core.layers.following import follows_heads
from testing.flops import counted_macs, graph_macs
from testing.zoo import pruned_and_masked, random_keep

SIDE, DIM, HEADS = 4, 32, 4


class Reduced(nn.Module):
    """Queries from every token; keys and values from the tokens reduced by a strided conv and a norm (or from
    the tokens themselves, ``ratio`` 1); the heads merged back to the input's width."""

    def __init__(self, ratio: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = HEADS, DIM // HEADS
        self.q, self.kv, self.proj = nn.Linear(DIM, DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(DIM, DIM)
        self.sr = nn.Conv2d(DIM, DIM, ratio, stride=ratio) if ratio > 1 else None
        self.norm = nn.LayerNorm(DIM) if ratio > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        if self.sr is not None and self.norm is not None:
            x = self.sr(x.permute(0, 2, 1).reshape(b, c, SIDE, SIDE)).reshape(b, c, -1).permute(0, 2, 1)
            x = self.norm(x)
        k, v = self.kv(x).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, ratio: int) -> None:
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        self.attn = Reduced(ratio)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x)
        return self.fc2(torch.relu(self.fc1(x))).mean(dim=1)


def _model(ratio: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Block(ratio).eval(), torch.randn(2, SIDE * SIDE, 8)


@pytest.mark.parametrize("ratio", [1, 2])
def test_heads_pruned_whole_and_the_input_only_without_a_reduction(ratio: int) -> None:
    model, x = _model(ratio)
    assert isinstance(adapter_for(model.attn), KVAttentionAdapter)
    graph = build_channel_graph(model, x)
    assert verify_groups(model, graph, x) == []
    heads = next(g for g in graph.groups if g.producers == ["attn"])
    assert heads.prunable and heads.unit == DIM // HEADS and heads.channels == DIM
    stream = next(g for g in graph.groups if "embed" in g.producers)
    assert stream.prunable == (ratio == 1)
    if ratio > 1:
        assert "its keys and values are computed from sr, norm" in stream.reasons[0]

    keep = random_keep(graph, seed=2)
    keep[heads.id] = list(range(8, 24))  # heads 1 and 2 of 4
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    attention = pruned.attn
    assert attention.num_heads == 2 and attention.q.out_features == 16 and attention.kv.out_features == 32
    assert follows_heads(attention)
    # The cost is what a FLOP counter counts, the reduction and kv on fewer positions included.
    kept = {g: len(channels) for g, channels in keep.items()}
    assert graph_macs(graph, {}) == pytest.approx(counted_macs(model, x), rel=1e-6)
    assert graph_macs(graph, kept) == pytest.approx(counted_macs(pruned, x), rel=1e-6)


def test_searched_pruned_exported_and_restored(tmp_path: Path) -> None:
    import onnxruntime

    model, x = _model(2)
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.4\nascend_optimized: false\n")
    labels = torch.randint(0, 10, (2,))
    acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, labels], str(tmp_path / "prune.cfg"))
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert pruned.attn.num_heads < HEADS
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    fused_attention._PROVEN.clear()  # as in a fresh process
    kv_attention._FOLLOWING.clear()
    restored = acps.restore_prune_retrain_model(_model(2)[0], x, tmp_path / "prune.record", tmp_path / "prune.cfg",
                                                tmp_path / "tuned.pth")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), pruned(x), rtol=0, atol=0)
    # The forward that follows the heads exports: to ONNX, and through torch.jit.trace (sizes are tensors there).
    path = acps.save_prune_retrain_model(pruned, tmp_path / "reduced", x, input_names=["x"])
    (out,) = onnxruntime.InferenceSession(str(path)).run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), pruned(x), rtol=1e-4, atol=1e-5)
        traced = torch.jit.trace(pruned, x)
        torch.testing.assert_close(traced(x), pruned(x), rtol=1e-5, atol=1e-6)


class ClassTokenAttention(Reduced):
    """The same parts, but queries from the class token only (VOLO's class attention)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x[:, :1]).reshape(b, 1, self.num_heads, -1).permute(0, 2, 1, 3)
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, 1, c))


def test_attention_whose_queries_are_not_every_position_is_traced_function_by_function() -> None:
    torch.manual_seed(0)
    model = Block(1).eval()
    model.attn = ClassTokenAttention(1).eval()
    x = torch.randn(2, SIDE * SIDE, 8)
    assert isinstance(adapter_for(model.attn), KVAttentionAdapter)  # its parts match ...
    graph = build_channel_graph(model, x)
    assert verify_groups(model, graph, x) == []
    assert not any(g.producers == ["attn"] for g in graph.groups)  # ... but it is not traced as one layer
    q = next(g for g in graph.groups if "attn.q" in g.producers)
    assert "every position of its input" in " ".join(q.reasons)
    assert graph_macs(graph, {}) == pytest.approx(counted_macs(model, x), rel=1e-6)
