"""Attention that merges its heads back to its input's width, made to follow its pruned heads.

Some attention modules size the merge of their heads by the channel count of their input::

    B, N, C = x.shape
    ...
    x = (attn @ v).permute(0, 3, 1, 2).reshape(B, N, C)   # timm's EdgeNeXt cross-covariance attention

or derive the head width from it (``reshape(B, N, 3, self.num_heads, C // self.num_heads)``: timm's CoaT, CaiT,
DaViT). Both hold only while no head and no input channel is pruned. Once heads are, such a module's forward
runs under :class:`FollowHeads` (installed by :func:`follow_heads`): a ``reshape`` or ``view`` whose sizes no
longer fit its tensor, one of which is the input's channel count (the one at the input's channel dim if that is
one), has that size replaced by the one that fits, which is the kept heads' width; without such a size, a last
size that is the input's channel count over the size before it gets the one that fits (the head width). A
reshape that fits is left as written, so the forward computes what it computed on every other tensor. Whether a
module's kind computes so what masking its pruned heads computes is proven on its first traced call
(:func:`prunes_like_masking`), as for every module traced whole; a forward the rules do not fit keeps its heads.

The module keeps its class and its forward; two hooks enter and leave the mode around each call (they pickle, copy
and replicate with the module). Each call pays the dispatch of one Python function per torch call inside the
module.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from acps_core.layers.attention import same_output, stateless, widened

#: The calls whose sizes may be the stale input width.
RESHAPES = frozenset({torch.Tensor.reshape, torch.Tensor.view, torch.reshape})
#: The attribute that marks a module whose forward follows its heads: the channel dim of its input.
MARK = "_acps_follows_heads"
_ENTERED = threading.local()  # per thread, the modes the modules being called entered (innermost last)


def fitted_sizes(shape: tuple[Any, ...], sizes: tuple[Any, ...], width: Any, channel_dim: int = -1
                 ) -> tuple[int, Any] | None:
    """``(position, size)``: for ``sizes`` that do not fit a tensor of ``shape`` as written, the position of the
    size equal to ``width`` (the one at ``channel_dim`` if that is one, else the last; without one, the last size
    if it is ``width`` over the size before it, a head width written ``C // num_heads``) and the size that makes
    them fit; None when they fit as written or no such size would make them fit."""
    if any(_equals(size, -1) for size in sizes) or (math.prod(sizes) == math.prod(shape)
                                                   and not any(_equals(n, 0) for n in shape)):
        return None
    candidates = [i for i, size in enumerate(sizes) if _equals(size, width)]
    if not candidates and _derived_head_width(sizes, width):
        candidates = [len(sizes) - 1]
    if not candidates:
        return None
    at = channel_dim % len(sizes) if channel_dim % len(sizes) in candidates else candidates[-1]
    have = math.prod(n for n in shape if not _equals(n, 0))  # (an empty batch: what its other dims hold)
    need = math.prod(size for i, size in enumerate(sizes) if i != at and not _equals(size, 0))
    if need == 0 or have % need or have // need == width:
        return None
    return at, have // need


def _derived_head_width(sizes: tuple[Any, ...], width: Any) -> bool:
    """Whether the last size is the width over the one before it: a head width written ``C // num_heads``."""
    if len(sizes) < 2 or not all(isinstance(n, int) for n in (sizes[-2], sizes[-1], width)):
        return False
    return bool(sizes[-2] > 0 and sizes[-1] == width // sizes[-2])


def _equals(size: Any, value: Any) -> bool:
    """Whether a size is ``value``; a symbolic size (a dim torch.export keeps dynamic) is no particular value."""
    return not isinstance(size, torch.SymInt) and size == value


def _size(value: Any) -> bool:
    """A size as a reshape takes it: an int, a SymInt (torch.export) or a 0-dim integer tensor (torch.jit.trace)."""
    if isinstance(value, (int, torch.SymInt)):
        return True
    return isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point()


def _value(size: Any) -> Any:
    return int(size) if isinstance(size, torch.Tensor) else size


class FollowHeads(TorchFunctionMode):
    """Within the block, a reshape to ``width`` that no longer fits is given the size that fits (see the module
    docs); every other torch call runs as written."""

    def __init__(self, width: Any, channel_dim: int = -1) -> None:
        super().__init__()
        self.width = width
        self.channel_dim = channel_dim

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in RESHAPES and len(args) >= 2 and not kwargs and isinstance(args[0], torch.Tensor):
            given = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
            if all(_size(size) for size in given):
                shape = tuple(_value(n) for n in args[0].shape)
                fitted = fitted_sizes(shape, tuple(_value(s) for s in given), self.width, self.channel_dim)
                if fitted is not None:
                    at, size = fitted
                    args = (args[0], (*given[:at], size, *given[at + 1:]))
        return func(*args, **kwargs)


def _enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: enter :class:`FollowHeads` at the width of the call's first tensor."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    dim = getattr(module, MARK, -1)
    width = _value(first.shape[dim]) if first is not None and first.dim() > 0 else -2
    mode = FollowHeads(width, dim)
    mode.__enter__()
    _ENTERED.__dict__.setdefault("modes", []).append(mode)


def _leave(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook, called even when the forward raised: leave the mode :func:`_enter` entered."""
    modes = _ENTERED.__dict__.get("modes")
    if modes:
        modes.pop().__exit__(None, None, None)


def follow_heads(module: nn.Module, channel_dim: int) -> None:
    """Make ``module``'s forward follow its pruned heads (see the module docs), ``channel_dim`` being the channel
    dim of its input; once is enough. Hooks do it, so that a replica (``nn.DataParallel``) follows its own
    call."""
    if follows_heads(module):
        return
    setattr(module, MARK, channel_dim)
    module.register_forward_pre_hook(_enter, with_kwargs=True)
    module.register_forward_hook(_leave, always_call=True)


def follows_heads(module: nn.Module) -> bool:
    return MARK in vars(module)


def prunes_like_masking(module: nn.Module, prune: Callable[[nn.Module], None], mask: Callable[[nn.Module], None],
                        args: tuple[Any, ...], kwargs: dict[str, Any],
                        select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
    """Whether a copy of ``module`` cut by ``prune`` computes what a copy cut by ``mask`` computes on a call's
    arguments (the first output; ``select`` picks the kept channels of the masked output where the pruned
    copy's output has fewer). Both run in float32 (see :func:`widened`)."""
    trial, reference = widened(module), widened(module)
    args, kwargs = widened(args), widened(stateless(kwargs))
    try:
        with torch.no_grad():
            prune(trial)
            mask(reference)
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
    channel dim of an input of so many dims. Both run in float32 (see :func:`widened`)."""
    args, kwargs = widened(args), widened(stateless(kwargs))
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
            return target(*args[:position], tensor, *args[position + 1:], **kwargs)
        return target(*args, **{**kwargs, str(key): tensor})

    trial, reference = widened(module), widened(module)
    try:
        with torch.no_grad():
            keep_inputs(trial, kept)
            got, expected = called(trial, x.index_select(dim, kept)), called(reference, zeroed)
    except Exception:
        return False
    return same_output(got, expected)

