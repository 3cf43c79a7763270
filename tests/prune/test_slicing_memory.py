"""How slicing uses memory: a trial pruning shares the unpruned tensors where it can, a real one owns all of its
memory, and neither ever writes into the user's tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from acps_core.graph.build import build_channel_graph
from acps_core.graph.model import ChannelGraph
from acps_core.layers import base
from acps_core.layers.base import select
from acps_core.prune.copying import copy_sharing_tensors
from acps_core.prune.slicing import prune_channels
from tests.layers.test_mean_norm import RMSNorm


class Net(nn.Module):
    """Convs with a BatchNorm, then an MLP with an RMS norm between its Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.Conv2d(32, 16, 3)
        self.fc1, self.norm, self.fc2 = nn.Linear(16, 48), RMSNorm(48), nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn(self.conv1(x)))).mean((2, 3))
        return self.fc2(self.norm(torch.relu(self.fc1(x))))


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, torch.Tensor, ChannelGraph]:
    monkeypatch.setattr(base, "VIEW_MIN_ENTRIES", 0)  # views for these small tensors too
    torch.manual_seed(0)
    model = Net().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 12, 12)
    return model, x, build_channel_graph(model, x)


def _tails(graph: ChannelGraph) -> dict[int, list[int]]:
    """Every prunable group keeps its first channels and loses its last 4."""
    return {g.id: list(range(g.channels - 4)) for g in graph.prunable_groups}


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def test_select_gives_what_index_select_gives_and_a_view_for_one_run_of_a_large_tensor() -> None:
    assert select(torch.randn(6, 40), 1, torch.arange(3, 20)).untyped_storage().nbytes() == 6 * 17 * 4
    tensor = torch.randn(base.VIEW_MIN_ENTRIES // 40 + 1, 40)
    for dim, index in [(1, torch.arange(3, 20)), (0, torch.tensor([0, 2, 5])), (1, torch.tensor([1, 4, 9])),
                       (1, torch.cat([torch.arange(0, 16), torch.arange(24, 40)])), (-1, torch.arange(8))]:
        got = select(tensor, dim, index)
        assert torch.equal(got, tensor.index_select(dim, index))
        shares = got.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        assert shares == (index.diff() == 1).all().item()


def test_a_trial_shares_the_unpruned_tensors_and_writes_nothing_into_them(net) -> None:
    model, x, graph = net
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trial = copy_sharing_tensors(model)
    prune_channels(trial, graph, _tails(graph), share=True)
    cut = [p for name, p in trial.named_parameters()
           if p.shape != model.get_parameter(name).shape and name != "norm.weight"]  # the norm's is computed
    assert len(cut) >= 6 and all(p.untyped_storage().data_ptr() in _storages(model) for p in cut)
    owned = copy_sharing_tensors(model)
    prune_channels(owned, graph, _tails(graph))
    with torch.no_grad():
        torch.testing.assert_close(trial(x), owned(x), rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the norm's fold included
    assert not torch.equal(trial.norm.weight, model.norm.weight[:44])  # ... which did change the trial's weight


def test_a_pruned_model_owns_all_of_its_memory(net) -> None:
    model, x, graph = net
    pruned = copy_sharing_tensors(model)
    prune_channels(pruned, graph, _tails(graph))
    for name, tensor in (*pruned.named_parameters(), *pruned.named_buffers()):
        if tensor.shape != (model.get_parameter(name) if "running" not in name and "batches" not in name
                            else model.get_buffer(name)).shape:
            assert tensor.is_contiguous(), name
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
            assert tensor.untyped_storage().data_ptr() not in _storages(model), name
    assert isinstance(pruned.fc1.weight, nn.Parameter) and pruned.fc1.weight.requires_grad
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
