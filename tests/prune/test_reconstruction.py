"""create_prune_retrain_model(..., calibration_data=...): the layers that read removed channels are re-fitted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acps_core
from acps_core.prune import reconstruction
from acps_core.prune.calls import read_record
from acps_core.prune.reconstruction import PRIOR_STRENGTH, chosen_strength, fit_input_map, measure_layer_inputs
from tests.support.model_snapshot import ModelSnapshot


class Redundant(nn.Module):
    """Conv -> ReLU -> 3x3 conv -> ReLU -> pooled Linear, where the first conv's channels 4..7 are positive
    multiples of its channels 0..3 (ReLU keeps the ratio), so the channels pruned from it can be rebuilt exactly
    from the kept ones."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.conv1.weight[4:] = self.conv1.weight[:4] * torch.tensor([2.0, 0.5, 3.0, 1.5]).view(4, 1, 1, 1)
            self.conv1.weight[:4] *= 0.1  # small: the norm rule removes channels 0..3 and keeps their multiples
            self.conv2.weight[:, :4] *= 20  # ... which the next layer reads strongly

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def _prune_half(folder: Path, layer: str = "conv1") -> Path:
    """A channel-prune config that removes half of ``layer``'s outputs (smallest filter L2 norm first)."""
    config = folder / "prune.cfg"
    config.write_text(
        f'override_layer_configs {{ layer_name: "{layer}" prune_config {{ filter_pruner {{ '
        "balanced_l2_norm_filter_prune { prune_ratio: 0.5 ascend_optimized: false } } } }\n")
    return config


def test_channels_that_are_combinations_of_kept_ones_are_rebuilt_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Redundant().eval()
    x = torch.randn(64, 3, 8, 8)
    config = _prune_half(tmp_path)
    refitted = acps_core.create_prune_retrain_model(model, x[:2], config, tmp_path / "a.record", calibration_data=x)
    plain = acps_core.create_prune_retrain_model(model, x[:2], config, tmp_path / "b.record",
                                                 calibration_data=x, reconstruct=False)
    assert refitted.conv2.in_channels == 4
    fresh = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # unseen inputs
    with torch.no_grad():
        reference = model.features(fresh)
        error_refitted = (refitted.features(fresh) - reference).abs().max()
        error_plain = (plain.features(fresh) - reference).abs().max()
    assert error_plain > 0.3 * reference.abs().max()
    # Only the regularisation towards plain pruning (8 x 4 channels / 4096 positions) stands between the fit
    # and an exact rebuild.
    assert error_refitted < 0.02 * error_plain
    assert torch.equal(refitted.conv1.weight, plain.conv1.weight)  # what reads no removed channel stays as is
    assert torch.equal(refitted.fc.weight, plain.fc.weight)


@pytest.mark.parametrize(("samples", "chosen"), [(2, False), (16, True)])
def test_the_strength_is_cross_validated_on_enough_samples_when_positions_are_few(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, samples: int, chosen: bool) -> None:
    torch.manual_seed(0)
    model = Redundant().eval()
    x = torch.randn(samples, 3, 2, 2)  # 4 positions a sample: few for 4 kept channels
    calls: list[int] = []

    def spied(*args: object) -> float:
        calls.append(1)
        return PRIOR_STRENGTH

    monkeypatch.setattr(reconstruction, "chosen_strength", spied)
    refitted = acps_core.create_prune_retrain_model(model, x[:1], _prune_half(tmp_path), tmp_path / "a.record",
                                                    calibration_data=x)
    assert bool(calls) == chosen and refitted.conv2.in_channels == 4


def test_without_reconstruct_the_weights_are_the_sliced_ones(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Redundant().eval()
    x = torch.randn(16, 3, 8, 8)
    config = _prune_half(tmp_path)
    plain = acps_core.create_prune_retrain_model(model, x[:2], config, tmp_path / "a.record",
                                                 calibration_data=x, reconstruct=False)
    removed = sorted(read_record(tmp_path / "a.record")["conv1"])
    kept = torch.tensor([c for c in range(8) if c not in removed])
    assert torch.equal(plain.conv2.weight, model.conv2.weight[:, kept])


def test_the_input_map_solves_the_regularised_least_squares() -> None:
    generator = torch.Generator().manual_seed(0)
    pruned = torch.randn(5000, 3, generator=generator, dtype=torch.float64)
    mixing = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.5, -2, 1], [0, 0, 1]], dtype=torch.float64)
    unpruned = pruned @ mixing.T  # channel 2 of 4 was a combination of the others, and is removed
    found = fit_input_map(pruned.float(), unpruned.float(), {2})
    torch.testing.assert_close(found, mixing, rtol=0, atol=0.02)
    # Few positions: the regularisation holds the map near plain pruning (the selection of the kept channels).
    few = fit_input_map(pruned[:4].float(), unpruned[:4].float(), {2})
    selection = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.float64)
    assert (few - selection).norm() < (mixing - selection).norm() / 2


def test_the_strength_is_chosen_on_positions_the_fit_did_not_see() -> None:
    generator = torch.Generator().manual_seed(0)
    kept = torch.randn(200, 40, generator=generator)
    # The removed channel is a combination of the kept ones: a weak prior predicts it on the other half.
    mixed = torch.cat([kept, kept[:, :5].sum(1, keepdim=True)], 1)
    strength = chosen_strength(kept, mixed, {40})
    assert strength is not None and strength <= PRIOR_STRENGTH
    # The removed channel is noise of its own, and the kept channels drifted by noise too: nothing predicts the
    # removed one, and fitting the drift on 100 rows for 40 channels only adds error. Plain pruning wins.
    drift, removed = torch.randn(200, 40, generator=generator), torch.randn(200, 1, generator=generator)
    noisy = torch.cat([kept + 0.3 * drift, removed], 1)
    assert chosen_strength(kept, noisy, {40}) is None


def test_layers_that_cannot_be_refitted_are_not_measured() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied: re-fitting one would change the other
            self.depthwise = nn.Conv1d(4, 4, 1, groups=4)
            self.twice = nn.Linear(4, 4)
            self.once = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.b(self.a(x))
            x = self.depthwise(x.unsqueeze(-1)).squeeze(-1)
            return self.once(self.twice(self.twice(x)))

    measured = measure_layer_inputs(Shared().eval(), {"a", "b", "depthwise", "twice", "once"}, torch.randn(3, 4))
    assert set(measured) == {"once"}
    assert measured["once"].values.shape == (3, 4) and measured["once"].rows is None


def test_large_inputs_are_fitted_on_a_fixed_sample_of_positions() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 1)).eval()
    x = torch.randn(80, 2, 8, 8)  # 5120 positions, more than the 4096 sampled
    first = measure_layer_inputs(model, {"0"}, x)["0"]
    again = measure_layer_inputs(model, {"0"}, x)["0"]
    assert first.values.shape == (4096, 2)
    assert first.rows is not None and torch.equal(first.rows, again.rows)
    positions = x.movedim(1, -1).reshape(-1, 2)
    assert torch.equal(first.values, positions[first.rows])


def test_the_users_model_is_untouched_and_the_record_is_the_same(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Redundant().eval()
    x = torch.randn(16, 3, 8, 8)
    config = _prune_half(tmp_path)
    snapshot = ModelSnapshot.take(model)
    acps_core.create_prune_retrain_model(model, x[:2], config, tmp_path / "a.record", calibration_data=x)
    snapshot.assert_same(model)
    acps_core.create_prune_retrain_model(model, x[:2], config, tmp_path / "b.record")
    assert (tmp_path / "a.record").read_text() == (tmp_path / "b.record").read_text()


def test_nan_in_a_layer_input_is_refused_naming_the_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Redundant().eval()
    x = torch.randn(4, 3, 8, 8)
    x[1, 0, 2, 2] = float("inf")  # no BatchNorm to catch it: the first re-fitted layer sees it
    config = _prune_half(tmp_path)
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(acps_core.DataError, match="layer 'conv2' holds NaN or Inf"):
        acps_core.create_prune_retrain_model(model, x[:1], config, tmp_path / "a.record", calibration_data=x)
    assert not (tmp_path / "a.record").exists()
    snapshot.assert_same(model)


def test_a_layer_seen_at_fewer_positions_than_it_keeps_channels_is_left_as_pruned(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Redundant().eval()
    x = torch.randn(16, 3, 8, 8)
    config = _prune_half(tmp_path, "conv2")  # the classifier keeps 3 of its 6 inputs, one position per sample
    plain = acps_core.create_prune_retrain_model(model, x[:2], config, tmp_path / "a.record", calibration_data=x,
                                                 reconstruct=False)
    few = acps_core.create_prune_retrain_model(model, x[:2], config, tmp_path / "b.record", calibration_data=x[:2])
    enough = acps_core.create_prune_retrain_model(model, x[:2], config, tmp_path / "c.record", calibration_data=x)
    assert few.fc.in_features == 3
    assert torch.equal(few.fc.weight, plain.fc.weight)
    assert not torch.equal(enough.fc.weight, plain.fc.weight)


def test_nan_anywhere_in_a_layer_input_is_noticed_not_only_at_the_sampled_positions() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 1)).eval()
    x = torch.randn(80, 2, 8, 8)  # 5120 positions: only 4096 of them are sampled for the fit
    sampled = measure_layer_inputs(model, {"0"}, x)["0"].rows
    assert sampled is not None
    unsampled = next(i for i in range(5120) if i not in set(sampled.tolist()))
    sample, rest = divmod(unsampled, 64)
    x[sample, 1, rest // 8, rest % 8] = float("nan")
    measured = measure_layer_inputs(model, {"0"}, x)["0"]
    assert torch.isfinite(measured.values).all()  # the NaN is not among the positions kept for the fit ...
    assert not measured.finite  # ... but it was seen (create_prune_retrain_model then raises a DataError)


def test_nan_in_input_data_is_refused_as_bad_data(tmp_path: Path) -> None:
    model = Redundant().eval()
    x = torch.full((2, 3, 8, 8), float("nan"))
    with pytest.raises(acps_core.DataError, match="input_data holds NaN or Inf"):
        acps_core.create_prune_retrain_model(model, x, _prune_half(tmp_path), tmp_path / "a.record")
    assert not (tmp_path / "a.record").exists()


def test_reconstruct_must_be_a_bool(tmp_path: Path) -> None:
    model = Redundant().eval()
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(acps_core.ArgumentError, match="reconstruct must be True or False, got 'no'"):
        acps_core.create_prune_retrain_model(model, x, _prune_half(tmp_path), tmp_path / "a.record",
                                             calibration_data=x, reconstruct="no")
    assert not (tmp_path / "a.record").exists()
