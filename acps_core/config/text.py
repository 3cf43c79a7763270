"""Reading a config file's text: the checks every file gets (size, binary, UTF-8, empty), protobuf's parse with
errors that say ``file:line:column`` and what to change, and a map from field paths to their place in the text
(:class:`TextMap`) so that later checks can name the line too."""

from __future__ import annotations

import difflib
import os
import re
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from acps_core._util.reading import read_bytes
from acps_core.config.settings import OVERRIDE_FILE_FIELDS, AMCTRetrainConfig
from acps_core.errors import ConfigError
from acps_core.proto import basic_info_pb2

#: The three kinds of config file, as messages name them.
SEARCH_CONFIG = "search config"
PRUNE_CONFIG = "channel-prune config"
OVERRIDE_FILE = "override file"


@dataclass(frozen=True)
class FieldSite:
    """Where one field value appears in a text-format file.

    An element of a repeated field gets its own site, also in list syntax (``skip_layers: ["a", "b"]``), so
    the i-th site of a field in a block is the i-th element of that field.
    """

    name: str
    line: int
    column: int
    block: int
    opens: int | None
    value: str | None


_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<comment>\#[^\n]*)
      | (?P<string>"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?)
      | (?P<word>[A-Za-z0-9_.+\-]+)
      | (?P<punct>.)""",
    re.VERBOSE,
)


class TextMap:
    """The field sites of a text-format file, found by a forgiving scan that never raises.

    It only needs to be right for text protobuf accepted, or accepted up to the error being reported.
    """

    def __init__(self, text: str) -> None:
        self._line_starts = [0] + [match.end() for match in re.finditer("\n", text)]
        self.tokens: list[tuple[str, str, int]] = [
            (match.lastgroup or "", match.group(), match.start())
            for match in _TOKEN.finditer(text)
            if match.lastgroup not in ("space", "comment")
        ]
        self.sites = self._scan()

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        index = bisect_right(self._line_starts, offset) - 1
        return index + 1, offset - self._line_starts[index] + 1

    def _scan(self) -> list[FieldSite]:
        sites: list[FieldSite] = []
        tokens = self.tokens
        # Frames: ("block", id) for a message body, ("list", field name) for "[...]" after "name:".
        frames: list[tuple[str, int | str]] = [("block", 0)]
        next_block = 1

        def block_id() -> int:
            for kind, ident in reversed(frames):
                if kind == "block":
                    return int(ident)
            return 0

        def site(name: str, offset: int, opens: int | None, value: str | None) -> None:
            line, column = self.position(offset)
            sites.append(FieldSite(name, line, column, block_id(), opens, value))

        index = 0
        while index < len(tokens):
            kind, text, offset = tokens[index]
            follow = tokens[index + 1][1] if index + 1 < len(tokens) else ""
            frame_kind, frame_value = frames[-1]
            if frame_kind == "list":
                if text in ("{", "<"):
                    site(str(frame_value), offset, next_block, None)
                    frames.append(("block", next_block))
                    next_block += 1
                elif text == "]":
                    frames.pop()
                elif kind in ("word", "string"):
                    site(str(frame_value), offset, None, text)
                index += 1
                continue
            if text in ("}", ">"):
                if len(frames) > 1:
                    frames.pop()
                index += 1
                continue
            if kind != "word" or follow not in (":", "{", "<"):
                index += 1
                continue
            # A field name: "name: value", "name: [..]", "name {..}" or "name: {..}".
            value_index = index + 2 if follow == ":" else index + 1
            value_kind, value_text, _ = (
                tokens[value_index] if value_index < len(tokens) else ("", "", offset))
            if value_text in ("{", "<"):
                site(text, offset, next_block, None)
                frames.append(("block", next_block))
                next_block += 1
                index = value_index + 1
            elif value_text == "[":
                frames.append(("list", text))
                index = value_index + 1
            else:
                site(text, offset, None, value_text if value_kind in ("word", "string") else None)
                index = value_index + 1 if value_kind in ("word", "string") else value_index
        return sites

    def find(self, name: str, block: int = 0) -> list[FieldSite]:
        """Every site of ``name`` directly inside ``block`` (0 = the top level), in file order."""
        return [site for site in self.sites if site.name == name and site.block == block]

    def first(self, name: str, block: int = 0) -> FieldSite | None:
        """The first site of ``name`` in ``block``, or None."""
        found = self.find(name, block)
        return found[0] if found else None

    def element(self, name: str, index: int, block: int = 0) -> FieldSite | None:
        """The site of element ``index`` of repeated field ``name`` in ``block``, or None."""
        found = self.find(name, block)
        return found[index] if index < len(found) else None

    def path(self, dotted: str) -> FieldSite | None:
        """The site of a protobuf field path such as ``override_layer_configs[1].prune_config``.

        A path through a field the text does not set stops at the deepest site found.
        """
        block, last = 0, None
        for part in dotted.split("."):
            match = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part)
            if match is None:
                break
            site = self.element(match.group(1), int(match.group(2) or 0), block)
            if site is None:
                break
            last = site
            if site.opens is None:
                break
            block = site.opens
        return last


def site_line(site: FieldSite | None) -> int | None:
    """The line of a site, or None when the text does not set the field."""
    return site.line if site is not None else None



def read_config_text(path: Path, kind: str) -> str:
    """The file's text, after the checks every config file gets (exists, size, binary, UTF-8, non-empty).

    Raises:
        ConfigError: naming the file and, for a decoding error, the line and column.
    """
    shown = os.fspath(path)
    data = read_bytes(path, kind, "config")
    if b"\x00" in data:
        line = data[:data.index(b"\x00")].count(b"\n") + 1
        raise ConfigError(
            f"{kind} holds binary data (a NUL byte on line {line}), not protobuf text format; give the text "
            "file (a serialized protobuf, a model or an archive cannot be read here)", shown, line)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        raise ConfigError(
            f"{kind} is not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded; protobuf text format "
            "is UTF-8, so save the file as UTF-8", shown, line, column) from exc
    # Editors on Windows may start UTF-8 files with a byte-order mark, which the protobuf parser rejects.
    text = text.removeprefix("\ufeff")
    if not TextMap(text).tokens:
        raise ConfigError(f"{kind} is empty (nothing but whitespace and comments); {_EMPTY_HINT[kind]}",
                          shown)
    return text


_EMPTY_HINT = {
    SEARCH_CONFIG: "it must set at least compress_ratio, e.g. `compress_ratio: 1.5`",
    PRUNE_CONFIG: "it must hold a prune_config, override or skip entries",
    OVERRIDE_FILE: "add skip or override entries, or drop override_prune_cfg from the search config",
}


def _short_type(full_name: str) -> str:
    """A message name without acps's proto package, which users never write."""
    return full_name.rsplit(".", 1)[-1]


def field_names(descriptor: Descriptor) -> list[str]:
    """The field names of a message type, in declaration order."""
    return [field.name for field in descriptor.fields]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"did you mean 'x'? "`` for up to three close candidates, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


def parse_text(text: str, message: Message, path: Path, kind: str) -> TextMap:
    """Parse ``text`` into ``message`` and return the text's field map.

    Raises:
        ConfigError: with the file, line and column of the syntax error and a plain-words reason.
    """
    text_map = TextMap(text)
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise _parse_error(exc, message, path, kind, text_map) from exc
    except (MemoryError, RecursionError) as exc:  # e.g. thousands of nested "{" in random bytes
        raise ConfigError(f"{kind} is not valid protobuf text format: the parser gave up ({type(exc).__name__}); "
                          "give the text file of the config", os.fspath(path)) from exc
    return text_map


def _parse_error(exc: text_format.ParseError, message: Message, path: Path, kind: str,
                 text_map: TextMap) -> ConfigError:
    """Turn protobuf's ParseError into a ConfigError that says what to change."""
    line, column = exc.GetLine(), exc.GetColumn()
    reason = re.sub(r"^\d+:\d+ : ", "", str(exc))
    reason = re.sub(r'"(?:\w+\.)+(\w+)"', r'"\1"', reason)
    shown = os.fspath(path)
    pool = message.DESCRIPTOR.file.pool

    unknown = re.search(r'Message type "([\w.]+)" has no field named "([^"]+)"', str(exc))
    if unknown:
        owner = pool.FindMessageTypeByName(unknown.group(1))
        name = unknown.group(2)
        valid = field_names(owner)
        text = (f'unknown field "{name}" in {owner.name}; {did_you_mean(name, valid)}'
                f"valid fields: {', '.join(valid)}")
        return ConfigError(text + _wrong_file_hint(name, owner, kind), shown, line, column)

    duplicate = re.search(r'should not have multiple "(\w+)" fields', str(exc))
    if duplicate:
        name = duplicate.group(1)
        sites = [site for site in text_map.sites if site.name == name]
        second = next((site for site in reversed(sites)
                       if (site.line, site.column) <= (line, column)), None)
        first = next((site for site in sites if second is not None and site.block == second.block), None)
        lines = (f" (lines {first.line} and {second.line})"
                 if first is not None and second is not None and first is not second else "")
        return ConfigError(
            f'"{name}" is given twice{lines}; it is not a repeated field, so keep one and delete the other',
            shown, second.line if second else line, second.column if second else column)

    oneof = re.search(r'Field "(\w+)" is specified along with field "(\w+)", another member of oneof "(\w+)"',
                      str(exc))
    if oneof:
        return ConfigError(
            f'"{oneof.group(1)}" and "{oneof.group(2)}" cannot both be set: they are alternatives '
            f"(oneof {oneof.group(3)}); keep one", shown, line, column)

    return ConfigError(f"syntax error, not valid protobuf text format for a {kind}: {reason}",
                       shown, line, column)


def _wrong_file_hint(name: str, owner: Descriptor, kind: str) -> str:
    """A hint when a field of the other config kind shows up (the two files are easy to swap)."""
    if kind == SEARCH_CONFIG and owner.name == "AutoChannelPruneConfig" \
            and name in field_names(AMCTRetrainConfig.DESCRIPTOR):
        return (f" ({name} belongs in a channel-prune config: is this the override file? Put its path in "
                "override_prune_cfg and pass the search config, with compress_ratio, here)")
    if kind != SEARCH_CONFIG and owner.name == "AMCTRetrainConfig":
        if name in field_names(basic_info_pb2.AutoChannelPruneConfig.DESCRIPTOR):
            return f" ({name} belongs in the search config, AutoChannelPruneConfig, not in a {kind})"
        if kind == OVERRIDE_FILE:
            return f" (an override file may hold only {' / '.join(OVERRIDE_FILE_FIELDS)})"
    return ""


# ----------------------------------------------------------------------------------------------------
# The search config
# ----------------------------------------------------------------------------------------------------
