"""preserved_model_state without parameter copies: parameters checked by checksum, everything else restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from acps_core._util.state import _take, preserved_model_state
from acps_core.errors import AcpsError
from tests.support.model_snapshot import ModelSnapshot


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def test_without_copies_the_parameters_are_not_copied_but_buffers_and_modes_come_back() -> None:
    net = model()
    net(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    net.eval()
    snapshot = ModelSnapshot.take(net)
    taken = _take(net, copy_parameters=False)
    assert {id(t) for t, _ in taken.values} == {id(b) for b in net.buffers()}
    with preserved_model_state(net, copy_parameters=False):
        net.train()
        net(torch.randn(4, 3, 6, 6))  # updates the BatchNorm statistics
        net[0].weight.requires_grad_(False)
        with torch.no_grad():
            net[4].weight.mul_(0.0)  # written and undone: fine
            net[4].weight.copy_(snapshot.tensors["4.weight"])
    snapshot.assert_same(net)


def test_without_copies_a_parameter_changed_for_good_is_an_error_naming_it() -> None:
    net = model()
    net(torch.randn(2, 3, 6, 6))
    with pytest.raises(AcpsError, match=r"parameter\(s\) 0.weight were changed in place"):
        with preserved_model_state(net, copy_parameters=False), torch.no_grad():
            net[0].weight.data.add_(1.0)  # through .data: no version counter would see it
