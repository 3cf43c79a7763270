"""Norms whose statistic is a mean over the channels (a Global Response Norm, an RMS norm written by hand): the
channels through them are prunable, pruned == masked exactly once ``C / C'`` is folded into weight and eps, and a
norm the fold cannot make exact (one that subtracts the mean) is left alone with the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from acps_core.graph.build import build_channel_graph
from acps_core.graph.verify import verify_groups
from acps_core.layers import MeanNormAdapter, adapter_for, mean_norm
from testing.zoo import pruned_and_masked, random_keep


class ResponseNorm(nn.Module):
    """ConvNeXt-V2's Global Response Norm over channels-last maps."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.eps, self.channel_dim = 1e-6, -1
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = x.norm(p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return x + self.bias + self.weight * (x * nx)


class RMSNorm(nn.Module):
    """A Llama-style RMS norm over the last dim, with its epsilon as ``variance_epsilon``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.variance_epsilon = 1e-5
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMS norm: it scales by ``1 + weight``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return (1 + self.weight) * (x * torch.rsqrt(variance + self.variance_epsilon))


class CenteredNorm(RMSNorm):
    """A layer norm written by hand: it subtracts the mean, which no constant can fold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(-1, keepdim=True)
        return super().forward(x)


class Mlp(nn.Module):
    """ConvNeXt-V2's MLP on channels-last maps: fc1 -> GELU -> norm -> fc2."""

    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 24), norm(24), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = self.fc2(self.norm(torch.nn.functional.gelu(self.fc1(x))))
        return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("norm", [ResponseNorm, RMSNorm, OffsetRMSNorm])
def test_a_mean_over_the_channels_is_pruned_exactly(norm: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = Mlp(norm).eval()
    x = torch.randn(2, 8, 5, 5)
    assert isinstance(adapter_for(model.norm), MeanNormAdapter)
    graph = build_channel_graph(model, x)
    hidden = next(g for g in graph.groups if g.producers == ["fc1"])
    assert hidden.prunable and any(u.layer == "norm" for u in hidden.followers)
    assert verify_groups(model, graph, x) == []
    keep = random_keep(graph, seed=0)
    keep[hidden.id] = list(range(0, 24, 3))  # 8 of 24 channels: the fold's factor is 3
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    power, offset = (1.0, 0) if norm is ResponseNorm else (0.5, 1 if norm is OffsetRMSNorm else 0)
    torch.testing.assert_close(pruned.norm.weight.detach() + offset,
                               (model.norm.weight.detach()[::3] + offset) * 3 ** power)
    eps = "eps" if norm is ResponseNorm else "variance_epsilon"
    assert getattr(pruned.norm, eps) == pytest.approx(getattr(model.norm, eps) * 3)
    assert getattr(model.norm, eps) in (1e-6, 1e-5)  # the user's model is untouched


def test_a_norm_that_subtracts_the_mean_is_left_alone_with_the_reason() -> None:
    torch.manual_seed(0)
    model = Mlp(CenteredNorm).eval()
    x = torch.randn(2, 8, 5, 5)
    assert mean_norm(model.norm)  # it has the parts ...
    graph = build_channel_graph(model, x)
    hidden = next(g for g in graph.groups if g.producers == ["fc1"])
    assert not hidden.prunable  # ... but its first call does not confirm them
    assert any("norm (CenteredNorm)" in reason and "traced function by function" in reason
               for reason in hidden.reasons)


def test_modules_without_the_parts_are_not_taken_for_mean_norms() -> None:
    class Scale(nn.Module):  # no eps
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    class WithBuffer(RMSNorm):
        def __init__(self) -> None:
            super().__init__(4)
            self.register_buffer("running", torch.zeros(4))

    assert not mean_norm(Scale()) and not mean_norm(WithBuffer()) and mean_norm(RMSNorm(4))
    assert not mean_norm(nn.Sequential(RMSNorm(4)))
