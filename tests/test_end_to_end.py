"""Search -> create -> compare, on small models of every shape the foundation handles.

For each model: the search's per-layer decisions match the physically pruned model, the pruned model computes
exactly what the unpruned model computes with the same channels masked, and re-tracing the pruned model gives
the cost the search reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acps_core as acps
from acps_core.config import parse_prune_config, resolve_layer
from acps_core.graph.build import build_channel_graph
from acps_core.graph.verify import verify_groups
from acps_core.search.problem import CostModel
from acps_gain_ascend import BitComplexity
from testing.models import ConvChain, assert_pruned_matches_search, pooled_chain, randomize_norms


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv_a = nn.Conv2d(32, 32, 3, padding=1)
        self.conv_b = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.conv_b(F.relu(self.conv_a(x)))
        return self.head(x.mean((2, 3)))


class DepthwiseAfterConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 1)
        self.b = nn.Conv2d(3, 48, 1)
        self.dw = nn.Conv2d(80, 80, 3, padding=1, groups=80)
        self.bn = nn.BatchNorm2d(80)
        self.project = nn.Conv2d(80, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.bn(self.dw(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(self.project(F.hardswish(x)).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.reduce = nn.Conv2d(32, 8, 1)
        self.expand = nn.Conv2d(8, 32, 1)
        self.prelu = nn.PReLU(32)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        x = self.prelu(self.conv(x))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.head(x * gate).mean((2, 3))


class Awkward(nn.Module):
    """Patterns the graph must block rather than prune wrongly."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)          # called on two different convs: they keep the same channels
        self.floor = nn.Parameter(torch.zeros(16, 1, 1))
        self.c3 = nn.Conv2d(16, 32, 3, padding=1)
        self.c4 = nn.Conv2d(32, 16, 1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.bn(self.c2(x)))
        x = torch.clamp(self.c3(input=x), max=3.0)        # called with a keyword argument
        x = torch.clamp(self.c4(x), min=self.floor)        # per-channel tensor bound
        x = F.max_pool2d(x, 2)
        x = x.view(-1, 16 * 4 * 4)                         # hard-coded channel count
        return self.fc2(F.relu(self.fc1(x)))


def conv_chain() -> nn.Module:
    return randomize_norms(ConvChain(size=8))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv_chain": (conv_chain, (3, 8, 8)),
    "pooled_chain": (lambda: randomize_norms(pooled_chain()), (3, 12, 12)),
    "residual": (lambda: randomize_norms(Residual()), (3, 8, 8)),
    "depthwise_after_concat": (lambda: randomize_norms(DepthwiseAfterConcat()), (3, 8, 8)),
    "squeeze_excite": (SqueezeExcite, (3, 8, 8)),
    "awkward": (lambda: randomize_norms(Awkward()), (3, 8, 8)),
}


def run_search(tmp_path: Path, model: nn.Module, x: torch.Tensor, config: str,
               override: str | None = None) -> acps.SearchResult:
    if override is not None:
        (tmp_path / "override.cfg").write_text(override)
        config += "override_prune_cfg: 'override.cfg'\n"
    (tmp_path / "search.cfg").write_text(config)
    labels = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", acps.PruneTargetWarning)
        return acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, labels],
                                              str(tmp_path / "prune.cfg"))


def check_pruned(tmp_path: Path, model: nn.Module, x: torch.Tensor, result: acps.SearchResult) -> nn.Module:
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert_pruned_matches_search(model, pruned, x, result)
    pruned_cost = CostModel(build_channel_graph(pruned, x), BitComplexity()).full_cost
    assert pruned_cost == pytest.approx(result.cost_after, rel=1e-9)
    return pruned


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("aligned", [False, True])
def test_search_then_create_prunes_what_the_search_decided(tmp_path, name, aligned) -> None:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    result = run_search(tmp_path, model, x, f"compress_ratio: 1.5\nascend_optimized: {str(aligned).lower()}\n")
    check_pruned(tmp_path, model, x, result)


def test_written_config_resolves_to_the_reported_counts_for_every_layer(tmp_path) -> None:
    model = DepthwiseAfterConcat().eval()
    x = torch.randn(8, 3, 8, 8)
    result = run_search(tmp_path, model, x, "compress_ratio: 1.5\nascend_optimized: false\n")
    cfg = parse_prune_config(tmp_path / "prune.cfg")
    for name, layer in result.layers.items():
        decision = resolve_layer(cfg, name, layer.kind)
        assert decision.source != "global", f"{name} falls back to the placeholder global ratio"
        if layer.kept < layer.total:
            assert decision.prune_ratio == pytest.approx(1 - layer.kept / layer.total, abs=1e-6)
        else:
            assert decision.source == "skip"


@pytest.mark.parametrize("override", [
    'override_layer_configs { layer_name: "stem" prune_config { filter_pruner { balanced_l2_norm_filter_prune '
    '{ prune_ratio: 0.5 ascend_optimized: false } } } }\n',
    'skip_layers: "conv_b"\n',
])
def test_overriding_or_skipping_one_producer_of_a_group_governs_the_whole_group(tmp_path, override) -> None:
    model = randomize_norms(Residual()).eval()
    x = torch.randn(8, 3, 8, 8)
    result = run_search(tmp_path, model, x, "compress_ratio: 1.3\nascend_optimized: false\n", override)
    assert result.layers["stem"].kept == result.layers["conv_b"].kept
    assert result.layers["stem"].kept == (16 if "stem" in override else 32)
    check_pruned(tmp_path, model, x, result)


def test_awkward_patterns_are_blocked_with_their_reasons(tmp_path) -> None:
    model, x = Awkward().eval(), torch.randn(2, 3, 8, 8)
    graph = build_channel_graph(model, x)
    reasons = graph.explain()
    # One norm for both convs' channels: they are one group (the norm is sliced once, for both calls).
    assert graph.layers["c1"].out_group == graph.layers["c2"].out_group and graph.layers["c1"].prunable
    assert verify_groups(model, graph, x) == []
    # c4's channels meet the per-channel bound self.floor (sliced with them) but then a hard-coded view
    assert "constant size 256" in reasons["c4"]
    assert "floor" in [u.layer for u in graph.group(graph.layers["c4"].out_group).followers]
    assert graph.layers["c3"].prunable  # its keyword-argument consumer c4 was seen
    assert "c4" in [u.layer for u in graph.group(graph.layers["c3"].out_group).consumers]
    graph = build_channel_graph(ConvChainLiteralView().eval(), torch.randn(2, 3, 8, 8))
    assert "constant size" in graph.explain()["conv"]


class ConvChainLiteralView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 16 * 8 * 8))
