"""The layers attention projects with, sliced alike: an ``nn.Linear``, a 1x1 ``nn.Conv2d``, or a Linear stored
transposed (GPT-2's ``Conv1D``, :mod:`acps_core.layers.transposed_linear`). Each has output rows and input
columns somewhere in its weight and its widths in attributes of its own; these helpers hide which."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from acps_core.layers.base import take
from acps_core.layers.transposed_linear import transposed_linear


def is_projection(module: Any) -> bool:
    """A Linear, a Linear stored transposed, or a Conv2d with a 1x1 kernel, stride 1 and no groups: one matrix
    over the channels."""
    if isinstance(module, nn.Linear) or (isinstance(module, nn.Module) and transposed_linear(module)):
        return True
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.groups == 1 and module.padding in ((0, 0), "valid"))


def _names(layer: nn.Module) -> tuple[int, str, str]:
    """(the weight dim of its outputs, its output-width attribute, its input-width attribute)."""
    if isinstance(layer, nn.Linear):
        return 0, "out_features", "in_features"
    if isinstance(layer, nn.Conv2d):
        return 0, "out_channels", "in_channels"
    return 1, "nf", "nx"


def out_width(layer: nn.Module) -> int:
    return int(getattr(layer, _names(layer)[1]))


def in_width(layer: nn.Module) -> int:
    return int(getattr(layer, _names(layer)[2]))


def output_rows(layer: nn.Module) -> torch.Tensor:
    """Its weight with one row per output channel (``[out, -1]``), detached."""
    projection: Any = layer
    weight: torch.Tensor = projection.weight.detach()
    dim = _names(layer)[0]
    return weight.movedim(dim, 0).reshape(weight.shape[dim], -1)


def keep_outputs(layer: nn.Module, index: torch.Tensor) -> None:
    """Keep the output channels ``index``: weight rows, bias, width."""
    dim, out_name, _ = _names(layer)
    projection: Any = layer
    projection.weight = take(projection.weight, dim, index)
    projection.bias = take(projection.bias, 0, index)
    setattr(layer, out_name, len(index))


def keep_inputs(layer: nn.Module, index: torch.Tensor) -> None:
    """Keep the input channels ``index``: weight columns, width."""
    dim, _, in_name = _names(layer)
    projection: Any = layer
    projection.weight = take(projection.weight, 1 - dim, index)
    setattr(layer, in_name, len(index))


def zero_inputs(layer: nn.Module, start: int, stop: int) -> None:
    """Zero the weight entries that read input channels ``start`` to ``stop - 1`` (in place, without grad)."""
    projection: Any = layer
    with torch.no_grad():
        projection.weight.narrow(1 - _names(layer)[0], start, stop - start).zero_()


def input_dim(layer: nn.Module, ndim: int) -> int:
    """The dim of its input holding the channels: 1 for a conv, the last otherwise."""
    return 1 if isinstance(layer, nn.Conv2d) else ndim - 1
