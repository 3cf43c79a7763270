"""Layer types of a user's own, registered with ``acps_core.register_layer``: traced as one layer, searched, pruned
like a built-in one, and the pruned model computes what the masked model computes.

The two types are the worked examples of docs/writing-a-layer-adapter.md: a LoRA-wrapped Linear (an adapter that
extends the built-in Linear one) and a per-channel scale written from the bare ``LayerAdapter`` (a follower).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.errors import ArgumentError
from acps_core.graph.build import build_channel_graph
from acps_core.layers import LayerAdapter, LinearAdapter, take
from testing.models import assert_pruned_matches_search


class LoRALinear(nn.Linear):
    """A Linear with a low-rank update: y = x W^T + b + scale * (x A^T) B^T."""

    def __init__(self, in_features: int, out_features: int, rank: int = 4, scale: float = 0.5) -> None:
        super().__init__(in_features, out_features)
        self.lora_a = nn.Parameter(torch.randn(rank, in_features) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(out_features, rank) * 0.3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.scale * (x @ self.lora_a.T) @ self.lora_b.T


class LoRALinearAdapter(LinearAdapter):
    """A LoRALinear prunes like a Linear: the update's B rows go with the outputs, its A columns with the inputs."""

    def traced_whole(self, module: nn.Module) -> bool:
        return True

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return [*super().output_parameters(module), ("lora_b", 0, 0)]

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return [*super().input_parameters(module), ("lora_a", 1, 1)]

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        super().keep_outputs(module, index)
        module.lora_b = take(module.lora_b, 0, index)

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        super().keep_inputs(module, index)
        module.lora_a = take(module.lora_a, 1, index)

    def refittable(self, module: nn.Module) -> bool:
        return False


class ChannelScale(nn.Module):
    """Multiplies each channel (dim 1) by a learned factor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, *([1] * (x.dim() - 2)))


class ChannelScaleAdapter(LayerAdapter):
    """A follower written from the bare interface: one parameter per channel of its input, passed on."""

    role = "follower"

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return [("scale", 0, 0)]

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return []

    def out_size(self, module: nn.Module) -> int:
        return int(module.scale.shape[0])

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        module.scale = take(module.scale, 0, index)


class Net(nn.Module):
    """conv -> scale -> ReLU -> pool -> LoRA Linear -> ReLU -> LoRA Linear -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.scale = ChannelScale(32)
        self.fc1 = LoRALinear(32, 48)
        self.fc2 = LoRALinear(48, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.scale(self.conv(x))).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def registered() -> Iterator[None]:
    acps.register_layer(LoRALinear, LoRALinearAdapter())
    acps.register_layer(ChannelScale, ChannelScaleAdapter())
    try:
        yield
    finally:
        acps.unregister_layer(LoRALinear)
        acps.unregister_layer(ChannelScale)


def sample(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def search(tmp_path: Path, model: nn.Module) -> tuple[acps.SearchResult, Path]:
    config = tmp_path / "search.cfg"
    config.write_text("compress_ratio: 1.6\nascend_optimized: false\n")
    x = sample()
    labels = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    out = tmp_path / "prune.cfg"
    return acps.auto_channel_prune_search(model, str(config), [x, labels], str(out)), out


def test_without_adapters_the_custom_layers_are_left_alone() -> None:
    reasons = build_channel_graph(Net().eval(), sample(2)).explain()
    assert "LoRALinear with its own forward" in reasons["fc1"] and "LoRALinear with its own forward" in reasons["fc2"]
    # The conv's channels reach fc1, whose LoRA parameters acps cannot slice without the adapter.
    assert "lora_a, lora_b that acps does not know how to slice" in reasons["conv"]


def test_registered_types_are_traced_as_layers(registered: None) -> None:
    graph = build_channel_graph(Net().eval(), sample(2))
    # Configs name it by its class; the cost models see a Linear's geometry.
    assert graph.layers["fc1"].kind == "LoRALinear" and graph.layers["fc1"].geometry.kind == "Linear"
    groups = {group.name: group for group in graph.groups}
    assert groups["conv"].prunable and groups["fc1"].prunable and groups["fc2"].prunable
    assert "scale" in [use.layer for use in groups["conv"].followers]
    assert "fc1" in [use.layer for use in groups["conv"].consumers]
    # The sensitivity methods see the LoRA parameters among those of each channel.
    sliced = {(f"{s.module}.{s.param}", s.dim) for s in graph.param_slices(groups["fc1"])}
    assert {("fc1.lora_b", 0), ("fc2.lora_a", 1), ("fc1.weight", 0), ("fc2.weight", 1)} <= sliced


def test_registered_types_search_and_prune_like_built_in_layers(tmp_path: Path, registered: None) -> None:
    model = Net().eval()
    before = copy.deepcopy(model.state_dict())
    result, out = search(tmp_path, model)
    assert result.target_reached
    assert result.layers["fc1"].kept < 48 or result.layers["conv"].kept < 32
    pruned = acps.create_prune_retrain_model(model, sample(2), str(out), str(tmp_path / "prune.record"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} of the user's model changed"
    fc1, fc2, scale = pruned.fc1, pruned.fc2, pruned.scale
    assert fc1.lora_b.shape == (fc1.out_features, 4) and fc1.lora_a.shape == (4, fc1.in_features)
    assert fc2.lora_a.shape == (4, fc1.out_features)
    assert scale.scale.shape == (pruned.conv.out_channels,)
    assert_pruned_matches_search(model, pruned, sample(), result)

    # Fine-tuned, saved and restored onto a fresh model: the record is replayed through the adapters.
    with torch.no_grad():
        pruned.fc1.lora_b.add_(0.1)
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    restored = acps.restore_prune_retrain_model(Net().eval(), sample(2), str(tmp_path / "prune.record"), str(out),
                                                str(tmp_path / "tuned.pth"))
    with torch.no_grad():
        torch.testing.assert_close(restored(sample()), pruned(sample()))


def test_a_wrong_adapter_is_caught_by_the_check_by_execution(registered: None) -> None:
    class Forgetful(LoRALinearAdapter):
        """Forgets to cut the update's B rows: the pruned layer no longer runs."""

        def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
            LinearAdapter.keep_outputs(self, module, index)

    from acps_core.graph.verify import verify_groups

    acps.register_layer(LoRALinear, Forgetful())
    model = Net().eval()
    graph = build_channel_graph(model, sample(2))
    verify_groups(model, graph, sample(2))
    groups = {group.name: group for group in graph.groups}
    assert not groups["fc1"].prunable and groups["conv"].prunable
    assert "fc1" in graph.explain()


def test_register_layer_rejects_what_it_cannot_use() -> None:
    with pytest.raises(ArgumentError, match=r"torch\.nn\.Module class"):
        acps.register_layer(int, LinearAdapter())
    with pytest.raises(ArgumentError, match="LayerAdapter instance for LoRALinear"):
        acps.register_layer(LoRALinear, LinearAdapter)  # the class, not an instance

    class Odd(LayerAdapter):
        role = "mixer"

    with pytest.raises(ArgumentError, match="role is 'mixer'"):
        acps.register_layer(LoRALinear, Odd())


def test_bad_pattern_registrations_are_argument_errors() -> None:
    from acps_core.layers import register_pattern

    with pytest.raises(acps.ArgumentError, match="callable that takes a module"):
        register_pattern("qkv", LinearAdapter())  # type: ignore[arg-type]
    with pytest.raises(acps.ArgumentError, match="LayerAdapter instance"):
        register_pattern(lambda module: False, object())  # type: ignore[arg-type]
