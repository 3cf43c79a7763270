"""create_prune_retrain_model(..., calibration_data=...): BatchNorm running statistics corrected for the pruning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acps_core
from acps_core.errors import DataError
from testing.models import recalibrate_in_order
from tests.support.model_snapshot import ModelSnapshot


class ResidualDepthwise(nn.Module):
    """A stem, a residual block, an inverted residual with a depthwise conv, and a BatchNorm1d head: every kind of
    channel group the correction passes through."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48),
                                       nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(48, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.fc1 = nn.Linear(32, 24, bias=False)
        self.bn_fc = nn.BatchNorm1d(24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = self.project(self.depthwise(self.expand(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(F.relu(self.bn_fc(self.fc1(x))))


class TokenNormKeywordCall(nn.Module):
    """A BatchNorm1d over the tokens of (N, L, C) while the channels C are pruned (its statistics span the pruned
    dimension), and a BatchNorm called with its input as a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 12, 1, bias=False)
        self.bn = nn.BatchNorm1d(12)
        self.fc1 = nn.Linear(12, 16)
        self.token_norm = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 4, 5)
        tokens = F.relu(self.bn(input=self.conv(x))).transpose(1, 2)  # (N, 5, 12)
        return self.fc2(F.relu(self.token_norm(self.fc1(tokens))).mean(1))


def _norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.fixture
def setting(tmp_path: Path) -> tuple[nn.Module, torch.Tensor, Path]:
    """A model whose running statistics are exactly those of the calibration batch, and a prune config that
    removes channels from every prunable group."""
    torch.manual_seed(0)
    model = ResidualDepthwise()
    with torch.no_grad():  # weights with a spread, so the groups' channels differ
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.2, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    x = torch.randn(32, 3, 8, 8)
    recalibrate_in_order(model, x)
    (tmp_path / "search.cfg").write_text("compress_ratio: 2\nascend_optimized: false\n")
    acps_core.auto_channel_prune_search(model, tmp_path / "search.cfg", [x, torch.randint(0, 10, (32,))],
                                        tmp_path / "prune.cfg", sensitivity="GroupMagnitudeSensitivity",
                                        search_alg="GlobalRankSearch")
    return model, x, tmp_path


def test_corrected_statistics_equal_a_recalibration_on_the_same_batch(setting: tuple[nn.Module, torch.Tensor, Path]
                                                                      ) -> None:
    # The original statistics are the batch's own, so moving them by the pruning's change must give exactly the
    # pruned model's batch statistics, for every norm, each one downstream of corrected ones (the cascade).
    model, x, folder = setting
    corrected = acps_core.create_prune_retrain_model(model, x[:2], folder / "prune.cfg", folder / "a.record",
                                                     calibration_data=x, reconstruct=False)
    stale = acps_core.create_prune_retrain_model(model, x[:2], folder / "prune.cfg", folder / "b.record")
    assert corrected.conv1.out_channels < 24 and corrected.expand[0].out_channels < 48  # really pruned
    recalibrated = copy.deepcopy(stale)
    recalibrate_in_order(recalibrated, x)
    moved = 0
    for name, norm in _norms(corrected).items():
        expected = _norms(recalibrated)[name]
        torch.testing.assert_close(norm.running_mean, expected.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm.running_var, expected.running_var, rtol=1e-5, atol=1e-5)
        moved += not torch.allclose(norm.running_mean, _norms(stale)[name].running_mean)
    assert moved >= 3  # the pruning really changed several norms' inputs
    with torch.no_grad():
        torch.testing.assert_close(corrected(x), recalibrated(x), rtol=1e-5, atol=1e-5)
    assert (folder / "a.record").read_text() == (folder / "b.record").read_text()  # same channels removed


def test_norms_over_the_pruned_dimension_and_called_by_keyword_are_corrected_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TokenNormKeywordCall()
    with torch.no_grad():
        model.fc1.bias.copy_(torch.linspace(-3, 3, 16))  # channels with different means: pruning some moves the mean
    x = torch.randn(32, 4, 5)
    recalibrate_in_order(model, x)
    (tmp_path / "prune.cfg").write_text(
        "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 ascend_optimized: false "
        "} } }\n")
    corrected = acps_core.create_prune_retrain_model(model, x[:2], tmp_path / "prune.cfg", tmp_path / "a.record",
                                                     calibration_data=x, reconstruct=False)
    stale = acps_core.create_prune_retrain_model(model, x[:2], tmp_path / "prune.cfg", tmp_path / "b.record")
    assert corrected.fc1.out_features == 8 and corrected.conv.out_channels == 6
    recalibrated = copy.deepcopy(stale)
    recalibrate_in_order(recalibrated, x)
    for name in ("bn", "token_norm"):
        for stat in ("running_mean", "running_var"):
            expected = getattr(_norms(recalibrated)[name], stat)
            torch.testing.assert_close(getattr(_norms(corrected)[name], stat), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_norms(corrected)["token_norm"].running_mean, _norms(stale)["token_norm"].running_mean)


def test_correction_makes_the_pruned_model_closer_to_the_original(setting: tuple[nn.Module, torch.Tensor, Path]
                                                                  ) -> None:
    model, x, folder = setting
    fresh = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # not the calibration batch
    corrected = acps_core.create_prune_retrain_model(model, x[:2], folder / "prune.cfg", folder / "a.record",
                                                     calibration_data=x[:8])
    stale = acps_core.create_prune_retrain_model(model, x[:2], folder / "prune.cfg", folder / "b.record")
    with torch.no_grad():
        reference = model(fresh)
        error_corrected = (corrected(fresh) - reference).pow(2).mean()
        error_stale = (stale(fresh) - reference).pow(2).mean()
    assert error_corrected < 0.5 * error_stale


@pytest.mark.parametrize("as_tuple", [False, True])
def test_the_searchs_data_label_pair_is_taken_as_its_data(setting: tuple[nn.Module, torch.Tensor, Path],
                                                           as_tuple: bool) -> None:
    model, x, folder = setting
    labels = torch.randint(0, 10, (32,))
    input_data = (x[:2],) if as_tuple else x[:2]
    from_pair = acps_core.create_prune_retrain_model(model, input_data, folder / "prune.cfg", folder / "a.record",
                                                     calibration_data=[x, labels])
    from_data = acps_core.create_prune_retrain_model(model, x[:2], folder / "prune.cfg", folder / "b.record",
                                                     calibration_data=x)
    for (name, a), b in zip(from_pair.named_buffers(), from_data.buffers()):
        assert torch.equal(a, b), name


def test_a_data_loaders_first_batch_is_used(setting: tuple[nn.Module, torch.Tensor, Path]) -> None:
    model, x, folder = setting
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randint(0, 10, (32,))),
                                         batch_size=16)
    from_loader = acps_core.create_prune_retrain_model(model, x[:2], folder / "prune.cfg", folder / "a.record",
                                                       calibration_data=loader)
    from_batch = acps_core.create_prune_retrain_model(model, x[:2], folder / "prune.cfg", folder / "b.record",
                                                      calibration_data=x[:16])
    for (name, a), b in zip(from_loader.named_buffers(), from_batch.buffers()):
        assert torch.equal(a, b), name
    with pytest.raises(DataError, match="no batches"):
        acps_core.create_prune_retrain_model(model, x[:2], folder / "prune.cfg", folder / "c.record",
                                             calibration_data=iter([]))
    assert not (folder / "c.record").exists()


def test_the_users_model_and_its_statistics_are_untouched(setting: tuple[nn.Module, torch.Tensor, Path]) -> None:
    model, x, folder = setting
    snapshot = ModelSnapshot.take(model)
    acps_core.create_prune_retrain_model(model, x[:2], folder / "prune.cfg", folder / "a.record", calibration_data=x)
    snapshot.assert_same(model)


def test_nothing_pruned_leaves_the_statistics_exactly_as_they_were(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ResidualDepthwise().eval()
    x = torch.randn(8, 3, 8, 8)
    (tmp_path / "prune.cfg").write_text("prune_config { filter_pruner { balanced_l2_norm_filter_prune { "
                                        "prune_ratio: 0 ascend_optimized: false } } }\n")
    pruned = acps_core.create_prune_retrain_model(model, x[:2], tmp_path / "prune.cfg", tmp_path / "p.record",
                                                  calibration_data=x)
    for name, norm in _norms(pruned).items():
        assert torch.equal(norm.running_mean, _norms(model)[name].running_mean)
        assert torch.equal(norm.running_var, _norms(model)[name].running_var)


@pytest.mark.parametrize("data, words", [
    ("not a tensor", ["calibration_data", "tensor"]),
    (torch.randn(4, 5, 8, 8), ["calibration_data could not be run", "a batch like input_data"]),
    (torch.randn(0, 3, 8, 8), ["calibration_data holds no samples"]),
    (torch.full((4, 3, 8, 8), float("nan")), ["NaN", "BatchNorm layer 'stem.1'"]),
])
def test_bad_calibration_data_is_refused_and_writes_nothing(setting: tuple[nn.Module, torch.Tensor, Path],
                                                            data: object, words: list[str]) -> None:
    model, x, folder = setting
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(DataError) as raised:
        acps_core.create_prune_retrain_model(model, x[:2], folder / "prune.cfg", folder / "p.record",
                                             calibration_data=data)
    for word in words:
        assert word in str(raised.value)
    assert not (folder / "p.record").exists()
    snapshot.assert_same(model)
