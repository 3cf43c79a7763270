"""Norms over the channels that pruning can only approximate (a LayerNorm normalises over the kept channels):
pruned by default and named in the search's report, or left alone with the reason under
``approximate_norms(False)``; RMS norms written as modules stay exact either way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acps_core as acps
from acps_core.errors import ArgumentError
from acps_core.graph.build import build_channel_graph
from acps_core.graph.masking import approximated_groups
from acps_core.layers import approximate_norms
from tests.layers.test_mean_norm import RMSNorm


class Normed(nn.Module):
    """Three hidden widths: one under an ``nn.LayerNorm``, one under ``F.layer_norm`` with bare parameters, one
    under a hand-written RMS norm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.ln, self.a_out = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)
        self.b, self.b_out = nn.Linear(8, 16), nn.Linear(16, 8)
        self.b_weight, self.b_bias = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))
        self.c, self.rms, self.c_out = nn.Linear(8, 16), RMSNorm(16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_out(torch.relu(self.ln(self.a(x))))
        x = self.b_out(torch.relu(F.layer_norm(self.b(x), (16,), self.b_weight, self.b_bias)))
        out: torch.Tensor = self.c_out(torch.relu(self.rms(self.c(x))))
        return out


@pytest.fixture
def exact_only() -> Iterator[None]:
    approximate_norms(False)
    try:
        yield
    finally:
        approximate_norms(True)


def groups_by_name(graph) -> dict:
    return {g.name: g for g in graph.groups}


def test_by_default_they_are_pruned_and_named(tmp_path: Path) -> None:
    model, x = Normed().eval(), torch.randn(16, 8)
    graph = build_channel_graph(model, x)
    assert {g.name for g in approximated_groups(model, graph)} == {"a", "b"}
    assert all(groups_by_name(graph)[name].prunable for name in ("a", "b", "c"))
    (tmp_path / "search.cfg").write_text("compress_ratio: 2\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(model, tmp_path / "search.cfg", [x, torch.randint(0, 4, (16,))],
                                            tmp_path / "prune.cfg")
    pruned = {name for name in ("a", "b") if result.layers[name].kept < 16}
    note = next((n for n in result.notes if "normalised by a LayerNorm" in n), "")
    assert pruned and all(name in note for name in pruned)
    assert "approximate_norms(False)" in note


def test_exact_only_leaves_them_alone_with_the_reason_and_keeps_rms_norms(exact_only: None) -> None:
    model, x = Normed().eval(), torch.randn(16, 8)
    graph = build_channel_graph(model, x)
    groups = groups_by_name(graph)
    for name in ("a", "b"):
        assert not groups[name].prunable
        assert any("approximate_norms(False)" in reason for reason in groups[name].reasons)
    assert groups["c"].prunable  # an RMS norm module is made exact by folding: not an approximation
    assert approximated_groups(model, graph) == []


def test_the_setting_takes_a_bool() -> None:
    with pytest.raises(ArgumentError, match="approximate_norms takes True or False, got 'no'"):
        approximate_norms("no")  # type: ignore[arg-type]


class Scaled(nn.Module):
    """A per-channel buffer scales the hidden width: a follower that is a tensor of the model, not a module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("scale", torch.rand(16) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)) * self.scale)
        return out


def test_a_per_channel_buffer_is_no_norm_and_the_search_runs(tmp_path: Path) -> None:
    model, x = Scaled().eval(), torch.randn(16, 8)
    graph = build_channel_graph(model, x)
    assert any(use.kind == "Buffer" for g in graph.groups for use in g.followers)
    assert approximated_groups(model, graph) == []
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(model, tmp_path / "search.cfg", [x, torch.randint(0, 4, (16,))],
                                            tmp_path / "prune.cfg")
    assert result.target_reached and not any("LayerNorm" in note for note in result.notes)
