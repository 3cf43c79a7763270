"""A third-party distribution registers a sensitivity method that the public call then selects by name."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import acps_core
from acps_core.methods.registry import get_registry
from tests.support.plugin_factory import PluginInstaller

THIRD_PARTY_MODULE = "acps_test_thirdparty_l1"

# Written as a plugin author would: only the public names of acps_core.
THIRD_PARTY_SOURCE = '''
    from acps_core import SensitivityBase, hookimpl

    #: How many times get_sensitivity ran, so the test can tell the method was really used.
    CALLS = 0


    class ThirdPartyL1(SensitivityBase):
        """Scores each output channel by the L1 norm of its filter in the group's first producer."""

        def get_sensitivity(self, search_records):
            global CALLS
            CALLS += 1
            for record in search_records:
                weight = self.model.get_submodule(record.producers[0]).weight
                record.sensitivity = weight.detach().abs().flatten(1).sum(dim=1)


    @hookimpl
    def acps_register_sensitivities(register):
        register("ThirdPartyL1", ThirdPartyL1)
'''


@pytest.fixture
def installer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginInstaller]:
    """Installs throwaway plugin distributions for the test; the registry cache starts empty."""
    with PluginInstaller(tmp_path, monkeypatch) as plugin_installer:
        yield plugin_installer


def conv_chain() -> nn.Module:
    """Conv-BN-ReLU twice, then pool and a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.mark.slow
def test_a_third_party_sensitivity_is_selected_by_name_in_the_public_call(installer: PluginInstaller,
                                                                          tmp_path: Path) -> None:
    installer.install("acps-test-thirdparty", THIRD_PARTY_MODULE, THIRD_PARTY_SOURCE)
    # The built-in search and gain plugins must be installed too (the README's test command installs them).
    get_registry().get("search", "GreedySearch")
    get_registry().get("gain", "BitComplexity")
    torch.manual_seed(0)
    config_path = tmp_path / "search.cfg"
    config_path.write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    output_cfg = tmp_path / "prune.cfg"
    data, labels = torch.randn(8, 3, 16, 16), torch.randn(8, 10)

    result = acps_core.auto_channel_prune_search(conv_chain(), str(config_path), [data, labels],
                                                 str(output_cfg), sensitivity="ThirdPartyL1",
                                                 search_alg="GreedySearch")

    assert output_cfg.is_file()
    assert result.methods["sensitivity"] == "ThirdPartyL1"
    assert sys.modules[THIRD_PARTY_MODULE].CALLS == 1
