"""Aiming by measurement: with a gain estimator that times whole models, the search times its choice and aims again
until the measured speed-up is the target; the choice written is the one measured."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.errors import PluginError
from acps_core.methods.bases import GainEstimatorBase
from acps_core.search import aiming
from acps_core.search.problem import Decision
from testing.models import ConvChain, randomize_norms


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ParameterTime(GainEstimatorBase):
    """Predicts by parameters; "measures" the parameter ratio to the power ``power``: pruning helps less than
    predicted (power < 1) or more (power > 1), as a model's real latency does."""

    unit = "parameters"

    def __init__(self, power: float | None) -> None:
        self.power = power
        self.timed: list[float] = []

    def layer_cost(self, layer: Any, in_channels: int, out_channels: int) -> float:
        return in_channels * out_channels * math.prod(layer.kernel_size) / layer.groups

    def measure_speedup(self, model: nn.Module, pruned: nn.Module, sample: Any) -> float | None:
        if self.power is None:
            return None
        self.timed.append((parameters(model) / parameters(pruned)) ** self.power)
        return self.timed[-1]


def search(tmp_path: Path, model: nn.Module, x: torch.Tensor, gain: GainEstimatorBase) -> acps.SearchResult:
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.6\nascend_optimized: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", acps.PruneTargetWarning)
        labels = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(0))
        return acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, labels],
                                              str(tmp_path / "prune.cfg"), gain=gain)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(ConvChain(width=32, size=8)).eval()


@pytest.mark.parametrize("power", [0.6, 1.5])
def test_the_search_aims_again_until_the_measured_speedup_is_the_target(tmp_path: Path, model: nn.Module,
                                                                        power: float) -> None:
    x = torch.randn(6, 3, 8, 8)
    gain = ParameterTime(power)
    result = search(tmp_path, model, x, gain)
    first = gain.timed[0]
    assert abs(first / 1.6 - 1) > 0.1  # the prediction alone misses: the first choice measures far off
    assert 1 < len(gain.timed) <= aiming.ROUNDS
    achieved = result.cost_before / result.cost_after
    assert achieved == pytest.approx(min(t for t in gain.timed if t >= 1.6 * (1 - aiming.TOLERANCE)))
    assert abs(achieved / 1.6 - 1) < abs(first / 1.6 - 1) / 2
    assert any("measured speed-up of the chosen channels" in note for note in result.notes)
    # The choice written is the one measured: the pruned model has its parameter ratio.
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert (parameters(model) / parameters(pruned)) ** power == pytest.approx(achieved)


def test_an_estimator_that_does_not_measure_leaves_the_search_as_it_was(tmp_path: Path, model: nn.Module) -> None:
    x = torch.randn(6, 3, 8, 8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = search(tmp_path / "a", model, x, ParameterTime(None))
    exact = ParameterTime(1.0)
    measured = search(tmp_path / "b", model, x, exact)
    assert len(exact.timed) == 1  # measured as predicted: one timing, no second search
    assert plain.kept_channels == measured.kept_channels
    assert not any("measured speed-up" in note for note in plain.notes)


def test_the_next_aim_stays_between_choices_timed_on_both_sides_of_the_target() -> None:
    def timed(predicted: float, measured: float) -> aiming.Aimed:
        return aiming.Aimed(Decision(), measured, predicted)

    # A first choice far past the target, a second one short of it: the third aims between them.
    far, short = timed(1.75, 4.2), timed(1.2, 1.6)
    aim = aiming._next_aim([far, short], 2.0)
    assert 1.2 < aim < 1.75
    # Measured as a power of the predicted: the line in log-log lands on the target exactly.
    assert aiming._next_aim([timed(1.2, 1.2 ** 2), timed(1.6, 1.6 ** 2)], 2.0) == pytest.approx(2 ** 0.5)
    # One timing far past the target: scaled down, but never to no pruning at all.
    assert aiming._next_aim([timed(1.3, 5.0)], 1.5) > 1.0


def test_the_choice_kept_is_the_least_pruned_that_reached_the_target_else_the_fastest() -> None:
    def timed(measured: float) -> aiming.Aimed:
        return aiming.Aimed(Decision(), measured, measured)

    assert aiming._kept([timed(1.9), timed(2.15), timed(2.6)], 2.0).measured == 2.15
    assert aiming._kept([timed(1.95), timed(2.32)], 2.0).measured == 1.95  # within the tolerance: reached
    assert aiming._kept([timed(1.9), timed(2.32)], 2.0).measured == 2.32  # a budget: at least the target
    assert aiming._kept([timed(1.5), timed(1.7)], 2.0).measured == 1.7  # none reaches it: the fastest


class Broken(ParameterTime):
    def __init__(self, answer: Any) -> None:
        super().__init__(1.0)
        self.answer = answer

    def measure_speedup(self, model: nn.Module, pruned: nn.Module, sample: Any) -> float | None:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer  # type: ignore[no-any-return]


@pytest.mark.parametrize("answer", [RuntimeError("no device"), float("nan"), -1.0, "fast"])
def test_a_broken_measurement_is_a_plugin_error_naming_the_estimator(tmp_path: Path, model: nn.Module,
                                                                      answer: Any) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PluginError, match=r"gain estimator Broken .*measure_speedup\(\)"):
        search(tmp_path, model, torch.randn(6, 3, 8, 8), Broken(answer))
    assert not (tmp_path / "prune.cfg").exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
