"""A layer whose channels meet another layer's channels repeated (GhostNet's ghost module, ``cat([x1, cheap(x1)])``,
joined to a conv shortcut or a squeeze-excitation gate): the layer loses both copies of each channel the other
loses, exactly, and the cost counts them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.search.overrides import override_blocker
from testing.flops import counted_macs, graph_macs
from testing.models import randomize_norms
from testing.zoo import checked_graph, producer_group, pruned_and_masked, random_keep


class Ghost(nn.Module):
    """Half the channels from a 1x1 conv, the other half a depthwise filter of them."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        half = cout // 2
        self.primary = nn.Sequential(nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], dim=1)


class Gate(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, 4, 1), nn.Conv2d(4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(pooled))))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, gate: bool) -> None:
        super().__init__()
        self.ghost1, self.ghost2 = Ghost(cin, mid), Ghost(mid, cout)
        self.gate = Gate(mid) if gate else nn.Identity()
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout)) if cin != cout
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ghost2(self.gate(self.ghost1(x))) + self.shortcut(x)


class GhostLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = Bottleneck(8, 16, 8, gate=True)  # identity shortcut: the stem repeats block1's output half
        self.block2 = Bottleneck(8, 24, 16, gate=False)  # conv shortcut
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))).mean(dim=(2, 3)))


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_norms(GhostLike()).eval(), torch.randn(2, 3, 8, 8)


def test_a_layer_joined_to_repeated_channels_loses_both_copies() -> None:
    model, x = _model()
    graph = checked_graph(model, x, unprunable=["head"])
    # The stem's 8 channels meet block1's output half twice; the conv shortcut's 16 meet block2's 8 twice; the
    # gate's 16 meet block1's first ghost's 8 twice.
    for producer, repeated, width in [("block1.ghost2.primary.0", "stem.0", 4),
                                      ("block2.ghost2.primary.0", "block2.shortcut.0", 8),
                                      ("block1.ghost1.primary.0", "block1.gate.expand", 8)]:
        group = producer_group(graph, producer)
        assert group.channels == width and repeated not in group.producers
        assert sorted(u.offset for u in group.followers if u.layer == repeated) == [0, width]
        assert graph.layers[repeated].out_repeat == 2
        assert "2 times over" in str(override_blocker(graph, repeated))

    keep = random_keep(graph, seed=4)
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    shortcut = pruned.block2.shortcut[0]
    assert shortcut.out_channels == 2 * len(keep[producer_group(graph, "block2.ghost2.primary.0").id])
    kept = {g.id: len(keep[g.id]) for g in graph.prunable_groups}
    assert graph_macs(graph, {}) == pytest.approx(counted_macs(model, x), rel=1e-9)
    assert graph_macs(graph, kept) == pytest.approx(counted_macs(pruned, x), rel=1e-9)


class PartlyRead(GhostLike):
    """The conv shortcut's first channel is read on its own before the join: its channels, as already read,
    cannot be re-expressed as the other's repeated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        shortcut = self.block2.shortcut(x)
        first = shortcut[:, :1].mean(dim=(2, 3))
        y = self.block2.ghost2(self.block2.ghost1(x)) + shortcut
        return self.head(y.mean(dim=(2, 3)) + first)


def test_a_layer_read_otherwise_too_is_left_alone() -> None:
    torch.manual_seed(0)
    model, x = PartlyRead().eval(), torch.randn(2, 3, 8, 8)
    graph = checked_graph(model, x)
    shortcut = producer_group(graph, "block2.shortcut.0")
    assert not shortcut.prunable and "combines these channels" in " ".join(shortcut.reasons)
    assert producer_group(graph, "block1.ghost2.primary.0").prunable  # the identity shortcut's fold is unaffected


def test_searched_created_and_restored(tmp_path: Path) -> None:
    model, x = _model()
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    labels = torch.randint(0, 10, (2,))
    result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, labels],
                                            str(tmp_path / "prune.cfg"))
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert result.target_reached
    assert pruned.block2.shortcut[0].out_channels == 2 * pruned.block2.ghost2.primary[0].out_channels
    assert result.layers["block2.shortcut.0"].kept == pruned.block2.shortcut[0].out_channels
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    restored = acps.restore_prune_retrain_model(_model()[0], x, tmp_path / "prune.record", tmp_path / "prune.cfg",
                                                tmp_path / "tuned.pth")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), pruned(x), rtol=0, atol=0)
