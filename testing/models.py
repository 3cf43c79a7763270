"""Small models the tests build (no downloads)."""

from __future__ import annotations

import torch
from torch import nn


class ConvChain(nn.Module):
    """conv/BN/ReLU stages, a max pool, and a flatten-to-linear head: the foundation's plain chain."""

    def __init__(self, in_channels: int = 3, width: int = 32, size: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * (size // 2) ** 2, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so masking errors show in outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model


def pooled_chain(width: int = 32, classes: int = 10) -> nn.Sequential:
    """The chain written as nn.Sequential with a global pool and nn.Flatten before the head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def assert_pruned_matches_search(model: nn.Module, pruned: nn.Module, x: torch.Tensor, result: object) -> None:
    """The physically pruned model has the kept counts the search reported and computes what the unpruned
    model computes with the removed channels masked."""
    from acps_core.graph.build import build_channel_graph
    from acps_core.graph.masking import masked_channels

    for name, layer in result.layers.items():  # type: ignore[attr-defined]
        if layer.total:
            module = pruned.get_submodule(name)
            assert getattr(module, "out_features", getattr(module, "out_channels", None)) == layer.kept, name
    graph = build_channel_graph(model, x)
    ids = {g.name: g.id for g in graph.groups}
    keep = {ids[n]: k for n, k in result.kept_channels.items()}  # type: ignore[attr-defined]
    with masked_channels(model, graph, keep), torch.no_grad():
        expected = model(x)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5)


def recalibrate_in_order(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Set every BatchNorm's running statistics, in forward order, to the mean and unbiased variance of its input
    on ``x`` in eval mode, so each norm sees the ones before it already set (one forward pass per norm; ``model``
    is changed). A norm not called exactly once is skipped. Returns the statistics set, by norm name."""
    model.eval()
    done: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, norm in model.named_modules():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            continue
        seen: list[torch.Tensor] = []
        handle = norm.register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.append((args[0] if args else kwargs["input"]).detach()),
            with_kwargs=True)
        with torch.no_grad():
            model(x)
        handle.remove()
        if len(seen) != 1:
            continue
        values = seen[0].double().movedim(1, 0).reshape(seen[0].shape[1], -1)
        with torch.no_grad():
            norm.running_mean.copy_(values.mean(dim=1))
            norm.running_var.copy_(values.var(dim=1))
        done[name] = (norm.running_mean.clone(), norm.running_var.clone())
    return done
