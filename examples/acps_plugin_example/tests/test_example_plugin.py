"""The example plugin, installed as its own distribution: found by name, used by the public call."""

from __future__ import annotations

import pytest
import torch
from acps_example import ActivationSensitivity, ParameterCount
from torch import nn

import acps_core as acps
from acps_core.plugin import get_registry


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_both_methods_are_registered_by_name_from_the_distribution() -> None:
    registry = get_registry(refresh=True)
    for kind, name, cls in (("sensitivity", "ActivationSensitivity", ActivationSensitivity),
                            ("gain", "ParameterCount", ParameterCount)):
        info = registry.get(kind, name)
        assert info.cls is cls and info.distribution == "acps-plugin-example"


def test_the_search_halves_the_parameters_and_drops_the_quiet_channels(tmp_path) -> None:
    net = model()
    with torch.no_grad():
        net[0].weight[:4] = 0.0  # channels 0-3 of the first conv output nothing but their bias
        net[0].bias[:4] = 0.0
    (tmp_path / "search.cfg").write_text("compress_ratio: 2\nascend_optimized: false\n")
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    result = acps.auto_channel_prune_search(net, str(tmp_path / "search.cfg"), [x, y], str(tmp_path / "prune.cfg"),
                                            sensitivity="ActivationSensitivity", gain="ParameterCount")
    assert result.cost_unit == "parameters"
    pruned = acps.create_prune_retrain_model(net, x[:2], tmp_path / "prune.cfg", tmp_path / "prune.record")
    weights = sum(p.numel() for n, p in pruned.named_parameters() if not n.startswith("6."))
    assert weights <= sum(p.numel() for n, p in net.named_parameters() if not n.startswith("6.")) / 2 + 200
    kept = result.kept_channels.get("0")
    assert kept is not None and not set(kept) & {0, 1, 2, 3}


def test_parameter_count_follows_the_channel_counts() -> None:
    geometry = acps.build_channel_graph(model(), torch.randn(2, 3, 8, 8)).layers["2"].geometry
    assert ParameterCount().layer_cost(geometry, 16, 32) == 32 * 16 * 9 + 32
    assert ParameterCount().layer_cost(geometry, 8, 32) == 32 * 8 * 9 + 32


def test_activation_sensitivity_takes_its_option_by_name_and_the_result_records_it(tmp_path) -> None:
    from acps_core.methods.options import describe_method
    from acps_core.methods.registry import resolve_method

    method = resolve_method("sensitivity", "ActivationSensitivity(normalize=none)", "sensitivity")

    assert isinstance(method, ActivationSensitivity) and method.options.normalize == "none"
    assert describe_method(method).spec == "ActivationSensitivity(normalize='none')"
    assert describe_method(ParameterCount()).options is None  # a plain class: options not known
    with pytest.raises(acps.ArgumentError, match="normalize must be 'none' or 'mean', got 'median'"):
        ActivationSensitivity(normalize="median")  # type: ignore[arg-type]
