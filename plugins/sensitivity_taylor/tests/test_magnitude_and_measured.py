"""GroupMagnitudeSensitivity (every weight tied to a channel) and MeasuredSensitivity (measured cuts)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from acps_core.errors import ArgumentError
from acps_core.graph.build import build_channel_graph
from acps_core.search.problem import SearchRecord, allowed_kept_counts
from acps_sensitivity_taylor import GroupMagnitudeSensitivity, MeasuredSensitivity
from acps_sensitivity_taylor.measured import _batch_statistics, _non_decreasing


def model_with_bn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    with torch.no_grad():
        for norm in (model[1], model[4]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
            norm.running_mean.normal_(0, 0.1)
            norm.running_var.uniform_(0.5, 1.5)
    return model.eval()


def scored(method, model, data, label) -> list[SearchRecord]:
    graph = build_channel_graph(model, data)
    method.setup_initialization((model, graph), [data, label], 1)
    records = [SearchRecord.for_group(g, allowed_kept_counts(g.channels, False, 1.0)) for g in graph.prunable_groups]
    method.get_sensitivity(records)
    return records


def test_group_magnitude_is_the_mean_over_every_tied_weight_divided_by_the_group_median() -> None:
    model = model_with_bn()
    with torch.no_grad():
        model[1].weight[3] = 0.0  # a channel the BatchNorm silences
        model[1].bias[3] = 0.0
    data = torch.randn(4, 3, 8, 8)
    first = scored(GroupMagnitudeSensitivity(), model, data, torch.randint(0, 5, (4,)))[0]
    conv, norm, reader = model[0], model[1], model[3]
    parts = [conv.weight.flatten(1).pow(2).sum(1), conv.bias.pow(2), norm.weight.pow(2), norm.bias.pow(2),
             reader.weight.transpose(0, 1).flatten(1).pow(2).sum(1)]
    expected = torch.stack([p.detach().double() for p in parts]).mean(0)
    torch.testing.assert_close(first.sensitivity, expected / expected.median())
    assert float(first.sensitivity.median()) == pytest.approx(1.0)
    by_mean = scored(GroupMagnitudeSensitivity(normalize="mean"), model, data, torch.randint(0, 5, (4,)))[0]
    torch.testing.assert_close(by_mean.sensitivity, expected / expected.mean())
    unscaled = scored(GroupMagnitudeSensitivity(normalize="none"), model, data, torch.randint(0, 5, (4,)))[0]
    torch.testing.assert_close(unscaled.sensitivity, expected)
    with pytest.raises(ArgumentError, match="normalize must be"):
        GroupMagnitudeSensitivity(normalize="max")
    assert int(first.sensitivity.argmin()) == 3 or float(first.sensitivity[3]) < float(first.sensitivity.mean())


def test_pool_adjacent_violators_gives_the_closest_non_decreasing_sequence() -> None:
    assert _non_decreasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert _non_decreasing([5.0, 1.0, 0.0]) == [2.0, 2.0, 2.0]
    values = [0.3, 0.1, 0.7, 0.2, 0.2, 0.9]
    result = _non_decreasing(values)
    assert all(a <= b for a, b in zip(result, result[1:])) and sum(result) == pytest.approx(sum(values))


def test_batch_statistics_leave_the_running_statistics_and_modes_as_they_were() -> None:
    model = model_with_bn()
    model[1].train()  # a mixed-mode model
    before = copy.deepcopy(model.state_dict())
    data = torch.randn(32, 3, 8, 8)
    with _batch_statistics(model, True), torch.no_grad():
        assert all(m.training for m in (model[1], model[4]))
        out = model(data)
    assert model[1].training and not model[4].training and model[4].momentum == 0.1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(data), out)  # running statistics differ from the batch's


def test_measured_scores_follow_the_filter_norm_and_add_up_to_the_measured_change() -> None:
    from acps_core.graph.masking import masked_channels

    model = model_with_bn()
    with torch.no_grad():
        model[3].weight[:, 2] = 0.0  # channel 2 of the first group is never read: removing it changes nothing
        model[0].weight[5] *= 0.01   # channel 5 has the weakest filter: it goes first
    data, label = torch.randn(64, 3, 8, 8), torch.randint(0, 5, (64,))
    method = MeasuredSensitivity(levels=7, max_samples=64)
    first = scored(method, model, data, label)[0]
    scores = first.sensitivity
    order = first.removal_order()
    assert order[0] == 5
    assert all(a <= b for a, b in zip(scores[order].tolist(), scores[order][1:].tolist()))
    # Every depth is measured (7 levels, 7 removable atoms): the first n removed add up to the measured change
    # (exactly, unless the curve had to be made convex there).
    graph = method.graph
    with torch.no_grad():
        reference = model(data)
        distance = method._distance_to(reference, label)
        with _batch_statistics(model, True):
            baseline = distance(model(data))
            removed = order[:3]
            keep = {first.group_id: [c for c in range(8) if c not in removed]}
            with masked_channels(model, graph, keep):
                change = distance(model(data)) - baseline
    assert float(scores[removed].sum()) == pytest.approx(max(change, 0.0), rel=0.05, abs=1e-6)


def test_measured_and_group_magnitude_with_the_global_rank_search_by_name(tmp_path) -> None:
    import acps_core as acps

    model = model_with_bn()
    data, label = torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,))
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    for sensitivity in ("MeasuredSensitivity", "GroupMagnitudeSensitivity"):
        before = copy.deepcopy(model.state_dict())
        result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [data, label],
                                                str(tmp_path / f"{sensitivity}.cfg"), sensitivity=sensitivity,
                                                search_alg="GlobalRankSearch")
        assert result.cost_after <= result.cost_before / 1.5
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
