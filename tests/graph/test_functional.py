"""Torch functions that do a layer's work with the model's parameters, mapped by what they compute: norms with
their parameters and buffers wherever they live, convs with a module's own weight, and the ones acps must refuse."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from acps_core.graph.build import build_channel_graph
from acps_core.graph.verify import verify_groups
from testing.zoo import pruned_and_masked, random_keep


class BareNorm(nn.Module):
    """A batch norm written by hand: its weight, bias and statistics are a plain module's parameters and buffers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(channels) + 0.5)
        self.shift = nn.Parameter(torch.randn(channels))
        self.register_buffer("mean", torch.randn(channels) * 0.1)
        self.register_buffer("var", torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.batch_norm(x, self.mean, self.var, self.gain, self.shift, False, 0.0, 1e-5))


class SamePadConv(nn.Conv2d):
    """A conv that pads in its forward and calls F.conv2d with its own weight (timm's Conv2dSame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FixedGroups(nn.Module):
    """A group norm called with a group count written as a constant."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, 4, self.weight, self.bias)


class Net(nn.Module):
    def __init__(self, norm: type[nn.Module] = BareNorm) -> None:
        super().__init__()
        self.conv1 = SamePadConv(3, 16, 3)
        self.norm = norm(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(self.norm(self.conv1(x))).mean((2, 3)))


def test_a_hand_written_norm_and_a_functional_conv_prune_like_modules() -> None:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    graph = build_channel_graph(model, x)
    group = next(g for g in graph.groups if "conv1" in g.producers)
    assert group.prunable, group.reasons
    assert {(u.layer, u.kind) for u in group.followers} == {("norm.gain", "Parameter"), ("norm.shift", "Parameter"),
                                                            ("norm.mean", "Buffer"), ("norm.var", "Buffer")}
    assert verify_groups(model, graph, x) == []
    keep = random_keep(graph, seed=0)
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected)
    kept = len(keep[group.id])
    assert pruned.conv1.weight.shape[0] == kept and pruned.norm.gain.shape == (kept,)
    assert set(dict(pruned.norm.named_buffers())) == {"mean", "var"}  # still buffers, sliced
    assert pruned.norm.mean.shape == (kept,)


def test_a_group_norm_with_a_constant_group_count_is_left_alone_with_the_reason() -> None:
    model, x = Net(FixedGroups).eval(), torch.randn(2, 3, 8, 8)
    reasons = build_channel_graph(model, x).explain()
    assert "group count as a constant" in reasons["conv1"]


def test_a_conv_with_a_computed_weight_is_left_alone_with_the_reason() -> None:
    class Standardised(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), Standardised(8, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    reasons = build_channel_graph(model.eval(), torch.randn(2, 3, 8, 8)).explain()
    assert "weight computed in the forward pass" in reasons["0"]


class BiasedAttention(nn.Module):
    """Attention whose mask is a bias with one slice per head, broadcast over the batch (``bias_rank`` 3) or not
    (4), as T5 adds its relative position bias."""

    def __init__(self, bias_rank: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.out = (nn.Linear(16, 16) for _ in range(4))
        self.bias = nn.Parameter(torch.randn((1,) * (bias_rank - 3) + (4, 5, 5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (layer(x).view(b, t, -1, 4).transpose(1, 2) for layer in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        result: torch.Tensor = self.out(out.transpose(1, 2).reshape(b, t, -1))
        return result


def test_a_mask_with_one_slice_per_head_keeps_the_heads_and_says_why() -> None:
    for rank in (3, 4):
        model = BiasedAttention(rank).eval()
        graph = build_channel_graph(model, torch.randn(2, 5, 16))
        heads = next(g for g in graph.groups if "q" in g.producers)
        assert not heads.prunable and "one slice per head" in heads.reasons[0], rank
