"""Which channels the search chose, in the reference's prune-record format.

The reference's channel-prune config holds only a prune ratio per layer, and its prune step picks the channels
again by filter L2 norm, throwing the search's choice away. acps keeps the config byte-compatible with the
reference's schema and writes the choice beside it, as a ``ScaleOffsetRecord`` text file (the format of the
record file the prune step writes): one ``prune_record`` per channel group that loses channels, with
``prune_index`` listing the channel indices removed from each layer. The file is named after the config with
``.selection`` appended (``prune.cfg`` -> ``prune.cfg.selection``), and the config's first lines name it.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_encoding, text_format

from acps_core.graph import ChannelGraph, ChannelUse
from acps_core.proto import scale_offset_record_pb2 as record_pb2

SELECTION_SUFFIX = ".selection"

# Op types as the reference's record files name them (ONNX operator names).
_OP_TYPES = {"Conv1d": "Conv", "Conv2d": "Conv", "Conv3d": "Conv", "Linear": "Gemm",
             "BatchNorm1d": "BatchNormalization", "BatchNorm2d": "BatchNormalization",
             "BatchNorm3d": "BatchNormalization"}


def selection_path(output_cfg: str | Path) -> Path:
    """The selection file that belongs to a channel-prune config."""
    path = Path(output_cfg)
    return path.with_name(path.name + SELECTION_SUFFIX)


def _node(node: record_pb2.PruneNode, kind: str, begin: int, end: int, removed: list[int]) -> None:
    attrs = [("type", "s", _OP_TYPES.get(kind, kind).encode()), ("begin", "i", begin), ("end", "i", end)]
    for name, slot, value in attrs:
        attr = node.attr.add(name=name)
        attr.type = record_pb2.AttrProto.STRING if slot == "s" else record_pb2.AttrProto.INT
        setattr(attr, slot, value)
    index = node.attr.add(name="prune_index", type=record_pb2.AttrProto.INTS)
    index.ints.extend(removed)


def build_selection(graph: ChannelGraph, keep: dict[int, list[int]]) -> record_pb2.ScaleOffsetRecord:
    """One ``prune_record`` per group in ``keep`` (group id -> kept channel indices, sorted).

    Producers list the removed output channels; followers and consumers the removed positions of their own
    channel dimension (a consumer after a flatten loses ``block`` inputs per channel).
    """
    record = record_pb2.ScaleOffsetRecord()
    for group_id in sorted(keep):
        group = graph.group(group_id)
        kept = set(keep[group_id])
        removed = [c for c in range(group.channels) if c not in kept]
        prune = record.prune_record.add()
        for name in group.producers:
            _node(prune.producer.add(name=name), graph.module_type(name), 0, group.channels, removed)
        uses: list[ChannelUse] = [*group.followers, *group.consumers]
        for use in uses:
            _node(prune.consumer.add(name=use.layer), use.kind, use.offset, use.end(group.channels),
                  use.positions(removed, group.channels))
    return record


def format_selection(record: record_pb2.ScaleOffsetRecord, config_name: str) -> str:
    """Text of a selection file, with a header saying what it is."""
    header = (f"# Channels chosen by acps auto_channel_prune_search for {config_name}.\n"
              "# create_prune_retrain_model removes exactly these when the config's ratios still match them.\n")
    lines = [header.rstrip("\n")]
    for prune in record.prune_record:
        lines.append("prune_record {")
        for role, nodes in (("producer", prune.producer), ("consumer", prune.consumer)):
            for node in nodes:
                lines.append(f"  {role} {{ {_node_text(node)} }}")
        lines.append("}")
    return "\n".join(lines) + "\n"


def _node_text(node: record_pb2.PruneNode) -> str:
    """One node in text format on one line, as the reference writes them. Written directly: protobuf's printer
    formats every index of a long ``prune_index`` on its own, which dominated the prune step's time."""
    parts = [f'name: "{text_encoding.CEscape(node.name, as_utf8=True)}"']
    for attr in node.attr:
        kind = record_pb2.AttrProto.AttrType.Name(attr.type)
        if attr.type == record_pb2.AttrProto.STRING:
            value = f's: "{text_encoding.CEscape(attr.s, as_utf8=False)}"'
        elif attr.type == record_pb2.AttrProto.INT:
            value = f"i: {attr.i}"
        elif attr.type == record_pb2.AttrProto.INTS:
            value = f"ints: [{', '.join(map(str, attr.ints))}]"
        else:
            value = text_format.MessageToString(attr, as_one_line=True, use_short_repeated_primitives=True)
            parts.append(f"attr {{ {value} }}")
            continue
        parts.append(f'attr {{ name: "{attr.name}" type: {kind} {value} }}')
    return " ".join(parts)
