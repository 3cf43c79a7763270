"""A layer whose channels are another layer's channels repeated: what meets GhostNet's ghost module::

    x1 = self.primary_conv(x)
    x2 = self.cheap_operation(x1)      # depthwise: channel c of x2 is channel c of x1, filtered
    out = torch.cat([x1, x2], dim=1)   # the channels of x1, twice

when it is added to a conv shortcut (``out + self.shortcut(residual)``) or multiplied by a squeeze-excitation gate
whose conv produces as many channels. Channel ``c`` of x1 meets channels ``c`` and ``init + c`` of the shortcut,
so the shortcut conv's channels are x1's, repeated: it loses rows ``c`` and ``init + c`` with x1's channel ``c``
(:meth:`~acps_core.graph.spaces.Spaces.fold`), and so do the norms after it and the layers that read it. Without
this, the element-wise join of one producer's channels, twice, with another producer's, once, leaves both alone.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from acps_core.graph.spaces import Tag
from acps_core.graph.trace import TensorRef

if TYPE_CHECKING:
    from acps_core.graph.build import GroupBuilder


def fold_repeats(builder: GroupBuilder, operands: list[tuple[TensorRef, list[Tag]]]) -> bool:
    """Fold every operand of an element-wise join that is one producer's channels, whole, into another operand
    that is one group's channels at several offsets covering it (see the module docs); whether any was."""
    folded = False
    for ref, tags in operands:
        copies = _copies(builder, tags)
        if copies is None:
            continue
        space, offsets = copies
        width = builder.spaces[builder.find(space)].channels
        for other, other_tags in operands:
            if other is ref or len(other_tags) != 1 or other_tags[0].dim != tags[0].dim:
                continue
            repeated = other_tags[0].space
            if builder.find(repeated) == builder.find(space) or not _foldable(builder, other_tags[0],
                                                                              width * len(offsets)):
                continue
            producer = builder.spaces[repeated].producer
            builder.fold(repeated, space, offsets, type(builder.modules[producer]).__name__)
            builder.layers[producer]["repeat"] = len(offsets)
            for entry in builder.layers.values():  # the layers that read it so far: one input use per copy
                entry["in"] = [(builder.find(space), replace(use, offset=use.offset + offset)) if read == repeated
                               else (read, use) for read, use in entry["in"]
                               for offset in (offsets if read == repeated else [0])]
            folded = True
    return folded


def _copies(builder: GroupBuilder, tags: list[Tag]) -> tuple[int, list[int]] | None:
    """``(space, offsets)`` when ``tags`` are one group's channels, whole and side by side, once at each offset
    (at least twice, together a run from 0); else None."""
    if len(tags) < 2 or len({builder.find(t.space) for t in tags}) != 1 or len({t.dim for t in tags}) != 1:
        return None
    width = builder.spaces[builder.find(tags[0].space)].channels
    if not all(_simple(t) and t.stop == width for t in tags):
        return None
    offsets = sorted(t.offset for t in tags)
    return (tags[0].space, offsets) if offsets == [k * width for k in range(len(tags))] else None


def _simple(tag: Tag) -> bool:
    """Channels from the first, one position each, side by side."""
    return tag.start == 0 and tag.block == 1 and tag.unit == 1 and tag.stride is None


def _foldable(builder: GroupBuilder, tag: Tag, channels: int) -> bool:
    """Whether ``tag`` is a whole space of ``channels`` that a layer produces, alone in its group, prunable so
    far and with no constraint, every use and tag of it whole, one position per channel (what
    :meth:`~acps_core.graph.spaces.Spaces.fold` can re-express)."""
    space = builder.spaces[tag.space]
    if not _simple(tag) or tag.offset or tag.stop != channels or space.channels != channels or space.folded:
        return False
    if space.reasons:  # already left alone: folding would only move its reasons onto the other
        return False
    entry = builder.layers.get(space.producer)
    if entry is None or entry["out"] != tag.space or (space.unit, space.blocks, space.aligned) != (1, 1, 1):
        return False
    if builder.members(tag.space) != [tag.space] or any(tag.space in spaces for spaces in builder.read_sizes.values()):
        return False
    if any(found == tag.space for found, _ in builder.param_space.values()):
        return False
    uses = [*space.followers, *space.consumers]
    if not all((u.start, u.stop, u.block, u.stride) == (0, None, 1, None) for u in uses):
        return False
    return all(_simple(t) and t.stop == channels for tags in builder.tags.values() for t in tags
               if t.space == tag.space)
