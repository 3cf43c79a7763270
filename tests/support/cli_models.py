"""Model factories that the command-line tests name as ``tests.support.cli_models:FACTORY``."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv stages, a global pool and a linear head, plus a layer the forward pass never calls."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, classes)
        self.unused = nn.Linear(32, 32)  # kept for checkpoint compatibility, never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_cnn() -> nn.Module:
    """The model ``acps explain --model tests.support.cli_models:small_cnn`` builds."""
    torch.manual_seed(0)
    return SmallCNN()


def needs_arguments(width: int) -> nn.Module:
    """A factory that cannot be called without arguments."""
    return nn.Linear(width, width)


def not_a_model() -> str:
    """A factory that returns something other than a module."""
    return "not a model"


def untrained_cnn() -> nn.Module:
    """A factory that builds the architecture with fresh random weights on every call (no seed): the trained
    weights come from ``--weights``."""
    return SmallCNN()


def stacked_mlp() -> nn.Module:
    """Three residual MLP blocks of one width over 16 features, then a 10-class head."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(3)]
    return _Residual(nn.ModuleList(blocks), nn.Linear(16, 10))


class _Residual(nn.Module):
    def __init__(self, blocks: nn.ModuleList, head: nn.Module) -> None:
        super().__init__()
        self.blocks, self.head = blocks, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        out: torch.Tensor = self.head(x)
        return out
