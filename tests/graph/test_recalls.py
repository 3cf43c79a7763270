"""A module called more than once in one forward pass: when every call reads its channels where the first did, the
calls share one set of channels (pruned == masked) and the cost counts each call; otherwise it is left alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import acps_core as acps
from testing.flops import counted_macs, graph_macs
from testing.models import randomize_norms
from testing.zoo import checked_graph, producer_group, pruned_and_masked, random_keep

WIDTH = 12


class Shared(nn.Module):
    """Two blocks on one stream that call the same position-encoding conv, norm and MLP (CoaT's encoding, ALBERT's
    shared layers); the encoding is also registered under each block's name."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, WIDTH, 3, padding=1)
        self.encoding = nn.Conv2d(WIDTH, WIDTH, 3, padding=1, groups=WIDTH)
        self.norm = nn.BatchNorm2d(WIDTH)
        self.fc1, self.fc2 = nn.Conv2d(WIDTH, 2 * WIDTH, 1), nn.Conv2d(2 * WIDTH, WIDTH, 1)
        self.blocks = nn.ModuleList([nn.ModuleDict({"encoding": self.encoding}) for _ in range(2)])
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block["encoding"](x)
            x = x + self.fc2(torch.relu(self.fc1(self.norm(x))))
        return self.head(x.mean(dim=(2, 3)))


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_norms(Shared()).eval(), torch.randn(2, 3, 6, 6)


def test_a_module_called_again_on_the_same_channels_is_pruned_for_every_call() -> None:
    model, x = _model()
    graph = checked_graph(model, x, unprunable=["head"])
    assert {name: layer.calls for name, layer in graph.layers.items() if layer.calls > 1} == {
        "encoding": 2, "fc1": 2, "fc2": 2}
    stream, hidden = producer_group(graph, "stem"), producer_group(graph, "fc1")
    assert "fc2" in stream.producers and {u.layer for u in stream.followers} >= {"encoding", "norm"}
    assert hidden.channels == 2 * WIDTH

    keep = random_keep(graph, seed=2)
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert pruned.blocks[1]["encoding"] is pruned.encoding  # one module still, sliced once
    assert pruned.encoding.out_channels == len(keep[stream.id])
    kept = {g.id: len(keep[g.id]) for g in graph.prunable_groups}
    assert graph_macs(graph, {}) == pytest.approx(counted_macs(model, x), rel=1e-9)  # each call counted
    assert graph_macs(graph, kept) == pytest.approx(counted_macs(pruned, x), rel=1e-9)


class OtherChannels(nn.Module):
    """The same Linear called on one producer's channels, then on two producers' concatenated: the second call
    reads them elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(4, 4), nn.Linear(4, 4)
        self.shared = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.shared(self.a(x))
        second = self.shared(torch.cat([self.b(x), self.c(x)], dim=-1))
        return self.head(first + second)


def test_a_module_called_again_on_other_channels_is_left_alone() -> None:
    torch.manual_seed(0)
    model, x = OtherChannels().eval(), torch.randn(2, 4)
    graph = checked_graph(model, x)
    for producer in ("a", "b", "c", "shared"):
        group = producer_group(graph, producer)
        assert not group.prunable and "called more than once" in " ".join(group.reasons)
    assert graph_macs(graph, {}) == pytest.approx(counted_macs(model, x), rel=1e-9)  # both calls still cost


def test_searched_created_and_restored(tmp_path: Path) -> None:
    model, x = _model()
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    labels = torch.randint(0, 10, (2,))
    result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, labels],
                                            str(tmp_path / "prune.cfg"))
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert result.target_reached
    assert result.achieved_ratio == pytest.approx(counted_macs(model, x) / counted_macs(pruned, x), rel=1e-6)
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    restored = acps.restore_prune_retrain_model(_model()[0], x, tmp_path / "prune.record", tmp_path / "prune.cfg",
                                                tmp_path / "tuned.pth")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), pruned(x), rtol=0, atol=0)


class AttentionTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from timm.layers import Attention

        self.embed, self.attn, self.head = nn.Linear(8, 32), Attention(32, num_heads=4), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x)
        return self.head((x + self.attn(x)).mean(dim=1))


def test_attention_called_twice_is_left_alone_and_both_calls_cost() -> None:
    from testing.timm_models import counted_flops

    torch.manual_seed(0)
    model, x = AttentionTwice().eval(), torch.randn(2, 5, 8)
    graph = checked_graph(model, x)
    heads = producer_group(graph, "attn")
    assert not heads.prunable and "called more than once" in " ".join(heads.reasons)
    # Both calls' projections and attention products (the CPU attention kernel counted too).
    assert graph_macs(graph, {}) == pytest.approx(counted_flops(model, x[:1]) / 2, rel=1e-9)
