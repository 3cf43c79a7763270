"""A module called more than once in one forward pass: CoaT's convolutional position encoding (one depthwise conv
every block of a stage calls on the residual stream), ALBERT's layers shared by all its blocks.

A call after the first reads the module's channels again. Where it reads them where the first call did (the same
positions of the same widths), the channels of both calls are one set: their groups are tied, so every call loses
the same channels (the module's parameters are sliced once, for all of them), and its output carries the first
call's channels. Its cost is counted once per call. Where a call reads them elsewhere, or its output has another
shape, the module and every channel it touched are left alone, with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from acps_core.graph.spaces import Tag
from acps_core.graph.trace import Op

if TYPE_CHECKING:
    from acps_core.graph.build import GroupBuilder


def remember_call(builder: GroupBuilder, op: Op, in_tags: list[Tag]) -> None:
    """Keep what a module's first call read and returned, for its later calls."""
    out = op.outputs[0] if op.outputs else None
    out_tags = list(builder.tags.get(out, [])) if out is not None else []
    shape = builder.recorder.shapes[out] if out is not None else None
    builder.first_calls[op.name] = (list(in_tags), out_tags, shape)


def called_again(builder: GroupBuilder, op: Op, in_tags: list[Tag]) -> bool:
    """A later call of a layer or norm that reads its channels where its first call did: tie them, tag its output
    as the first call's, count the call; False (nothing done) when it does not."""
    first = builder.first_calls.get(op.name)
    if first is None or not op.outputs:
        return False
    first_in, first_out, shape = first
    if builder.recorder.shapes[op.outputs[0]] != shape or len(in_tags) != len(first_in):
        return False
    if any(builder.spaces[t.space].folded for t in (*first_in, *first_out)):
        return False  # its first call's channels were re-expressed since (:mod:`acps_core.graph.repeats`)
    pairs = list(zip(sorted(first_in, key=_place), sorted(in_tags, key=_place)))
    if not all(a.same_place(b) for a, b in pairs):
        return False
    for a, b in pairs:
        builder.union(a.space, b.space, f"{op.name} is called again on these channels at {op.location}")
    builder.tags[op.outputs[0]] = list(first_out)
    entry = builder.layers.get(op.name)
    if entry is not None:
        entry["calls"] = entry.get("calls", 1) + 1
    return True


def _place(tag: Tag) -> tuple[int, int, int]:
    return tag.dim, tag.offset, tag.start
