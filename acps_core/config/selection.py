"""Which channels the search chose, in the reference's prune-record format.

The reference's channel-prune config holds only a prune ratio per layer, and its prune step picks the channels
again by filter L2 norm, throwing the search's choice away. acps keeps the config byte-compatible with the
reference's schema and writes the choice beside it, as a ``ScaleOffsetRecord`` text file (the format of the
record file the prune step writes): one ``prune_record`` per channel group that loses channels, with
``prune_index`` listing the channel indices removed from each layer. The file is named after the config with
``.selection`` appended (``prune.cfg`` -> ``prune.cfg.selection``), and the config's first lines name it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from google.protobuf import text_encoding, text_format

from acps_core._util.atomic import StrPath
from acps_core._util.reading import read_bytes
from acps_core._util.tensors import bits_checksum
from acps_core.errors import ConfigError
from acps_core.graph.model import ChannelGraph, ChannelUse
from acps_core.proto import scale_offset_record_pb2 as record_pb2

SELECTION_SUFFIX = ".selection"
#: The comment line that ties a config to the selection file and reports written with it.
OUTPUT_SET_LINE = "# acps output set: "
#: The comment line holding the fingerprint of the weights a search or prune step ran on.
FINGERPRINT_LINE = "# model fingerprint: "

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


def one_line(name: str) -> str:
    """``name`` fit for a comment line: control characters (a newline in a file name) written as escapes."""
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in name)


def new_output_set() -> str:
    """A new id for the files one search writes together: the UTC time and 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


#: What starts a fingerprint of the current kind (64-bit sums); one without it is of the older kind (32-bit).
FINGERPRINT_KIND = "2-"


def weights_fingerprint(model: torch.nn.Module, like: str | None = None) -> str:
    """A short fingerprint of every parameter and buffer of ``model`` (names, shapes, dtypes and bits).

    Cheap (one integer sum of each tensor's bits, on its own device, at memory speed), and it changes when the
    values change: it tells whether the prune step runs on the weights the search ran on. ``like``: a fingerprint
    read from a file, whose kind this one takes (files written before the current kind hold the older one).
    """
    older = like is not None and not like.startswith(FINGERPRINT_KIND)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_sparse or tensor.device.type == "meta":
            continue
        total = bits_checksum(tensor, torch.int32 if older else torch.int64)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{total}\n".encode())
    return ("" if older else FINGERPRINT_KIND) + digest.hexdigest()[:16]


@dataclass
class SelectionHeader:
    """What the comment lines of a selection or record file say (None where a line is missing)."""

    output_set: str | None = None
    fingerprint: str | None = None
    lines: dict[str, int] = field(default_factory=dict)


def read_header(text: str) -> SelectionHeader:
    """The output set and weights fingerprint named in the leading comment lines of ``text``."""
    header = SelectionHeader()
    for number, line in enumerate(text.splitlines()[:20], start=1):
        if not line.startswith("#"):
            break
        if line.startswith(OUTPUT_SET_LINE):
            header.output_set = line[len(OUTPUT_SET_LINE):].split()[0] if line[len(OUTPUT_SET_LINE):].split() else ""
            header.lines["output_set"] = number
        elif line.startswith(FINGERPRINT_LINE):
            header.fingerprint = line[len(FINGERPRINT_LINE):].strip()
            header.lines["fingerprint"] = number
    return header


def format_selection(record: record_pb2.ScaleOffsetRecord, config_name: str, output_set: str | None = None,
                     fingerprint: str | None = None) -> str:
    """Text of a selection file, with a header saying what it is, which output set it belongs to (the id the
    config's header carries too) and the fingerprint of the weights the search ran on."""
    header = (f"# Channels chosen by acps auto_channel_prune_search for {one_line(config_name)}.\n"
              "# create_prune_retrain_model removes exactly these when the config's ratios still match them.\n")
    if output_set is not None:
        header += f"{OUTPUT_SET_LINE}{output_set}\n"
    if fingerprint is not None:
        header += f"{FINGERPRINT_LINE}{fingerprint}\n"
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


@dataclass
class Selection:
    """A parsed selection or record file: producer name -> removed channel indices, and its header."""

    removed: dict[str, list[int]]
    header: SelectionHeader


def read_selection(path: StrPath, what: str = "selection file") -> Selection:
    """Parse a selection or record file (``ScaleOffsetRecord`` text format) and check every ``prune_index``.

    Raises:
        ConfigError: at the file's line: not a regular file, over the size limit, not valid text format, or a
            ``prune_index`` list that is negative, repeated, or given twice for one layer with other values.
    """
    shown = os.fspath(path)
    data = read_bytes(path, what, "record")
    try:
        text = data.decode("utf-8")
        record = _parse_record(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} is not UTF-8 text, so not a prune record", path=shown) from exc
    except text_format.ParseError as exc:
        raise ConfigError(f"not a valid prune record (ScaleOffsetRecord text format): {exc}", path=shown,
                          line=exc.GetLine() or None, column=exc.GetColumn() or None) from exc
    except (MemoryError, RecursionError) as exc:
        raise ConfigError(f"{what} is not valid ScaleOffsetRecord text format (the parser gave up)",
                          path=shown) from exc
    removed: dict[str, list[int]] = {}
    for prune in record.prune_record:
        for node in prune.producer:
            for attr in node.attr:
                if attr.name != "prune_index":
                    continue
                indices = list(attr.ints)
                problem = None
                if any(i < 0 for i in indices):
                    problem = f"negative channel index {min(indices)}"
                elif len(set(indices)) != len(indices):
                    repeated = sorted({i for i in indices if indices.count(i) > 1})
                    problem = f"repeated channel indices {repeated[:5]}"
                elif node.name in removed and sorted(removed[node.name]) != sorted(indices):
                    problem = "a second, different prune_index list for the same layer"
                if problem is not None:
                    raise ConfigError(f'the prune_index of layer "{node.name}" holds {problem}; every index must '
                                      "be a channel of the layer, listed once: rewrite the file with acps (search "
                                      "again, or create_prune_retrain_model for a record)",
                                      path=shown, line=_line_of_node(text, node.name))
                removed[node.name] = indices
    return Selection(removed, read_header(text))


#: A string, a comment, or a list of index values written ``ints: [1, 2, 3]`` (the list's values in group 1).
_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*|\bints\s*:\s*\[([0-9,\s]*)\]')
#: Decimal numbers as protobuf reads them (a leading 0 would make it octal), separated by commas.
_LIST = re.compile(r"\s*((0|[1-9][0-9]*)\s*(,\s*(0|[1-9][0-9]*)\s*)*)?")
#: ``i`` values at or above this stand for a list taken out of the text (an index is at most 2**31 in practice).
_LIFTED = 1 << 62


def _parse_record(text: str) -> record_pb2.ScaleOffsetRecord:
    """``text_format.Parse`` of a record, fast on the long index lists of a large model's record.

    protobuf's text parser reads a number at a time in Python (seconds for the 70,000 indices of a 1-B-parameter
    model), so each list of non-negative integers ``ints: [...]`` outside strings and comments is read here and
    stands in the text as ``i: <_LIFTED + its number>``, on the same lines; the lists are put back after the
    parse. A text that does not parse that way (an attribute with an ``i`` of its own) is parsed as it is, which
    also gives any error its own line and column.
    """
    lists: list[list[int]] = []

    def lift(match: re.Match[str]) -> str:
        body = match.group(1)
        if body is None or not _LIST.fullmatch(body):
            return match.group(0)
        values = [int(v) for v in body.replace(",", " ").split()]
        if any(v >= 1 << 63 for v in values):
            return match.group(0)
        lists.append(values)
        return f"i: {_LIFTED + len(lists) - 1}" + "\n" * match.group(0).count("\n")

    lifted = _TOKENS.sub(lift, text)
    record = record_pb2.ScaleOffsetRecord()
    if lists:
        try:
            text_format.Parse(lifted, record)
            if _put_back(record, lists):
                return record
        except text_format.ParseError:
            pass
        record = record_pb2.ScaleOffsetRecord()
    text_format.Parse(text, record)
    return record


def _put_back(record: record_pb2.ScaleOffsetRecord, lists: list[list[int]]) -> bool:
    """Put the lifted lists back in place of their ``i``; False when an attribute also has values written one by
    one (their order relative to the list is lost: the text is parsed as it is then)."""
    for prune in record.prune_record:
        for node in (*prune.producer, *prune.consumer):
            for attr in node.attr:
                if attr.HasField("i") and attr.i >= _LIFTED:
                    if attr.ints:
                        return False
                    values = lists[attr.i - _LIFTED]
                    attr.ClearField("i")
                    attr.ints.extend(values)
    return True


def _line_of_node(text: str, name: str) -> int | None:
    """The first line of ``text`` naming producer ``name`` (for messages)."""
    match = re.search(r'producer\s*\{\s*name:\s*"' + re.escape(text_encoding.CEscape(name, as_utf8=True)) + '"',
                      text)
    return text.count("\n", 0, match.start()) + 1 if match else None
