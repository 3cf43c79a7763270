"""A Linear that stores its weight transposed, ``(in, out)``, and keeps its output width in ``nf``: the ``Conv1D``
of Hugging Face's GPT-2 (``x @ weight + bias`` through ``addmm``, reshaped to ``(..., nf)``).

It is recognised by its parts (a ``weight`` of ``(nx, nf)``, a ``bias`` of ``nf``, integer ``nf`` and ``nx``
attributes, no children) rather than its class, so acps needs no import of the library that defines it; that its
forward computes what a Linear with the transposed weight computes is proven on its first traced call. It is
then pruned like ``nn.Linear``: output channels are the weight's columns (and the bias), input channels its rows.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from acps_core.graph.model import LayerGeometry
from acps_core.layers.base import take
from acps_core.layers.linear import LinearAdapter


def transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` has the parts of a Linear stored transposed (see the module docs)."""
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    if not (isinstance(nf, int) and isinstance(nx, int)) or any(True for _ in module.children()):
        return False
    if weight is None or tuple(weight.shape) != (nx, nf) or set(module._parameters) - {"weight", "bias"}:
        return False
    return bias is None or tuple(bias.shape) == (nf,)


class TransposedLinearAdapter(LinearAdapter):
    """A Linear stored transposed (see the module docs): ``weight`` is ``(in, out)``."""

    def traced_whole(self, module: nn.Module) -> bool:
        return transposed_linear(module)

    def geometry(self, name: str, module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                 dtype: torch.dtype) -> LayerGeometry:
        layer = cast(Any, module)
        return LayerGeometry(name, "Linear", layer.nx, layer.nf, 1, (1,), (1,), input_shape, output_shape, dtype,
                             layer.weight.dtype)

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int | tuple[int, ...]]]:
        return [("weight", 1, 0), ("bias", 0, 0)]

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return [("weight", 0, 1)]

    def out_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).nf)

    def in_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).nx)

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        layer = cast(Any, module)
        layer.weight = take(layer.weight, 1, index)
        layer.bias = take(layer.bias, 0, index)
        layer.nf = len(index)

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        layer = cast(Any, module)
        layer.weight = take(layer.weight, 0, index)
        layer.nx = len(index)

    def refittable(self, module: nn.Module) -> bool:
        return False  # the re-fit folds into a weight of (out, in)

    def confirm(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether the module computes ``F.linear`` with its weight transposed, on its first call's input."""
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or kwargs or len(args) != 1:
            return False
        layer = cast(Any, module)
        with torch.no_grad():
            got = module(x)
            expected = F.linear(x, layer.weight.T, layer.bias)
        return bool(got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5))
