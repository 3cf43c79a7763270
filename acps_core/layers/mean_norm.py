"""Norms whose statistic is a mean over the channels, made exact by folding a constant into their weight and eps.

ConvNeXt-V2's Global Response Norm divides each channel's spatial L2 norm by the mean of those norms over all
channels; an RMS norm divides by the root of the mean of squares over all channels. Either way, a channel that is
zero still counts in the mean's denominator, so the same module with ``C'`` of its ``C`` channels computes, on the
kept channels, something that differs from the masked module (the removed channels zeroed at its input) only by
the constant ``r = C / C'`` inside the mean::

    mean over C' of s  =  r * (mean over C of s, the removed s being zero)

which the module absorbs exactly when its ``eps`` is multiplied by ``r`` and its ``weight`` by ``r`` (a statistic
that divides: the response norm) or by ``sqrt(r)`` (a root of the mean: an RMS norm; for Gemma's, which scales by
``1 + weight``, that sum). So acps prunes such a norm
as a follower: its weight and bias keep the kept channels, the factor is folded in, and masking zeroes the removed
channels at its input, which is then exactly what the pruned model computes.

A module is recognised by its parts (no children; a ``weight`` of one entry per channel and possibly a ``bias``;
a float ``eps`` or ``variance_epsilon``) and confirmed on its first traced call: with random weights, the module
pruned of one channel (for each fold in turn) must compute what it computes with that channel zeroed. The fold
that holds is remembered for the module's class.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Set
from typing import Any

import torch
from torch import nn

from acps_core.layers.attention import widened
from acps_core.layers.base import LayerAdapter, take

#: Attributes that may hold the norm's epsilon.
EPS_NAMES = ("eps", "variance_epsilon")
#: The folds a module may need: the power of ``C / C'`` (a statistic that divides: 1; a root of a mean of squares:
#: 1/2) and the offset its weight is used with (``weight`` or ``1 + weight``, Gemma's RMS norm).
FOLDS = ((1.0, 0.0), (0.5, 0.0), (0.5, 1.0))

_PROVEN: dict[type, tuple[float, float]] = {}


def _eps_name(module: nn.Module) -> str | None:
    return next((n for n in EPS_NAMES if isinstance(getattr(module, n, None), float)), None)


def _channels(param: torch.Tensor | None) -> int | None:
    """The entries of a parameter with one non-singleton dim (``(C,)``, ``(1, C, 1, 1)``)."""
    if param is None:
        return None
    sizes = [s for s in param.shape if s != 1]
    return sizes[0] if len(sizes) == 1 else None


def mean_norm(module: nn.Module) -> bool:
    """Whether ``module`` has the parts of a norm whose statistic is a mean over the channels (see the module
    docs): what its forward computes is left to :meth:`MeanNormAdapter.confirm`."""
    if any(True for _ in module.children()) or _eps_name(module) is None or module._buffers:
        return False
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    channels = _channels(weight)
    if channels is None or channels < 2 or set(module._parameters) - {"weight", "bias"}:
        return False
    return bias is None or _channels(bias) == channels


class MeanNormAdapter(LayerAdapter):
    """A follower over the channels of ``channel_dim`` (its attribute, else the weight's channel dim counted from
    the end, else the last dim) that folds ``C / C'`` into its weight and eps when pruned (see the module docs)."""

    role = "follower"

    def traced_whole(self, module: nn.Module) -> bool:
        return mean_norm(module)

    def input_dim(self, module: nn.Module, ndim: int) -> int:
        dim = getattr(module, "channel_dim", None)
        if isinstance(dim, int):
            return dim % ndim
        weight = module._parameters["weight"]
        assert weight is not None
        if weight.dim() > 1:  # stored in its broadcast shape, e.g. (1, C, 1, 1): its dim counted from the end
            channel = next(d for d, s in enumerate(weight.shape) if s != 1)
            return ndim - weight.dim() + channel
        return ndim - 1

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int | tuple[int, ...]]]:
        weight = module._parameters["weight"]
        assert weight is not None
        dim = next(d for d, s in enumerate(weight.shape) if s != 1)
        return [("weight", dim, 0), ("bias", dim, 0)]

    def out_size(self, module: nn.Module) -> int:
        return int(_channels(module._parameters["weight"]) or 0)

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        _keep(module, index, _PROVEN.get(type(module), FOLDS[0]))

    def masked_output(self, module: nn.Module, removed: Set[int]) -> Callable[..., Any] | None:
        """Its output on its input with the removed channels zeroed: what the pruned module computes."""
        total = self.out_size(module)
        mask = torch.ones(total)
        mask[sorted(removed)] = 0
        adapter = self

        def zeroed_input(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                         output: torch.Tensor) -> torch.Tensor:
            x = args[0] if args else next(iter(kwargs.values()))
            dim = adapter.input_dim(layer, x.dim())
            shape = [-1 if d == dim else 1 for d in range(x.dim())]
            result: torch.Tensor = layer.forward(x * mask.to(x.device, x.dtype).reshape(shape),
                                                 *args[1:], **kwargs)
            return result

        return zeroed_input

    def confirm(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether, with random weights, pruning the first channel (with the factor folded in) computes what
        zeroing it at the input computes, for one of the :data:`FOLDS` (remembered for the module's class)."""
        args, kwargs = widened(args), widened(kwargs)  # (rounding in half precision would hide what it computes)
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return False
        channels = self.out_size(module)
        dim = self.input_dim(module, x.dim())
        if x.shape[dim] != channels:
            return False
        generator = torch.Generator().manual_seed(0)
        reference: Any = widened(module)
        with torch.no_grad():
            for param in reference.parameters():
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
        keep = torch.arange(1, channels)
        zeroed = x.clone()
        zeroed.select(dim, 0).zero_()
        try:
            with torch.no_grad():
                expected = reference(zeroed, *args[1:], **kwargs).index_select(dim, keep)
                for fold in FOLDS:
                    trial = copy.deepcopy(reference)
                    _keep(trial, keep, fold)
                    got = trial(x.index_select(dim, keep), *args[1:], **kwargs)
                    if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                        _PROVEN[type(module)] = fold
                        return True
        except Exception:
            return False
        return False


def _keep(module: nn.Module, index: torch.Tensor, fold: tuple[float, float]) -> None:
    """Keep the channels ``index``, folding ``(C / C') ** power`` into the weight as used (``offset + weight``)
    and ``C / C'`` into eps."""
    power, offset = fold
    weight = module._parameters["weight"]
    assert weight is not None
    dim = next(d for d, s in enumerate(weight.shape) if s != 1)
    ratio = _channels(weight) / len(index)  # type: ignore[operator]
    kept = take(weight, dim, index)
    assert kept is not None
    with torch.no_grad():  # a new tensor: ``kept`` may share the unpruned weight's memory
        folded = (kept + offset) * ratio ** power - offset
    norm: Any = module
    norm.weight = nn.Parameter(folded, requires_grad=weight.requires_grad)
    bias = module._parameters.get("bias")
    if bias is not None:
        norm.bias = take(bias, dim, index)
    eps = _eps_name(module)
    assert eps is not None
    setattr(module, eps, float(getattr(module, eps)) * ratio)
