"""Channel spaces: the output channels of each producer layer, carried through the model as *tags* on the traced
values, and merged into groups when an operation ties two of them together.

A :class:`Tag` says where a space's channels sit in one value (which dim, at which positions, how spread). A
:class:`Space` collects what the graph learns about one producer's channels: the followers and consumers that
read them and the reasons they cannot be pruned. :class:`Spaces` is the union-find over them, with the
constraints a group must keep (whole units, equal blocks, aligned blocks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from acps_core.graph.model import ChannelUse
from acps_core.graph.trace import Op, TensorRef


@dataclass(frozen=True)
class Tag:
    """Channels ``start .. stop - 1`` of space ``space`` sit along ``dim`` of a value.

    Channel ``c`` occupies positions ``offset + (c - start) * block`` onwards, ``block`` of them (a flatten
    spreads a channel over its pixels), or ``offset + (c - start) * stride`` onwards when a channel shuffle
    interleaved them with others; or, when ``unit > 1`` (the channel dim was split, e.g. into heads), position
    ``offset + (c - start) // unit`` holds a whole unit of channels, whose remainder runs along another
    dimension of size ``unit``: ``rest`` when the tag knows which (right after the split, and through
    permutes), else None.
    """

    space: int
    dim: int
    offset: int
    block: int
    start: int
    stop: int
    unit: int = 1
    stride: int | None = None
    rest: int | None = None

    @property
    def length(self) -> int:
        """Positions it takes along ``dim``."""
        return (self.stop - self.start) * self.block // self.unit

    @property
    def contiguous(self) -> bool:
        """Its channels sit side by side (not interleaved by a shuffle)."""
        return self.stride is None

    def same_place(self, other: Tag) -> bool:
        return (self.dim, self.offset, self.block, self.unit, self.start, self.stop, self.stride) == (
            other.dim, other.offset, other.block, other.unit, other.start, other.stop, other.stride)

    def moved(self, dim: int) -> Tag:
        """The tag on another dim of a new value (where its unit's remainder went is no longer known)."""
        return replace(self, dim=dim, rest=None)


@dataclass
class Space:
    producer: str
    channels: int
    followers: list[ChannelUse] = field(default_factory=list)
    consumers: list[ChannelUse] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    unit: int = 1
    blocks: int = 1
    aligned: int = 1
    #: Folded into another space it repeats (:meth:`Spaces.fold`): its producer no longer produces a group.
    folded: bool = False


class Spaces:
    """The channel spaces of one trace, their union-find and the tags of every traced value."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.tags: dict[int, list[Tag]] = {}
        self.queried: set[int] = set()  # spaces whose size the model read (x.shape, x.size())

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int, why: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.spaces[ra].channels != self.spaces[rb].channels:
            self.block(ra, why + f" joins {self.spaces[rb].channels} channels with {self.spaces[ra].channels}")
            self.block(rb, why + f" joins {self.spaces[ra].channels} channels with {self.spaces[rb].channels}")
        self.parent[rb] = ra
        kept, gone = self.spaces[ra], self.spaces[rb]
        kept.reasons += [r for r in gone.reasons if r not in kept.reasons]
        kept.unit = math.lcm(kept.unit, gone.unit)
        kept.blocks = math.lcm(kept.blocks, gone.blocks)
        kept.aligned = math.lcm(kept.aligned, gone.aligned)
        if rb in self.queried:
            self.queried.add(ra)

    def fold(self, space: int, into: int, offsets: Sequence[int], kind: str) -> None:
        """Space ``space`` holds the channels of ``into`` once at each of ``offsets`` (a conv shortcut added to
        GhostNet's ``cat([x1, cheap(x1)])``): its producer (a layer of ``kind``), followers and consumers become
        uses of ``into`` at each offset, its tags one tag of ``into`` per offset, and it joins ``into``'s group
        without producing it. Every use and tag of it must cover it whole, one position per channel."""
        gone, root = self.spaces[space], self.find(into)
        target, width = self.spaces[root], self.spaces[root].channels
        for offset in offsets:
            target.followers.append(ChannelUse(gone.producer, kind, offset))
            target.followers += [replace(use, offset=use.offset + offset) for use in gone.followers]
            target.consumers += [replace(use, offset=use.offset + offset) for use in gone.consumers]
        target.reasons += [r for r in gone.reasons if r not in target.reasons]
        gone.followers, gone.consumers, gone.reasons, gone.folded = [], [], [], True
        self.parent[space] = root
        if space in self.queried:
            self.queried.add(root)
        for value, tags in self.tags.items():
            if any(tag.space == space for tag in tags):
                self.tags[value] = [new for tag in tags for new in (
                    [replace(tag, space=root, offset=tag.offset + o, stop=width) for o in offsets]
                    if tag.space == space else [tag])]

    def members(self, space: int) -> list[int]:
        """The spaces in ``space``'s group."""
        root = self.find(space)
        return [i for i in range(len(self.spaces)) if self.find(i) == root]

    def block(self, space: int, reason: str) -> None:
        reasons = self.spaces[self.find(space)].reasons
        if reason not in reasons:
            reasons.append(reason)

    def explain_first(self, reason: str, values: Iterable[int | None], inside: str) -> None:
        """Put ``reason`` first among the reasons of the blocked spaces that the traced ``values`` carry or a
        layer whose name starts with ``inside`` produces."""
        roots = {self.find(tag.space) for value in values if value is not None for tag in self.tags.get(value, [])}
        roots |= {self.find(i) for i, space in enumerate(self.spaces) if space.producer.startswith(inside)}
        for root in roots:
            reasons = self.spaces[root].reasons
            if reasons and reason not in reasons:
                reasons.insert(0, reason)

    def block_tags(self, tags: Iterable[Tag], reason: str) -> None:
        for tag in tags:
            self.block(tag.space, reason)

    def require(self, space: int, unit: int = 1, blocks: int = 1, aligned: int = 1) -> None:
        """The space's channels must go in whole units of ``unit`` / keep equal counts in ``blocks`` blocks /
        keep the same channels in ``aligned`` blocks."""
        root = self.spaces[self.find(space)]
        root.unit = math.lcm(root.unit, unit)
        root.blocks = math.lcm(root.blocks, blocks)
        root.aligned = math.lcm(root.aligned, aligned)

    def new_space(self, producer: str, channels: int) -> int:
        self.spaces.append(Space(producer, channels))
        self.parent.append(len(self.parent))
        return len(self.spaces) - 1

    def use(self, name: str, kind: str, tag: Tag) -> ChannelUse:
        """How layer ``name`` sees the channels ``tag`` describes."""
        whole = tag.start == 0 and tag.stop == self.spaces[tag.space].channels
        return ChannelUse(name, kind, tag.offset, tag.block, tag.start, None if whole else tag.stop,
                          stride=tag.stride)

    def whole(self, space: int, dim: int) -> Tag:
        return Tag(space, dim, 0, 1, 0, self.spaces[space].channels)

    def tags_of(self, ref: Any) -> list[Tag]:
        if isinstance(ref, TensorRef) and ref.value is not None:
            return self.tags.get(ref.value, [])
        return []

    def set_tags(self, op: Op, tags: list[Tag], index: int = 0) -> None:
        if len(op.outputs) > index:
            self.tags[op.outputs[index]] = tags
