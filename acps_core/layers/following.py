"""Attention that merges its heads back to its input's width, made to follow its pruned heads.

Some attention modules size the merge of their heads by the channel count of their input::

    B, N, C = x.shape
    ...
    x = (attn @ v).permute(0, 3, 1, 2).reshape(B, N, C)   # timm's EdgeNeXt cross-covariance attention

The heads' width equals the input width only while no head is pruned. Once heads are, such a module's forward
runs under :class:`FollowHeads` (installed by :func:`follow_heads`): a ``reshape`` or ``view`` whose sizes no
longer fit its tensor, one of which is the input's channel count, has that size inferred instead (``-1``), which
is the kept heads' width. A reshape that fits is left as written, so the forward computes what it computed on
every other tensor. Whether a module's kind computes so what masking its pruned heads computes is proven on its
first traced call (:func:`prunes_like_masking`), as for every module traced whole; a forward the rule does not
fit keeps its heads.

The module keeps its class; its ``forward`` attribute becomes a :class:`HeadsFollowingForward`, which pickles and
copies with the module. Each call pays the dispatch of one Python function per torch call inside the module.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from acps_core.layers.attention import same_output, stateless

#: The calls whose sizes may be the stale input width.
RESHAPES = frozenset({torch.Tensor.reshape, torch.Tensor.view, torch.reshape})


def fitted_sizes(shape: torch.Size, sizes: tuple[int, ...], width: int) -> tuple[int, ...]:
    """``sizes`` for a tensor of ``shape``, with the last size equal to ``width`` inferred (-1) when they do not
    fit the tensor as written and do once that size is inferred; else as written."""
    numel = math.prod(shape)
    if -1 in sizes or math.prod(sizes) == numel or width not in sizes:
        return sizes
    at = len(sizes) - 1 - sizes[::-1].index(width)
    others = math.prod(sizes[:at] + sizes[at + 1:])
    if others == 0 or numel % others:
        return sizes
    return (*sizes[:at], -1, *sizes[at + 1:])


def _size(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, torch.Tensor) and value.dim() == 0
                                      and not value.is_floating_point() and not value.is_complex())


class FollowHeads(TorchFunctionMode):
    """Within the block, reshapes to ``width`` that no longer fit are given the size that fits (see the module
    docs); every other torch call runs as written."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in RESHAPES and len(args) >= 2 and not kwargs and isinstance(args[0], torch.Tensor):
            given = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
            if all(_size(size) for size in given):  # (sizes are 0-dim tensors under torch.jit.trace)
                written = tuple(int(size) for size in given)
                fitted = fitted_sizes(torch.Size(int(n) for n in args[0].shape), written, self.width)
                if fitted != written:
                    args = (args[0], tuple(-1 if new == -1 else old for new, old in zip(fitted, given)))
        return func(*args, **kwargs)


class HeadsFollowingForward:
    """The forward of ``module``'s class, run under :class:`FollowHeads` with the channel count of the call's
    first tensor along ``channel_dim`` (the module's input width at that call)."""

    def __init__(self, module: nn.Module, channel_dim: int) -> None:
        self.module = module
        self.channel_dim = channel_dim

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        forward = type(self.module).forward
        if first is None:
            return forward(self.module, *args, **kwargs)
        with FollowHeads(int(first.shape[self.channel_dim])):
            return forward(self.module, *args, **kwargs)


def follow_heads(module: nn.Module, channel_dim: int) -> None:
    """Make ``module``'s forward follow its pruned heads (see the module docs); once is enough."""
    if not isinstance(vars(module).get("forward"), HeadsFollowingForward):
        module.forward = HeadsFollowingForward(module, channel_dim)


def follows_heads(module: nn.Module) -> bool:
    return isinstance(vars(module).get("forward"), HeadsFollowingForward)


def prunes_like_masking(module: nn.Module, prune: Callable[[nn.Module], None], mask: Callable[[nn.Module], None],
                        args: tuple[Any, ...], kwargs: dict[str, Any],
                        select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
    """Whether a copy of ``module`` cut by ``prune`` computes what a copy cut by ``mask`` computes on a call's
    arguments (the first output; ``select`` picks the kept channels of the masked output where the pruned
    copy's output has fewer)."""
    trial, reference = copy.deepcopy(module), copy.deepcopy(module)
    try:
        with torch.no_grad():
            prune(trial)
            mask(reference)
            kwargs = stateless(kwargs)
            got, expected = trial(*args, **kwargs), reference(*args, **kwargs)
            if select is not None and isinstance(expected, torch.Tensor):
                expected = select(expected)
    except Exception:
        return False
    return same_output(got, expected)


def input_prunes_like_masking(module: nn.Module, keep_inputs: Callable[[nn.Module, torch.Tensor], None],
                              channel_dim: Callable[[int], int], args: tuple[Any, ...],
                              kwargs: dict[str, Any]) -> bool:
    """Whether a copy of ``module`` whose first input channel was cut by ``keep_inputs``, called on its input
    without that channel, computes what the module computes on its input with that channel zeroed (a forward
    that reads its input width for something else, a scale or a split, would not); ``channel_dim`` gives the
    channel dim of an input of so many dims."""
    position = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
    key = None if position is not None else next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
    x = args[position] if position is not None else kwargs.get(key or "")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return False
    dim = channel_dim(x.dim()) % x.dim()
    if x.shape[dim] < 2:
        return True  # no input channel can go; nothing to prove
    kept = torch.arange(1, x.shape[dim], device=x.device)
    zeroed = x.clone()
    zeroed.select(dim, 0).zero_()

    def called(target: nn.Module, tensor: torch.Tensor) -> Any:
        if position is not None:
            return target(*args[:position], tensor, *args[position + 1:], **stateless(kwargs))
        return target(*args, **{**stateless(kwargs), str(key): tensor})

    trial = copy.deepcopy(module)
    try:
        with torch.no_grad():
            keep_inputs(trial, kept)
            got, expected = called(trial, x.index_select(dim, kept)), called(module, zeroed)
    except Exception:
        return False
    return same_output(got, expected)
