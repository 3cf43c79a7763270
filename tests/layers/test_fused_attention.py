"""Attention with a fused qkv projection, written the ways vision libraries write it, recognised by its parts: its
heads are pruned whole, pruned == masked, the cost counts what a FLOP counter counts, and a module whose forward
ties its heads to something else is left alone with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acps_core as acps
from acps_core.graph.build import build_channel_graph
from acps_core.graph.model import ChannelGraph
from acps_core.graph.verify import verify_groups
from acps_core.layers import FusedAttentionAdapter, adapter_for, fused_attention
from acps_core.layers.following import follows_heads
from testing.flops import counted_macs, graph_macs
from testing.zoo import pruned_and_masked, random_keep

TOKENS, DIM = 16, 32


class PartMajor(nn.Module):
    """ViT's attention: every head's q rows, then k, then v; a constant head count in the reshape."""

    def __init__(self, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, head_dim, heads * head_dim
        self.qkv = nn.Linear(DIM, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.attn_dim))


class HeadMajor(nn.Module):
    """EfficientFormer's attention: each head's q, k and v rows together, values wider than keys, a bias per
    head and position pair, and a cache of it the forward keeps in eval mode."""

    def __init__(self, heads: int = 4, key_dim: int = 4, val_dim: int = 8) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = heads, key_dim, val_dim
        self.val_attn_dim = heads * val_dim
        self.qkv = nn.Linear(DIM, heads * (2 * key_dim + val_dim))
        self.proj = nn.Linear(self.val_attn_dim, DIM)
        self.attention_biases = nn.Parameter(torch.randn(heads, TOKENS * TOKENS) * 0.1)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def biases(self) -> torch.Tensor:
        if "cpu" not in self.attention_bias_cache:
            self.attention_bias_cache["cpu"] = self.attention_biases.reshape(-1, TOKENS, TOKENS)
        return self.attention_bias_cache["cpu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q @ k.transpose(-2, -1) * self.key_dim ** -0.5 + self.biases()).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.val_attn_dim))


class LinearNorm(nn.Module):
    """A Linear followed by a BatchNorm over its outputs (LeViT)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormedProjections(HeadMajor):
    """LeViT's attention: HeadMajor with Linear + BatchNorm projections and an activation before ``proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = LinearNorm(DIM, self.num_heads * (2 * self.key_dim + self.val_dim))  # type: ignore[assignment]
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(self.val_attn_dim, DIM))  # type: ignore[assignment]


class ConvHeads(nn.Module):
    """BoTNet's attention: a 1x1-conv qkv over an NCHW map, every head's q, then k, then v, and no out
    projection: the heads' values are the module's output channels."""

    def __init__(self, channels: int = 16, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.num_heads, self.dim_head_qk, self.dim_head_v = heads, head_dim, head_dim
        self.dim_out_qk = self.dim_out_v = heads * head_dim
        self.qkv = nn.Conv2d(channels, 3 * heads * head_dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = torch.split(self.qkv(x), [self.dim_out_qk, self.dim_out_qk, self.dim_out_v], dim=1)
        q = q.reshape(b * self.num_heads, self.dim_head_qk, -1).transpose(-1, -2)
        k = k.reshape(b * self.num_heads, self.dim_head_qk, -1)
        v = v.reshape(b * self.num_heads, self.dim_head_v, -1).transpose(-1, -2)
        attn = (q @ k * self.dim_head_qk ** -0.5).softmax(dim=-1)
        return (attn @ v).transpose(-1, -2).reshape(b, self.dim_out_v, h, w)


class TiedToInput(PartMajor):
    """EdgeNeXt's cross-covariance attention: attention across each head's channels rather than its tokens, a
    temperature per head, and the heads' output reshaped to the input's width ``C``."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__(heads, DIM // heads)
        self.temperature = nn.Parameter(torch.rand(self.num_heads, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 4, 1).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.temperature
        return self.proj((attn.softmax(dim=-1) @ v).permute(0, 3, 1, 2).reshape(b, n, c))


class MergedToInput(PartMajor):
    """ViT's attention with the heads merged back to the input's width ``C`` read from the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ScaledByInput(PartMajor):
    """Scores scaled by the input's width: pruning a head is exact, pruning an input channel is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * c ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class ConstantSplit(PartMajor):
    """q, k and v split at a size written as a constant: pruning a head would split them wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (part.reshape(b, n, self.num_heads, -1).transpose(1, 2) for part in self.qkv(x).split(32, dim=-1))
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """A transformer block around an attention module, with an MLP."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        self.attn = attention
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x)
        return self.fc2(torch.relu(self.fc1(x))).mean(dim=1)


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = ConvHeads()
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.attn(torch.relu(self.stem(x)))))).mean(dim=(2, 3))


def _model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "conv":
        return ConvBlock().eval(), torch.randn(2, 3, 4, 4)
    attention = {"part": PartMajor, "head": HeadMajor, "normed": NormedProjections, "tied": TiedToInput,
                 "split": ConstantSplit, "scaled": ScaledByInput}[kind]()
    model = Block(attention).eval()
    for module in model.modules():  # non-trivial norm statistics
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(2, TOKENS, 8)


def _heads_group(graph: ChannelGraph) -> int:
    return next(g.id for g in graph.groups if g.producers == ["attn"])


@pytest.mark.parametrize("kind", ["part", "head", "normed", "conv", "tied"])
def test_heads_are_pruned_whole_and_pruned_equals_masked(kind: str) -> None:
    model, x = _model(kind)
    assert isinstance(adapter_for(model.attn), FusedAttentionAdapter)
    graph = build_channel_graph(model, x)
    assert verify_groups(model, graph, x) == []
    group = graph.group(_heads_group(graph))
    heads, value_dim = FusedAttentionAdapter().heads(model.attn)
    assert group.prunable and group.unit == value_dim and group.channels == heads * value_dim

    keep = random_keep(graph, seed=2)
    keep[group.id] = list(range(value_dim, 3 * value_dim))  # heads 1 and 2 of 4
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    attention = pruned.attn
    assert attention.num_heads == 2
    if kind in ("head", "normed"):
        assert attention.val_attn_dim == 2 * value_dim and attention.attention_biases.shape[0] == 2
    if kind == "normed":
        assert attention.qkv.bn.num_features == attention.qkv.linear.out_features == 2 * (2 * 4 + 8)
    if kind == "conv":
        assert attention.dim_out_v == attention.dim_out_qk == 16 and pruned.bn.num_features == 16
    if kind == "tied":  # its forward follows the heads; the temperatures went with them
        assert follows_heads(attention) and attention.temperature.shape[0] == 2
        assert not follows_heads(model.attn)

    # The cost the search uses is what a FLOP counter counts, before and after.
    kept = {g: len(channels) for g, channels in keep.items()}
    assert graph_macs(graph, {}) == pytest.approx(counted_macs(model, x), rel=1e-6)
    assert graph_macs(graph, kept) == pytest.approx(counted_macs(pruned, x), rel=1e-6)


def test_the_head_by_head_layout_is_told_apart_from_the_part_by_part_one() -> None:
    """Both layouts have the same parts; only the check by execution tells them apart, and the rows pruned
    must be the head's own (a wrong layout would fail pruned == masked above, this names which was taken)."""
    model, x = _model("head")
    graph = build_channel_graph(model, x)
    adapter = FusedAttentionAdapter()
    assert adapter.layout(model.attn).head_major
    part_model, part_x = _model("part")
    build_channel_graph(part_model, part_x)
    assert not adapter.layout(part_model.attn).head_major
    rows = adapter.layout(model.attn).head_rows(torch.tensor([1]))
    assert rows.tolist() == list(range(16, 32))  # head 1's 4 + 4 + 8 rows
    # Taylor and L2 scores count every qkv row with its own head.
    slices = [s for s in graph.param_slices(graph.group(_heads_group(graph))) if s.module == "attn.qkv"]
    assert {s.param for s in slices} == {"weight", "bias"}
    per_channel = slices[0].per_channel(torch.ones(64, 32), 32)
    assert per_channel.reshape(4, 8).sum(dim=1).tolist() == [16 * 32.0] * 4


@pytest.mark.parametrize(("kind", "name", "why"), [("split", "ConstantSplit", "masking that head computes"),
                                                   ("scaled", "ScaledByInput", "masking that channel computes")])
def test_attention_pruned_otherwise_than_masked_is_left_alone_with_the_reason(kind: str, name: str, why: str) -> None:
    """Neither layout nor following the heads fits a constant split; a scale read from the input's width fits
    pruning heads but not the input channels: both are traced function by function, and say why."""
    model, x = _model(kind)
    graph = build_channel_graph(model, x)
    assert verify_groups(model, graph, x) == []
    qkv = next(g for g in graph.groups if "attn.qkv" in g.producers)
    assert not qkv.prunable
    assert why in qkv.reasons[0] and f"attn ({name})" in qkv.reasons[0]
    assert graph.group(next(g.id for g in graph.groups if "fc1" in g.producers)).prunable  # the rest still is
    assert model.attn.num_heads == 4 and model.attn.qkv.out_features == 96  # the check pruned copies only


def test_one_head_merged_to_the_input_width_follows_a_pruned_input() -> None:
    """One head cannot go, but the residual stream can: the head's merge to the input's width must then follow
    the head, which is still as wide as before."""
    torch.manual_seed(0)
    model, x = Block(MergedToInput(heads=1, head_dim=DIM)).eval(), torch.randn(2, TOKENS, 8)
    graph = build_channel_graph(model, x)
    assert verify_groups(model, graph, x) == []
    stream = graph.group(next(g.id for g in graph.groups if "embed" in g.producers))
    assert stream.prunable
    head = graph.group(_heads_group(graph))  # its one head cannot go, and the graph says so
    assert not head.prunable and "form one unit" in head.reasons[0]
    keep = random_keep(graph, seed=3)
    keep[stream.id] = list(range(0, DIM, 2))
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert pruned.attn.num_heads == 1 and follows_heads(pruned.attn)


def test_attention_products_are_measured_not_assumed() -> None:
    """Cross-covariance attention multiplies over each head's channels, not over the tokens: the cost must say
    so (the test above checks it against a FLOP counter; here, that it is not the token formula)."""
    model, x = _model("tied")
    graph = build_channel_graph(model, x)
    geometry = graph.layers["attn"].geometry
    assert geometry.attended == pytest.approx(2 * 8)  # q.k and attn.v: head_dim each, per token and channel
    assert (geometry.key_share + 1) * TOKENS != geometry.attended


@pytest.mark.parametrize("kind", ["normed", "tied"])
def test_searched_pruned_and_restored_with_the_layout_proven_again(tmp_path: Path, kind: str) -> None:
    model, x = _model(kind)
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.4\nascend_optimized: false\n")
    labels = torch.randint(0, 10, (2,))
    acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, labels], str(tmp_path / "prune.cfg"),
                                   sensitivity="GroupTaylorSensitivity")
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert pruned.attn.num_heads < 4
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    fused_attention._PROVEN.clear()  # as in a fresh process: restoring traces the model and proves it again
    fused_attention._FOLLOWING.clear()
    restored = acps.restore_prune_retrain_model(_model(kind)[0], x, tmp_path / "prune.record",
                                                tmp_path / "prune.cfg", tmp_path / "tuned.pth")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), pruned(x), rtol=0, atol=0)
    assert restored.attn.num_heads == pruned.attn.num_heads
    # The whole pruned model pickles with its forward (torch.save(model)), and loads computing the same.
    torch.save(pruned, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_attention_is_proven_in_float32(dtype: torch.dtype) -> None:
    """The trials on a module's first call prove how its heads move; rounding in half precision must not hide
    that (they run on float32 copies: in bfloat16, timm's ViT attention at this size differed from masking by
    more than the comparison allows), and the module itself keeps its dtype."""
    from timm.models.vision_transformer import Attention

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn, self.fc = nn.Linear(8, 96), Attention(96, num_heads=3), nn.Linear(96, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x)
            return self.fc(x + self.attn(x)).mean(dim=1)

    torch.manual_seed(0)
    model, x = Wide().eval().to(dtype), torch.randn(2, 64, 8).to(dtype)
    graph = build_channel_graph(model, x)
    assert graph.group(_heads_group(graph)).prunable
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_attention_traced_in_training_mode_says_so() -> None:
    model, x = _model("part")
    graph = build_channel_graph(model.train(), x)
    qkv = next(g for g in graph.groups if "attn.qkv" in g.producers)
    assert not qkv.prunable and "trace the model in eval mode" in qkv.reasons[0]
