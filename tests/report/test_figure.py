"""The report's figure: written beside the config by acps search and write_figure, and readable as a PNG."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pytest
import torch

import acps_core as acps
from acps_core.report.figure import figure_path, render_figure, write_figure
from testing.models import ConvChain, randomize_norms


def searched(tmp_path: Path) -> acps.SearchResult:
    torch.manual_seed(0)
    (tmp_path / "search.cfg").write_text("compress_ratio: 2\nascend_optimized: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acps.auto_channel_prune_search(randomize_norms(ConvChain(size=8)), str(tmp_path / "search.cfg"),
                                              [torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))],
                                              str(tmp_path / "prune.cfg"))


def test_the_result_carries_the_path_and_each_layers_kept_sensitivity(tmp_path: Path) -> None:
    result = searched(tmp_path)
    costs = [cost for cost, _ in result.path]
    lost = [share for _, share in result.path]
    assert result.path[0] == (1.0, 0.0) and len(result.path) > 2
    assert all(a >= b for a, b in zip(costs, costs[1:])) and all(a <= b for a, b in zip(lost, lost[1:]))
    assert costs[-1] == pytest.approx(result.cost_after / result.cost_before)
    for layer in result.layers.values():
        if layer.status == "searched":
            assert layer.sensitivity_kept is not None and 0 < layer.sensitivity_kept <= 1
            if layer.kept == layer.total:
                assert layer.sensitivity_kept == 1.0
    removed = sum(1 for scores in result.scores.values() for _, kept in scores if not kept)
    assert removed == sum(layer.total - layer.kept for layer in result.layers.values() if layer.status == "searched")


def test_write_figure_writes_a_png_beside_the_config(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = searched(tmp_path)
    path = write_figure(result)
    assert path == figure_path(tmp_path / "prune.cfg") == tmp_path / "prune.cfg.report.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1500, 460)
    assert render_figure(result)[:8] == data[:8]
