"""Depthwise convolutions over the values of groups of heads, held by an attention module: CoaT's convolutional
relative position encoding::

    v_img = v.transpose(-1, -2).reshape(B, num_heads * head_dim, H, W)
    parts = torch.split(v_img, self.channel_splits, dim=1)
    conv_v = torch.cat([conv(part) for conv, part in zip(self.conv_list, parts)], dim=1)

Each convolution reads the value channels of its own heads, so a head pruned from the module is pruned from the
convolution that holds it: its channels are sliced out, the split sizes the child keeps (the list of widths, the
list of head counts, a dict whose values are those counts) are set to what is kept, and a convolution left with no
head is dropped from its list. Such a child may be shared by several attention modules (the blocks of one CoaT
stage share one): the graph makes them lose the same heads, and the child is sliced once, by the first.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from acps_core.layers.conv import ConvAdapter


def _depthwise(module: nn.Module) -> bool:
    conv: Any = module
    return (type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
            and conv.groups == conv.in_channels == conv.out_channels)


def _width(conv: nn.Module) -> int:
    return int(cast(Any, conv).out_channels)


def head_convs(child: nn.Module, heads: int, value_dim: int) -> nn.ModuleList | None:
    """The list of depthwise convolutions ``child`` holds, if it holds nothing else with parameters and they
    cover the value channels of ``heads`` heads of ``value_dim`` channels each in whole heads, with their widths
    kept in a list attribute of ``child`` (the sizes its forward splits at) when there are several; else None."""
    lists = [m for m in child.children() if isinstance(m, nn.ModuleList)]
    if len(lists) != 1 or not len(lists[0]) or not all(_depthwise(m) for m in lists[0]) or value_dim <= 0:
        return None
    convs = lists[0]
    owned = {id(p) for p in convs.parameters()}
    widths = [_width(conv) for conv in convs]
    if any(id(p) not in owned for p in child.parameters()) or any(w % value_dim for w in widths):
        return None
    if sum(widths) != heads * value_dim:
        return None
    if len(widths) > 1 and widths not in _lists(child):
        return None
    return convs


def _lists(child: nn.Module) -> list[list[Any]]:
    """The list attributes of ``child``."""
    return [v for k, v in vars(child).items() if not k.startswith("_") and isinstance(v, list)]


def head_conv_children(module: nn.Module, heads: int, value_dim: int, skip: tuple[str, ...]) -> list[str]:
    """The names of the children of an attention module (but ``skip``, its projections) that are
    :func:`head_convs` over its heads."""
    return [name for name, child in module.named_children()
            if name not in skip and head_convs(child, heads, value_dim) is not None]


def keep_head_convs(child: nn.Module, heads: int, value_dim: int, kept: torch.Tensor) -> None:
    """Slice the convolutions of ``child`` (see :func:`head_convs`), over ``heads`` heads, to the heads ``kept``;
    a child another module already sliced to them (a shared one) is left as it is."""
    convs = head_convs(child, heads, value_dim)
    if convs is None:
        sliced = head_convs(child, len(kept), value_dim)
        if sliced is not None and len(kept) != heads:
            return
        raise ValueError(f"{type(child).__name__} does not hold convolutions over {heads} heads of {value_dim} "
                         "channels")
    widths = [_width(conv) for conv in convs]
    counts, start = [], 0
    for conv, width in zip(convs, widths):
        per_conv = width // value_dim
        local = kept[(kept >= start) & (kept < start + per_conv)] - start
        start += per_conv
        counts.append(len(local))
        if len(local):
            channels = (local[:, None] * value_dim + torch.arange(value_dim)).reshape(-1)
            ConvAdapter().keep_outputs(conv, channels)
    for index in reversed(range(len(counts))):
        if not counts[index]:
            del convs[index]
    head_counts = [w // value_dim for w in widths]
    for name, value in list(vars(child).items()):
        if name.startswith("_") or not isinstance(value, (list, dict)):
            continue
        if value == widths:
            setattr(child, name, [n * value_dim for n in counts if n])
        elif value == head_counts:
            setattr(child, name, [n for n in counts if n])
        elif isinstance(value, dict) and list(value.values()) == head_counts:
            setattr(child, name, {key: n for key, n in zip(value, counts) if n})
