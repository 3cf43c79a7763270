"""HeadPrunedMultiheadAttention computes what nn.MultiheadAttention computes, with the heads it kept."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.graph.verify import verify_groups
from acps_core.layers.attention import HeadPrunedMultiheadAttention, shrink_heads

MASKS = {
    "none": {},
    "bool attn_mask": {"attn_mask": torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) > 0.7},
    "float attn_mask": {"attn_mask": torch.randn(5, 5, generator=torch.Generator().manual_seed(1))},
    "key padding": {"key_padding_mask": torch.tensor([[False] * 4 + [True]] * 3)},
    "causal": {"attn_mask": torch.ones(5, 5).triu(1).bool(), "is_causal": True},
    "no weights": {"need_weights": False},
    "per-head weights": {"average_attn_weights": False},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_with_every_head_it_matches_torch(batch_first, mask) -> None:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    pruned = copy.deepcopy(reference)
    pruned.__class__ = HeadPrunedMultiheadAttention
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    expected, expected_weights = reference(x, x, x, **MASKS[mask])
    got, weights = pruned(x, x, x, **MASKS[mask])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights)


def test_dropping_a_head_equals_zeroing_its_output_columns() -> None:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pruned = copy.deepcopy(reference)
    keep = torch.tensor([c for c in range(16) if not 4 <= c < 8])  # drop head 1
    shrink_heads(pruned, keep)
    pruned.out_proj.weight = nn.Parameter(pruned.out_proj.weight.detach()[:, keep])
    with torch.no_grad():
        reference.out_proj.weight[:, 4:8] = 0
        torch.testing.assert_close(pruned(x, x, x)[0], reference(x, x, x)[0])
    assert pruned.num_heads == 3 and pruned.in_proj_weight.shape == (36, 16)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        x = self.embed(x)
        return self.fc((x + self.attn(x, x, x, need_weights=False)[0]).mean(1))


def test_heads_of_torch_attention_are_searched_pruned_restored_and_exported(tmp_path) -> None:
    import onnxruntime

    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(4, 7, 6)
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.4\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, torch.randint(0, 3, (4,))],
                                            str(tmp_path / "prune.cfg"))
    assert result.layers["attn"].kept < 32 and result.layers["attn"].kept % 8 == 0
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert isinstance(pruned.attn, nn.MultiheadAttention)
    assert pruned.attn.num_heads * 8 == result.layers["attn"].kept
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    restored = acps.restore_prune_retrain_model(Encoder().eval(), x, tmp_path / "prune.record",
                                                tmp_path / "prune.cfg", tmp_path / "tuned.pth")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), pruned(x))
    path = acps.save_prune_retrain_model(restored, tmp_path / "encoder", x, input_names=["x"])
    (out,) = onnxruntime.InferenceSession(str(path)).run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, restored(x).numpy(), rtol=1e-4, atol=1e-5)


class TransformerNet(nn.Module):
    """Two torch encoder layers on a residual stream that starts at ``embed`` and is read by ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x, padding=None):
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=padding).mean(1))


def test_the_residual_stream_through_torch_attention_is_one_group_pruned_exactly(tmp_path) -> None:
    import onnxruntime

    torch.manual_seed(0)
    model = TransformerNet().eval()
    x = torch.randn(4, 5, 6)
    graph = acps.build_channel_graph(model, x)
    stream = graph.group(graph.layers["embed"].out_group)
    assert stream.prunable, stream.reasons
    assert set(stream.producers) == {"embed"} | {f"encoder.layers.{i}.{p}" for i in (0, 1)
                                                 for p in ("self_attn.out_proj", "linear2")}
    assert {u.layer for u in stream.consumers} == {"head"} | {f"encoder.layers.{i}.{p}" for i in (0, 1)
                                                              for p in ("self_attn", "linear1")}
    assert {u.layer for u in stream.followers} == {f"encoder.layers.{i}.norm{n}" for i in (0, 1) for n in (1, 2)}
    heads = graph.group(graph.layers["encoder.layers.1.self_attn"].out_group)
    keep = {stream.id: [c for c in range(32) if c % 4 != 1], heads.id: list(range(8, 32))}
    pruned = copy.deepcopy(model)
    acps.prune.prune_channels(pruned, graph, keep)
    attention = pruned.encoder.layers[1].self_attn
    assert isinstance(attention, HeadPrunedMultiheadAttention)
    assert (attention.embed_dim, attention.num_heads, attention.out_proj.out_features) == (24, 3, 24)
    assert pruned.encoder.layers[0].self_attn.in_proj_weight.shape == (96, 24)
    assert pruned.encoder.layers[0].norm1.normalized_shape == (24,)
    padding = torch.tensor([[False] * 4 + [True]] * 4)
    for extra in ({}, {"padding": padding}):
        with acps.masking.masked_channels(model, graph, keep), torch.no_grad():
            expected = model(x, **extra)
        with torch.no_grad():  # eval + no_grad: where the encoder would take its fused kernel
            torch.testing.assert_close(pruned(x, **extra), expected, rtol=1e-5, atol=1e-6)
    path = acps.save_prune_retrain_model(pruned, tmp_path / "stream", x, input_names=["x"])
    (out,) = onnxruntime.InferenceSession(str(path)).run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, pruned(x).numpy(), rtol=1e-4, atol=1e-5)


class CrossAttention(nn.Module):
    def __init__(self, memory: str) -> None:
        super().__init__()
        self.memory_kind = memory
        self.queries = nn.Linear(6, 16)
        self.memory = nn.Linear(6, 16)
        self.learned = nn.Parameter(torch.randn(1, 5, 16))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        q = self.queries(x)
        kv = self.memory(x) if self.memory_kind == "layer" else self.learned.expand(x.shape[0], -1, -1)
        return self.head(self.attn(q, kv, kv, need_weights=False)[0].mean(1))


def test_query_and_memory_share_the_projection_columns() -> None:
    x = torch.randn(3, 5, 6)
    # Two layers' channels read through the same columns: one group, pruned alike.
    model = CrossAttention("layer").eval()
    graph = acps.build_channel_graph(model, x)
    assert graph.layers["queries"].prunable and graph.layers["queries"].out_group == graph.layers["memory"].out_group
    assert verify_groups(model, graph, x) == []  # a trial prune computes what masking computes
    # A memory whose channels acps cannot slice: the query's channels stay too.
    graph = acps.build_channel_graph(CrossAttention("parameter").eval(), x)
    assert not graph.layers["queries"].prunable
    assert "query and its key/value from different channels" in graph.layers["queries"].reason
    assert graph.layers["attn"].prunable  # its heads are unaffected


def test_attention_sharing_its_projection_with_another_is_left_alone() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.first = nn.MultiheadAttention(16, 2, batch_first=True)
            self.second = nn.MultiheadAttention(16, 2, batch_first=True)
            self.second.in_proj_weight = self.first.in_proj_weight
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            h = self.embed(x)
            h = h + self.first(h, h, h)[0]
            return self.head((h + self.second(h, h, h)[0]).mean(1))

    graph = acps.build_channel_graph(Tied().eval(), torch.randn(2, 5, 6))
    for layer in ("embed", "first", "second", "second.out_proj"):
        assert not graph.layers[layer].prunable, layer
        assert "shared with" in graph.layers[layer].reason, layer


def test_the_out_projection_is_costed_like_any_linear_on_tokens() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 32)
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            h = self.embed(x)
            h = h + self.attn(h, h, h)[0]
            return self.head(self.fc(h).mean(1))

    graph = acps.build_channel_graph(Pair().eval(), torch.randn(2, 50, 6))
    projection, fc = graph.layers["attn.out_proj"].geometry, graph.layers["fc"].geometry
    assert projection.kind == "Linear" and projection.macs() == fc.macs() == 50 * 32 * 32
