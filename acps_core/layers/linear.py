"""``nn.Linear``: channels along the last dim of its input and output; weight ``(out, in)``."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from acps_core.graph.model import LayerGeometry
from acps_core.layers.base import STATISTICS, LayerAdapter, plain_subclass, take
from acps_core.layers.conv import MAX_REFIT_CHANNELS


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` (and subclasses that keep its forward and parameters)."""

    def traced_whole(self, module: nn.Module) -> bool:
        return plain_subclass(module, (nn.Linear,), {"weight", "bias"}, STATISTICS)

    def kind(self, module: nn.Module) -> str:
        return "Linear"

    def geometry(self, name: str, module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                 dtype: torch.dtype) -> LayerGeometry:
        linear = cast(Any, module)
        return LayerGeometry(name, "Linear", linear.in_features, linear.out_features, 1, (1,), (1,), input_shape,
                             output_shape, dtype, linear.weight.dtype)

    def input_dim(self, module: nn.Module, ndim: int) -> int:
        return ndim - 1

    def out_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).out_features)

    def in_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).in_features)

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        linear = cast(Any, module)
        linear.weight = take(linear.weight, 0, index)
        linear.bias = take(linear.bias, 0, index)
        linear.out_features = len(index)

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        linear = cast(Any, module)
        linear.weight = take(linear.weight, 1, index)
        linear.in_features = len(index)

    def refittable(self, module: nn.Module) -> bool:
        return bool(cast(Any, module).in_features <= MAX_REFIT_CHANNELS)

    def fold_input_map(self, module: nn.Module, weight: torch.Tensor, input_map: torch.Tensor) -> torch.Tensor:
        return weight.double() @ input_map
