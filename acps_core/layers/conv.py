"""Convolutions: ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``.

A convolution reads its input channels along dim 1 and produces its output channels there. Its weight is
``(out, in / groups, *kernel)`` (a transposed one: ``(in, out / groups, *kernel)``). A grouped convolution keeps,
in every group, the kept positions of that group; a depthwise one (one group per channel) follows its input.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from acps_core.graph.model import LayerGeometry
from acps_core.layers.base import STATISTICS, LayerAdapter, plain_subclass, take

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: The re-fit solves one least-squares system per layer over this many input channels at most.
MAX_REFIT_CHANNELS = 4096


def _torch_kind(module: nn.Module, types: tuple[type[nn.Module], ...]) -> str:
    """The torch class a layer is (``Conv2d`` for a subclass of it): what cost models see."""
    return next((cls.__name__ for cls in type(module).__mro__ if cls in types), type(module).__name__)


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d/2d/3d`` (and subclasses that keep their forward and parameters)."""

    types = CONV_TYPES

    def traced_whole(self, module: nn.Module) -> bool:
        return plain_subclass(module, self.types, {"weight", "bias"}, STATISTICS)

    def kind(self, module: nn.Module) -> str:
        return _torch_kind(module, self.types)

    def geometry(self, name: str, module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                 dtype: torch.dtype) -> LayerGeometry:
        conv = cast(Any, module)
        return LayerGeometry(name, self.kind(module), conv.in_channels, conv.out_channels, conv.groups,
                             tuple(conv.kernel_size), tuple(conv.stride), input_shape, output_shape, dtype,
                             conv.weight.dtype)

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return [("weight", 1, cast(Any, module).groups)]

    def out_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).out_channels)

    def in_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).in_channels)

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        conv = cast(Any, module)
        conv.weight = take(conv.weight, 0, index)
        conv.bias = take(conv.bias, 0, index)
        if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
            conv.in_channels = conv.groups = len(index)  # depthwise: its inputs go with its outputs
        conv.out_channels = len(index)

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        """A grouped conv keeps, in every group, the kept positions of that group (the graph made every group
        keep the same count)."""
        conv = cast(Any, module)
        if conv.groups > 1:
            per_group = conv.in_channels // conv.groups
            rows = conv.weight.shape[0] // conv.groups
            parts = []
            for g in range(conv.groups):
                columns = torch.tensor([int(p) - g * per_group for p in index
                                        if g * per_group <= p < (g + 1) * per_group],
                                       dtype=torch.long, device=conv.weight.device)
                parts.append(conv.weight.detach()[g * rows:(g + 1) * rows].index_select(1, columns))
            conv.weight = nn.Parameter(torch.cat(parts).clone(), requires_grad=conv.weight.requires_grad)
        else:
            conv.weight = take(conv.weight, 1, index)
        conv.in_channels = len(index)

    def refittable(self, module: nn.Module) -> bool:
        """A conv of one group mixes its input channels linearly at each position."""
        conv = cast(Any, module)
        return bool(conv.groups == 1 and conv.in_channels <= MAX_REFIT_CHANNELS)

    def fold_input_map(self, module: nn.Module, weight: torch.Tensor, input_map: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc...,ck->ok...", weight.double(), input_map)


class ConvTransposeAdapter(ConvAdapter):
    """``nn.ConvTranspose1d/2d/3d``: the weight is ``(in, out / groups, *kernel)``. A grouped transposed
    convolution is not pruned (the graph blocks it)."""

    types = TRANSPOSED_CONV_TYPES

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int | tuple[int, ...]]]:
        return [("weight", 1, 0), ("bias", 0, 0)]

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return [("weight", 0, 1)]

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        conv = cast(Any, module)
        conv.weight = take(conv.weight, 1, index)
        conv.bias = take(conv.bias, 0, index)
        conv.out_channels = len(index)

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        conv = cast(Any, module)
        conv.weight = take(conv.weight, 0, index)
        conv.in_channels = len(index)

    def refittable(self, module: nn.Module) -> bool:
        return False
