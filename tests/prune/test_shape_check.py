"""A config written by the search is pruned with only the output shapes checked, computed on fake tensors: what the
forward caches stays out of the pruned model, a forward that needs values runs for real, and a shape that changes
is still caught."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.errors import GraphError
from acps_core.prune import copying
from testing.models import ConvChain, assert_pruned_matches_search, randomize_norms


class CachingChain(ConvChain):
    """Caches a tensor computed from a weight in eval mode, as timm's attention-bias caches do."""

    def __init__(self) -> None:
        super().__init__(size=8)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.cache["scale"] = self.fc2.bias.detach().abs().mean()
        return super().forward(x)


class ValueBranch(ConvChain):
    """Takes a branch on a value of its input: fake tensors cannot run it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * 2 if bool(x.sum() > -1e9) else out


def searched(tmp_path: Path, model: nn.Module, x: torch.Tensor) -> tuple[Path, Any]:
    (tmp_path / "search.cfg").write_text("compress_ratio: 2\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, torch.randint(0, 10, (6,))],
                                            str(tmp_path / "prune.cfg"))
    return tmp_path / "prune.cfg", result


@pytest.mark.parametrize("model_type", [CachingChain, ValueBranch])
def test_a_searched_config_prunes_through_the_shape_check(tmp_path: Path, model_type: type[nn.Module],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = randomize_norms(model_type()).eval()
    x = torch.randn(6, 3, 8, 8)
    config, result = searched(tmp_path, model, x)
    real_runs: list[int] = []
    checked_output = copying._checked_output
    monkeypatch.setattr(copying, "_checked_output", lambda *args: real_runs.append(1) or checked_output(*args))
    pruned = acps.create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    assert real_runs == ([] if model_type is CachingChain else [1])  # fake tensors where they can run
    if isinstance(pruned, CachingChain):
        assert not pruned.cache or type(pruned.cache["scale"]) is torch.Tensor  # no fake tensor left behind
    assert_pruned_matches_search(model, pruned, x, result)


def test_the_shape_check_still_catches_a_changed_output_shape(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = randomize_norms(ConvChain(size=8)).eval()
    x = torch.randn(6, 3, 8, 8)
    config, _ = searched(tmp_path, model, x)
    shapes = copying._output_shapes
    monkeypatch.setattr(copying, "_output_shapes", lambda m, data: shapes(m, data)[:, :3])
    with pytest.raises(GraphError, match="changed shape"):
        acps.create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    assert not (tmp_path / "prune.record").exists()


class InPlaceChain(ConvChain):
    """Writes in place into its activations (``relu_``), which the guard on the user's weights looks at."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x)).relu_()
        x = self.pool(self.bn2(self.conv2(x)).relu_())
        x = torch.flatten(self.bn3(self.conv3(x)).relu_(), 1)
        return self.fc2(self.fc1(x).relu_())


def test_in_place_ops_on_fake_tensors_raise_no_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = randomize_norms(InPlaceChain(size=8)).eval()
    x = torch.randn(6, 3, 8, 8)
    config, result = searched(tmp_path, model, x)
    real_runs: list[int] = []
    checked_output = copying._checked_output
    monkeypatch.setattr(copying, "_checked_output", lambda *args: real_runs.append(1) or checked_output(*args))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = acps.create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    assert not [str(w.message) for w in caught]  # torch warns when a fake tensor's data pointer is read
    assert real_runs == []  # ... and the shape check ran on fake tensors
    assert_pruned_matches_search(model, pruned, x, result)
