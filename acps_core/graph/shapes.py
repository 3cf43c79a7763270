"""The channel rules of the torch functions that move a tensor's dims: reshapes (flatten, head splits, channel
shuffles), permutes and transposes, and the helpers that work out where a tag lands."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from acps_core.graph.spaces import Tag
from acps_core.graph.trace import SIZE_QUERY, Op, TensorRef, first_tensor

if TYPE_CHECKING:
    from acps_core.graph.build import GroupBuilder

PERMUTES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "t"})
RESHAPES = frozenset({"view", "reshape", "flatten", "unsqueeze", "squeeze", "view_as", "reshape_as"})


def reshape(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
            where: str) -> None:
    x = tagged[0]
    tags = builder.tags_of(x)
    out = op.outputs[0] if op.outputs else None
    if out is None or len(tagged) != 1 or x is not first_tensor(op.args):
        builder.block_tags(tags, f"{where} cannot be mapped channel by channel")
        return
    in_shape, out_shape = x.shape, builder.recorder.shapes[out]
    sizes = requested_sizes(op)
    if tuple(in_shape) == tuple(out_shape):  # to the shape it has (a no-op some code paths take): nothing moves
        constant = [t for t in tags if sizes is not None and t.dim < len(sizes) and sizes[t.dim] != -1
                    and builder.find(t.space) not in builder.queried]
        for tag in constant:
            builder.block(tag.space, f"{where} reshapes to the constant size {sizes[tag.dim]} along these "  # type: ignore[index]
                                     "channels, which would not follow a pruned channel count; write -1 there")
        builder.tags[out] = [t for t in tags if t not in constant]
        return
    new_tags = []
    shuffled: list[tuple[Tag, list[Tag]]] = []
    for tag in tags:
        pieces = map_shuffle(in_shape, out_shape, tag)
        mapped = map_reshape(in_shape, out_shape, tag, sizes) if pieces is None else None
        if mapped is None and pieces is None:
            builder.block(tag.space, f"{where} reshapes {list(in_shape)} to {list(out_shape)}, which splits "
                                  "or mixes these channels")
            continue
        new_dim = mapped.dim if mapped is not None else pieces[0].dim  # type: ignore[index]
        if (sizes is not None and new_dim < len(sizes) and sizes[new_dim] != -1
                and builder.find(tag.space) not in builder.queried):
            builder.block(tag.space, f"{where} reshapes to the constant size {sizes[new_dim]} along these "
                                  "channels, which would not follow a pruned channel count; write -1 there "
                                  "(or use x.flatten(1)) to make the channels prunable")
            continue
        if pieces is not None:
            shuffled.append((tag, pieces))
            continue
        assert mapped is not None
        if mapped.unit > 1 and not shuffle_split(builder, op, mapped):
            builder.require(tag.space, unit=mapped.unit)
        new_tags.append(mapped)
    if shuffled:
        new_tags += shuffle(builder, shuffled, in_shape[shuffled[0][0].dim], where)
    builder.tags[out] = new_tags


def channel_shuffle(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
                    where: str) -> None:
    """``F.channel_shuffle(x, groups)`` (``nn.ChannelShuffle``): the view/transpose/view of :meth:`shuffle`
    in one function, along dim 1."""
    x = tagged[0]
    tags = builder.tags_of(x)
    groups = op.kwargs.get("groups", op.args[1] if len(op.args) > 1 else None)
    if not op.outputs or len(tagged) != 1 or x is not op.args[0] or not isinstance(groups, int):
        builder.block_tags(tags, f"{where} cannot be mapped channel by channel")
        return
    unit = x.shape[1] // groups
    shuffled = []
    for tag in tags:
        if tag.dim != 1:
            continue
        if tag.block != 1 or tag.unit != 1 or not tag.contiguous or tag.offset % unit or tag.length % unit:
            builder.block(tag.space, f"{where} is a channel shuffle that splits these channels unevenly")
            continue
        pieces = [Tag(tag.space, 1, tag.offset // unit + k, 1, first, first + unit, stride=groups)
                  for k, first in enumerate(range(tag.start, tag.stop, unit))]
        shuffled.append((replace(tag, unit=unit), pieces))
    passing = [t for t in tags if t.dim != 1]
    builder.set_tags(op, passing + (shuffle(builder, shuffled, groups, where) if shuffled else []))


def shuffle_split(builder: GroupBuilder, op: Op, tag: Tag) -> bool:
    """Whether the split of a channel dim into units (``x.view(builder, g, c // g, h, w)``) is the first step of
    a channel shuffle: its only reader (besides shape queries) swaps the units' dim with their remainder's,
    and the only reader of that (through ``contiguous``) reshapes them back into one dim. Then the units
    need not go whole: the shuffle keeps the same channels of every unit instead (see :meth:`shuffle`)."""
    value = op.outputs[0]
    for _ in range(4):
        readers = [r for r in builder.readers(value) if r.name != SIZE_QUERY]
        if len(readers) != 1 or not readers[0].outputs:
            return False
        reader = readers[0]
        if reader.name in PERMUTES:
            order = permutation(reader, len(builder.recorder.shapes[value]))
            if order is None or tag.rest is None or order.index(tag.dim) != order.index(tag.rest) + 1:
                return False
            tag = replace(tag, dim=order.index(tag.dim), rest=order.index(tag.rest))
        elif reader.name in ("contiguous", "clone"):
            pass
        elif reader.name in ("view", "reshape", "flatten"):
            shape = builder.recorder.shapes[value]
            return map_shuffle(shape, builder.recorder.shapes[reader.outputs[0]], tag) is not None
        else:
            return False
        value = reader.outputs[0]
    return False


def shuffle(builder: GroupBuilder, shuffled: list[tuple[Tag, list[Tag]]], units: int, where: str) -> list[Tag]:
    """A channel shuffle: the units of a split channel dim (``units`` of them, each ``unit`` channels wide)
    are merged back behind their remainder, which interleaves them: channel ``j`` of every unit ends up
    next to channel ``j`` of the others. Pruned, the units must keep the same channels for the interleaving
    to stay in order, so every space taking part keeps the same channels in each of its units (``aligned``)
    and spaces sharing the shuffle are one group. Returns the tags of the shuffled channels."""
    originals = [tag for tag, _ in shuffled]
    unit = originals[0].unit
    per_space: dict[int, int] = {}
    for tag in originals:
        per_space[tag.space] = per_space.get(tag.space, 0) + tag.stop - tag.start
    if any(t.unit != unit for t in originals) or sum(t.stop - t.start for t in originals) != units * unit:
        builder.block_tags(originals, f"{where} is a channel shuffle that interleaves these channels with channels "
                                   "no prunable layer produces")
        return []
    if any(count != builder.spaces[space].channels for space, count in per_space.items()):
        builder.block_tags(originals, f"{where} is a channel shuffle of only part of these channels")
        return []
    for space, count in per_space.items():
        builder.require(space, aligned=count // unit)
    for tag in originals[1:]:
        builder.union(originals[0].space, tag.space, f"{where} (a channel shuffle) interleaves them")
    return [piece for _, pieces in shuffled for piece in pieces]


def permute(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
            where: str) -> None:
    x = tagged[0]
    tags = builder.tags_of(x)
    order = permutation(op, len(x.shape))
    if not op.outputs or order is None or len(tagged) != 1:
        builder.block_tags(tags, f"{where} cannot be mapped channel by channel")
        return
    builder.set_tags(op, [replace(t, dim=order.index(t.dim), rest=None if t.rest is None else order.index(t.rest))
                       for t in tags])


def requested_sizes(op: Op) -> list[Any] | None:
    """The sizes a view/reshape call asked for (``x.view(builder, -1)`` -> ``[b, -1]``); None for other reshapes."""
    if op.name not in ("view", "reshape"):
        return None
    shape = op.kwargs.get("shape", op.kwargs.get("size"))
    if shape is None:
        rest = list(op.args[1:])
        shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    if not all(isinstance(s, int) for s in shape):
        return None  # x.view(torch.float16) or symbolic sizes: nothing to check
    return list(shape)


def map_reshape(in_shape: tuple[int, ...], out_shape: tuple[int, ...], tag: Tag,
                 sizes: list[Any] | None = None) -> Tag | None:
    """Where a tag lands after a reshape; None when the reshape mixes its channels with something else.

    The dims before the tag's dim must keep their total size. Then the tag's dim either stays whole or merges
    with the dims right after it (flatten: each channel spreads over more positions), or splits into a dim of
    units followed by dims that hold each unit's remainder (heads: ``(B, T, C) -> (B, T, H, C // H)``).
    ``sizes`` are the sizes the call asked for, when it gave them (``view``/``reshape``).
    """
    dim = tag.dim
    prefix = math.prod(in_shape[:dim])
    size = in_shape[dim]
    after = [math.prod(in_shape[dim + 1:end]) for end in range(dim + 1, len(in_shape) + 1)]
    candidates: list[Tag] = []
    for new_dim in range(len(out_shape)):
        if math.prod(out_shape[:new_dim]) != prefix:
            continue
        new_size = out_shape[new_dim]
        if new_size % size == 0 and new_size // size in after:
            merged = new_size // size  # the product of the dims merged into the tag's dim
            if tag.unit == 1:
                stride = None if tag.stride is None else tag.stride * merged
                # view(B, G, C // G) with G == C, a number written in the call: units of one channel, their
                # remainder next (a shuffle whose pruned count must stay G). A -1 or an unsqueeze is no such thing.
                written = sizes is not None and new_dim < len(sizes) and sizes[new_dim] != -1
                known = (new_dim + 1 if written and merged == 1 and tag.block == 1 and new_dim + 1 < len(out_shape)
                         and out_shape[new_dim + 1] == 1 else None)
                candidates.append(replace(tag, dim=new_dim, offset=tag.offset * merged, block=tag.block * merged,
                                          stride=stride, rest=known))
            elif merged % tag.unit == 0 and tag.start % tag.unit == 0:
                candidates.append(replace(tag, dim=new_dim, offset=tag.offset * merged, block=merged // tag.unit,
                                          unit=1, rest=None))
        elif size % new_size == 0 and tag.unit == 1 and tag.block == 1 and tag.contiguous:
            unit = size // new_size
            rest = [math.prod(out_shape[new_dim + 1:end]) for end in range(new_dim + 1, len(out_shape) + 1)]
            if unit in rest and tag.offset % unit == 0 and tag.start % unit == 0 and tag.length % unit == 0:
                known = new_dim + 1 if new_dim + 1 < len(out_shape) and out_shape[new_dim + 1] == unit else None
                candidates.append(replace(tag, dim=new_dim, offset=tag.offset // unit, unit=unit, rest=known))
    # Prefer the last match: leading size-1 dims (batch of one) are ambiguous, the channel dim is not.
    return candidates[-1] if candidates else None


def map_shuffle(in_shape: tuple[int, ...], out_shape: tuple[int, ...], tag: Tag) -> list[Tag] | None:
    """Where the channels of a unit tag land when a reshape merges its dim back *behind* the remainder of its
    units (the last step of a channel shuffle: ``(B, C) -> (B, G, C/G) -> transpose -> (B, C/G, G) -> (B, C)``):
    channel ``j`` of unit ``k`` goes to position ``j * G + offset + k``. One strided tag per unit; None when the
    reshape is not that. (Units of one channel, ``G == C``, make the shuffle the identity, but a pruned count
    could no longer be split in ``G``: the same mapping keeps every channel of the space.)"""
    rest, dim = tag.rest, tag.dim
    if rest is None or rest != dim - 1 or in_shape[rest] != tag.unit or tag.block != 1:
        return None
    prefix = math.prod(in_shape[:rest])
    groups = in_shape[dim]
    after = [math.prod(in_shape[dim + 1:end]) for end in range(dim + 1, len(in_shape) + 1)]
    for new_dim in reversed(range(len(out_shape))):
        merged, remainder = divmod(out_shape[new_dim], tag.unit * groups)
        if math.prod(out_shape[:new_dim]) != prefix or remainder or merged not in after:
            continue
        return [Tag(tag.space, new_dim, (tag.offset + k) * merged, merged, first, first + tag.unit,
                     stride=groups * merged)
                for k, first in enumerate(range(tag.start, tag.stop, tag.unit))]
    return None


def permutation(op: Op, ndim: int) -> list[int] | None:
    """The dim order a permute-like op produces (output dim i takes input dim order[i])."""
    name = op.name
    ints = [a for a in op.args[1:] if isinstance(a, int)]
    if name == "permute":
        dims = op.args[1:] if len(op.args) > 2 else (op.args[1] if len(op.args) > 1 else op.kwargs.get("dims"))
        if dims is None:
            return None
        return [d % ndim for d in dims]
    if name in {"transpose", "swapaxes", "swapdims"} and len(ints) == 2:
        order = list(range(ndim))
        a, b = ints[0] % ndim, ints[1] % ndim
        order[a], order[b] = order[b], order[a]
        return order
    if name == "movedim" and len(ints) == 2:
        order = list(range(ndim))
        source = order.pop(ints[0] % ndim)
        order.insert(ints[1] % ndim, source)
        return order
    if name == "t" and ndim == 2:
        return [1, 0]
    return None


def index_dims(index: Any, ndim: int, shape: tuple[int, ...]) -> dict[int, int | None] | None:
    """For ``x[index]``: each input dim -> its output dim when taken whole, None when indexed or sliced;
    None overall for advanced (tensor or list) indexing."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (list, TensorRef, torch.Tensor)) for i in items):
        return None
    if any(i is Ellipsis for i in items):
        at = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at:at + 1] = [slice(None)] * (ndim - used)
    mapping: dict[int, int | None] = {}
    dim = out = 0
    for item in items:
        if item is None:
            out += 1
        elif isinstance(item, slice):
            whole = dim < ndim and item.indices(shape[dim]) == (0, shape[dim], 1)
            mapping[dim] = out if whole else None
            dim += 1
            out += 1
        elif isinstance(item, int):
            mapping[dim] = None
            dim += 1
        else:
            return None
    for rest in range(dim, ndim):
        mapping[rest] = out
        out += 1
    return mapping
