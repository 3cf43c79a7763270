"""Read, check and write acps's two config files.

* The search config: protobuf text format of ``AutoChannelPruneConfig`` (SPEC section 2), loaded into a frozen
  :class:`SearchSettings` by :func:`load_search_config`.
* The channel-prune config: protobuf text format of ``AMCTRetrainConfig`` (SPEC section 3), read by
  :func:`parse_prune_config`, read as an override file (skip and override entries only) by
  :func:`load_override_config`, and written by :func:`write_prune_config`.

Every problem with a file is a :class:`~acps_core.errors.ConfigError` whose message starts with
``file:line:column`` where the text allows it, names the field and the value at fault, and says what is valid.
Which setting applies to a layer is decided in one place, :func:`resolve_layer`.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import struct
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from acps_core._util.atomic import StrPath, atomic_write_many
from acps_core._util.reading import LIMITS, read_bytes
from acps_core.errors import ConfigError
from acps_core.proto import basic_info_pb2, retrain_config_pb2

logger = logging.getLogger(__name__)

AMCTRetrainConfig = retrain_config_pb2.AMCTRetrainConfig

#: The default size limit of a config file (``ACPS_MAX_CONFIG_BYTES`` raises it; see :mod:`acps_core._util.reading`).
MAX_CONFIG_BYTES = LIMITS["config"][1]

#: The entries an override file may hold (SPEC section 2, ``override_prune_cfg``).
OVERRIDE_FILE_FIELDS = (
    "skip_layers", "skip_layer_types", "regular_prune_skip_layers", "regular_prune_skip_types",
    "override_layer_configs", "override_layer_types",
)
_SKIP_LAYER_FIELDS = ("skip_layers", "regular_prune_skip_layers")
_SKIP_TYPE_FIELDS = ("skip_layer_types", "regular_prune_skip_types")

#: Prefixes that wrappers put before every layer name, and the wrappers.
_WRAPPER_PREFIXES = {"module": "nn.DataParallel or DistributedDataParallel", "_orig_mod": "torch.compile"}

_CONFIG_KIND_SEARCH = "search config"
_CONFIG_KIND_PRUNE = "channel-prune config"
_CONFIG_KIND_OVERRIDE = "override file"


# ----------------------------------------------------------------------------------------------------
# Settings and decisions
# ----------------------------------------------------------------------------------------------------


class SearchSettings(BaseModel):
    """The validated search config (``AutoChannelPruneConfig``), as the search uses it.

    Attributes:
        compress_ratio: original cost / pruned cost; finite and > 1.
        ascend_optimized: keep channel counts multiples of 16.
        max_prune_ratio: the largest fraction of its channels any one layer may lose; in (0, 1].
        test_iteration: number of calibration passes; >= 1.
        override_prune_cfg: absolute path of the override file, or None.
        source: absolute path of the search config this came from, or None when built in code.

    Raises:
        pydantic.ValidationError: when built directly with an invalid value (:func:`load_search_config` raises
            :class:`~acps_core.errors.ConfigError` instead, naming the file and line).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    compress_ratio: float = Field(gt=1, allow_inf_nan=False)
    ascend_optimized: bool = True
    max_prune_ratio: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    test_iteration: int = Field(default=1, ge=1)
    # Optional[...] rather than "X | None": pydantic evaluates these annotations at runtime, and the package
    # still supports Python 3.9.
    override_prune_cfg: Optional[Path] = None  # noqa: UP045
    source: Optional[Path] = None  # noqa: UP045

    @field_validator("override_prune_cfg", "source")
    @classmethod
    def _require_absolute(cls, value: Path | None) -> Path | None:
        """Relative paths would silently depend on the current directory; the loader resolves them first."""
        if value is not None and not value.is_absolute():
            raise ValueError(f"must be an absolute path, got {os.fspath(value)!r}")
        return value


@dataclass(frozen=True)
class LayerDecision:
    """What a channel-prune config says about one layer (see :func:`resolve_layer`).

    Attributes:
        source: which rule decided: ``"skip"`` (a skip list names the layer or its type), ``"override_layer"``
            (an ``override_layer_configs`` entry), ``"override_type"`` (an ``override_layer_types`` entry),
            ``"global"`` (the file's ``prune_config``) or ``"none"`` (nothing applies).
        prune_ratio: pruned / total output channels set by that rule; None when it sets no channel pruning
            (skip, none, or a rule whose ``prune_config`` holds no ``filter_pruner``).
        ascend_optimized: the rule's ``ascend_optimized`` (default true); None when ``prune_ratio`` is None.
    """

    source: Literal["skip", "override_layer", "override_type", "global", "none"]
    prune_ratio: float | None
    ascend_optimized: bool | None


def resolve_layer(cfg: AMCTRetrainConfig, layer_name: str, layer_type: str) -> LayerDecision:
    """Decide which entry of a channel-prune config applies to one layer; the only place these rules live.

    Precedence (SPEC section 3): a layer named in, or of a type named in, any skip list (``skip_layers``
    united with ``regular_prune_skip_layers``, ``skip_layer_types`` with ``regular_prune_skip_types``) is
    never pruned; otherwise ``override_layer_configs`` (by name) beats ``override_layer_types`` (by type),
    which beats the global ``prune_config``. As in the reference, an override entry without a
    ``prune_config`` sets nothing for pruning and is passed over.

    Args:
        cfg: the parsed channel-prune config.
        layer_name: the layer's ``model.named_modules()`` name, e.g. ``"layer1.0.conv1"``.
        layer_type: ``type(module).__name__``, e.g. ``"Conv2d"`` or ``"Linear"``.

    Returns:
        The decision and the rule that made it.
    """
    skipped_by_name = any(layer_name in getattr(cfg, field) for field in _SKIP_LAYER_FIELDS)
    skipped_by_type = any(layer_type in getattr(cfg, field) for field in _SKIP_TYPE_FIELDS)
    if skipped_by_name or skipped_by_type:
        return LayerDecision("skip", None, None)
    for entry in cfg.override_layer_configs:
        if entry.layer_name == layer_name and entry.HasField("prune_config"):
            return _decision("override_layer", entry.prune_config)
    for type_entry in cfg.override_layer_types:
        if type_entry.layer_type == layer_type and type_entry.HasField("prune_config"):
            return _decision("override_type", type_entry.prune_config)
    if cfg.HasField("prune_config"):
        return _decision("global", cfg.prune_config)
    return LayerDecision("none", None, None)


def _decision(source: Literal["override_layer", "override_type", "global"],
              prune_config: retrain_config_pb2.PruneConfig) -> LayerDecision:
    """The decision a ``PruneConfig`` makes; only filter pruning removes channels."""
    if prune_config.HasField("filter_pruner") and \
            prune_config.filter_pruner.HasField("balanced_l2_norm_filter_prune"):
        algo = prune_config.filter_pruner.balanced_l2_norm_filter_prune
        return LayerDecision(source, proto_float(algo.prune_ratio), bool(algo.ascend_optimized))
    return LayerDecision(source, None, None)


def named_layers(cfg: AMCTRetrainConfig) -> set[str]:
    """Every layer name a channel-prune config mentions (skip lists and ``override_layer_configs``)."""
    names = {name for field in _SKIP_LAYER_FIELDS for name in getattr(cfg, field)}
    names.update(entry.layer_name for entry in cfg.override_layer_configs)
    return names


def named_types(cfg: AMCTRetrainConfig) -> set[str]:
    """Every layer type a channel-prune config mentions (skip type lists and ``override_layer_types``)."""
    types = {name for field in _SKIP_TYPE_FIELDS for name in getattr(cfg, field)}
    types.update(entry.layer_type for entry in cfg.override_layer_types)
    return types


def proto_float(value: float) -> float:
    """The shortest decimal that is the same 32-bit float: ``0.8`` rather than ``0.800000011920929``.

    Protobuf ``float`` fields hold 32-bit floats; Python reads them back widened, with noise digits that would
    leak into ratios and messages.
    """
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.unpack("<f", struct.pack("<f", candidate))[0] == value:
                return candidate
        except OverflowError:
            continue
    return value


# ----------------------------------------------------------------------------------------------------
# Locating fields in the text, for file:line in messages
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FieldSite:
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


class _TextMap:
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

    def _scan(self) -> list[_FieldSite]:
        sites: list[_FieldSite] = []
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
            sites.append(_FieldSite(name, line, column, block_id(), opens, value))

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

    def find(self, name: str, block: int = 0) -> list[_FieldSite]:
        """Every site of ``name`` directly inside ``block`` (0 = the top level), in file order."""
        return [site for site in self.sites if site.name == name and site.block == block]

    def first(self, name: str, block: int = 0) -> _FieldSite | None:
        """The first site of ``name`` in ``block``, or None."""
        found = self.find(name, block)
        return found[0] if found else None

    def element(self, name: str, index: int, block: int = 0) -> _FieldSite | None:
        """The site of element ``index`` of repeated field ``name`` in ``block``, or None."""
        found = self.find(name, block)
        return found[index] if index < len(found) else None

    def path(self, dotted: str) -> _FieldSite | None:
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


def _line(site: _FieldSite | None) -> int | None:
    return site.line if site is not None else None


# ----------------------------------------------------------------------------------------------------
# Reading and parsing
# ----------------------------------------------------------------------------------------------------


def _read_config_text(path: Path, kind: str) -> str:
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
    if not _TextMap(text).tokens:
        raise ConfigError(f"{kind} is empty (nothing but whitespace and comments); {_EMPTY_HINT[kind]}",
                          shown)
    return text


_EMPTY_HINT = {
    _CONFIG_KIND_SEARCH: "it must set at least compress_ratio, e.g. `compress_ratio: 1.5`",
    _CONFIG_KIND_PRUNE: "it must hold a prune_config, override or skip entries",
    _CONFIG_KIND_OVERRIDE: "add skip or override entries, or drop override_prune_cfg from the search config",
}


def _short_type(full_name: str) -> str:
    """A message name without acps's proto package, which users never write."""
    return full_name.rsplit(".", 1)[-1]


def _field_names(descriptor: Descriptor) -> list[str]:
    return [field.name for field in descriptor.fields]


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


def _parse_text(text: str, message: Message, path: Path, kind: str) -> _TextMap:
    """Parse ``text`` into ``message`` and return the text's field map.

    Raises:
        ConfigError: with the file, line and column of the syntax error and a plain-words reason.
    """
    text_map = _TextMap(text)
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise _parse_error(exc, message, path, kind, text_map) from exc
    except (MemoryError, RecursionError) as exc:  # e.g. thousands of nested "{" in random bytes
        raise ConfigError(f"{kind} is not valid protobuf text format: the parser gave up ({type(exc).__name__}); "
                          "give the text file of the config", os.fspath(path)) from exc
    return text_map


def _parse_error(exc: text_format.ParseError, message: Message, path: Path, kind: str,
                 text_map: _TextMap) -> ConfigError:
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
        valid = _field_names(owner)
        text = (f'unknown field "{name}" in {owner.name}; {_did_you_mean(name, valid)}'
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
    if kind == _CONFIG_KIND_SEARCH and owner.name == "AutoChannelPruneConfig" \
            and name in _field_names(AMCTRetrainConfig.DESCRIPTOR):
        return (f" ({name} belongs in a channel-prune config: is this the override file? Put its path in "
                "override_prune_cfg and pass the search config, with compress_ratio, here)")
    if kind != _CONFIG_KIND_SEARCH and owner.name == "AMCTRetrainConfig":
        if name in _field_names(basic_info_pb2.AutoChannelPruneConfig.DESCRIPTOR):
            return f" ({name} belongs in the search config, AutoChannelPruneConfig, not in a {kind})"
        if kind == _CONFIG_KIND_OVERRIDE:
            return f" (an override file may hold only {' / '.join(OVERRIDE_FILE_FIELDS)})"
    return ""


# ----------------------------------------------------------------------------------------------------
# The search config
# ----------------------------------------------------------------------------------------------------


def load_search_config(path: StrPath) -> SearchSettings:
    """Read and check a search config (protobuf text format of ``AutoChannelPruneConfig``).

    A relative ``override_prune_cfg`` is resolved against the config file's folder; the override file must
    exist and must not be the config itself (its content is checked by :func:`load_override_config`).

    Args:
        path: the search config file.

    Returns:
        The validated settings, with absolute ``override_prune_cfg`` and ``source`` paths.

    Raises:
        ConfigError: the file is missing, a directory, too large, binary, not UTF-8, empty or not valid text
            format; a field is unknown, given twice or out of range; ``compress_ratio`` is missing; or the
            override file does not exist. The message starts with ``file:line:column`` where known.
    """
    path = Path(os.fspath(path))
    shown = os.fspath(path)
    text = _read_config_text(path, _CONFIG_KIND_SEARCH)
    message = basic_info_pb2.AutoChannelPruneConfig()
    text_map = _parse_text(text, message, path, _CONFIG_KIND_SEARCH)

    def fail(field: str, value: object, reason: str) -> ConfigError:
        site = text_map.first(field)
        written = site.value if site is not None and site.value is not None else value
        return ConfigError(f"{field}: {written} {reason}", shown, _line(site))

    if not message.HasField("compress_ratio"):
        raise ConfigError(
            "compress_ratio is missing; the search config must set the compression target, e.g. "
            "`compress_ratio: 1.5` (original cost / pruned cost, greater than 1)", shown)
    compress_ratio = proto_float(message.compress_ratio)
    if not math.isfinite(compress_ratio) or compress_ratio <= 1:
        # A finite number written too large for the 32-bit field reads back as inf; `inf`, `-inf` or `nan`
        # written as such, or a huge negative number, need no such note.
        site = text_map.first("compress_ratio")
        written = (site.value if site is not None and site.value is not None else "").rstrip("fF")
        overflow = ""
        try:
            if compress_ratio == math.inf and math.isfinite(float(written)):
                overflow = " (too large for a 32-bit float)"
        except ValueError:
            pass  # not a decimal number: inf, infinity or nan as written
        raise fail("compress_ratio", compress_ratio,
                   f"is not valid{overflow}; it must be a finite number greater than 1 (original cost / "
                   "pruned cost: 1.5 keeps about 67 % of the cost, 2 keeps half)")
    max_prune_ratio = proto_float(message.max_prune_ratio)
    if not (0 < max_prune_ratio <= 1):
        raise fail("max_prune_ratio", max_prune_ratio,
                   "is out of range; it must be in (0, 1]: the largest fraction of its channels one layer "
                   "may lose (1 = no limit)")
    if message.test_iteration < 1:
        raise fail("test_iteration", message.test_iteration,
                   "is out of range; it must be an integer >= 1 (number of calibration passes)")

    override: Path | None = None
    if message.HasField("override_prune_cfg"):
        override = _resolve_override_path(message.override_prune_cfg, path, text_map)

    try:
        return SearchSettings(
            compress_ratio=compress_ratio,
            ascend_optimized=message.ascend_optimized,
            max_prune_ratio=max_prune_ratio,
            test_iteration=message.test_iteration,
            override_prune_cfg=override,
            source=path.resolve(),
        )
    except ValidationError as exc:  # pragma: no cover - the checks above cover every constraint
        raise ConfigError(f"invalid search config: {exc}", shown) from exc


def _resolve_override_path(raw: str, config_path: Path, text_map: _TextMap) -> Path:
    """The absolute override file a search config names, checked to exist and to be a separate file.

    Raises:
        ConfigError: at the line of ``override_prune_cfg``.
    """
    shown = os.fspath(config_path)
    line = _line(text_map.first("override_prune_cfg"))
    if not raw.strip():
        raise ConfigError("override_prune_cfg is empty; give the path of a channel-prune config holding skip "
                          "and override entries, or delete the line", shown, line)
    candidate = Path(raw).expanduser()
    if not candidate.is_absolute():
        # Relative to the config, not the current directory, so a config and its override move together.
        candidate = config_path.absolute().parent / candidate
    resolved = candidate.resolve()
    if not resolved.exists():
        raise ConfigError(
            f"override_prune_cfg: {raw!r} does not exist (resolved against the search config's folder to "
            f"{os.fspath(resolved)}); fix the path or delete the line", shown, line)
    if resolved.is_dir():
        raise ConfigError(
            f"override_prune_cfg: {raw!r} is a directory ({os.fspath(resolved)}); give the path of the "
            "channel-prune config file", shown, line)
    if resolved == config_path.resolve():
        raise ConfigError(
            f"override_prune_cfg: {raw!r} is this search config itself; it must name a separate "
            "channel-prune config (AMCTRetrainConfig text format) holding skip and override entries",
            shown, line)
    return resolved


# ----------------------------------------------------------------------------------------------------
# The channel-prune config
# ----------------------------------------------------------------------------------------------------


def parse_prune_config(path: StrPath) -> AMCTRetrainConfig:
    """Read and check a channel-prune config (protobuf text format of ``AMCTRetrainConfig``).

    Besides syntax, it checks that required fields are set (``layer_name``, ``layer_type``, ``prune_ratio``),
    that every ``prune_ratio`` is in [0, 1), that a ``filter_pruner`` names its algorithm, that no layer name
    or type has two override entries, and that no name is empty.

    Args:
        path: the channel-prune config file.

    Returns:
        The parsed message.

    Raises:
        ConfigError: naming the file, the line of the entry at fault, the value and what is valid.
    """
    path = Path(os.fspath(path))
    config, _ = _load_prune_config(path, _CONFIG_KIND_PRUNE)
    return config


def load_override_config(path: StrPath) -> AMCTRetrainConfig:
    """Read and check an override file: a channel-prune config with skip and override entries only.

    On top of :func:`parse_prune_config`'s checks: no global ``prune_config`` (the search decides it), and
    every override entry has a ``prune_config`` with
    ``filter_pruner { balanced_l2_norm_filter_prune { ... } }`` (``n_out_of_m_pruner`` is weight sparsity,
    not channel pruning).

    Args:
        path: the override file, as named by ``override_prune_cfg``.

    Returns:
        The parsed message.

    Raises:
        ConfigError: naming the file, the line of the entry at fault and what an override file may hold.
    """
    path = Path(os.fspath(path))
    shown = os.fspath(path)
    config, text_map = _load_prune_config(path, _CONFIG_KIND_OVERRIDE)
    allowed = " / ".join(OVERRIDE_FILE_FIELDS)
    for descriptor, _ in config.ListFields():
        if descriptor.name not in OVERRIDE_FILE_FIELDS:
            hint = (" (the search decides the global setting; give per-layer settings in "
                    "override_layer_configs)" if descriptor.name == "prune_config" else "")
            raise ConfigError(
                f"{descriptor.name} is not allowed in an override file; it may hold only {allowed}{hint}",
                shown, _line(text_map.first(descriptor.name)))
    for field, key in (("override_layer_configs", "layer_name"), ("override_layer_types", "layer_type")):
        for index, entry in enumerate(getattr(config, field)):
            site = text_map.element(field, index)
            what = f'{field} entry for "{getattr(entry, key)}"'
            expected = ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: R } } } "
                        "with R in [0, 1)")
            if not entry.HasField("prune_config"):
                skip = "layer in skip_layers" if key == "layer_name" else "type in skip_layer_types"
                raise ConfigError(f"{what} has no prune_config; give {expected}, or list the {skip} to "
                                  "keep it whole", shown, _line(site))
            if entry.prune_config.HasField("n_out_of_m_pruner"):
                raise ConfigError(
                    f"{what} uses n_out_of_m_pruner, which is 4:2 weight sparsity, not channel pruning; an "
                    f"override file for the channel search takes filter_pruner only: {expected}",
                    shown, _line(text_map.path(f"{field}[{index}].prune_config.n_out_of_m_pruner") or site))
            if not entry.prune_config.HasField("filter_pruner"):
                raise ConfigError(f"{what} has an empty prune_config; give {expected}", shown,
                                  _line(text_map.path(f"{field}[{index}].prune_config") or site))
    return config


def _load_prune_config(path: Path, kind: str) -> tuple[AMCTRetrainConfig, _TextMap]:
    """Read, parse and check a channel-prune config; the shared part of the two public readers."""
    text = _read_config_text(path, kind)
    config = AMCTRetrainConfig()
    text_map = _parse_text(text, config, path, kind)
    _check_prune_config(config, os.fspath(path), text_map)
    logger.debug("read %s %s", kind, path)
    return config, text_map


def _check_prune_config(config: AMCTRetrainConfig, shown: str | None, text_map: _TextMap | None) -> None:
    """The checks of :func:`parse_prune_config` that need the message only (lines come from ``text_map``).

    Raises:
        ConfigError: the first problem found, in file order of the checks.
    """
    def line_of(dotted: str) -> int | None:
        return _line(text_map.path(dotted)) if text_map is not None else None

    for missing in config.FindInitializationErrors():
        field = missing.rsplit(".", 1)[-1]
        parent = missing.rsplit(".", 1)[0] if "." in missing else ""
        hint = {
            "layer_name": 'e.g. layer_name: "layer1.0.conv1"',
            "layer_type": 'e.g. layer_type: "Conv2d"',
            "prune_ratio": "the fraction of output channels to remove, in [0, 1)",
        }.get(field, "")
        raise ConfigError(f"{missing} is missing; it is required{': ' + hint if hint else ''}", shown,
                          line_of(parent) if parent else None)

    for field in (*_SKIP_LAYER_FIELDS, *_SKIP_TYPE_FIELDS):
        for index, name in enumerate(getattr(config, field)):
            if not name.strip():
                noun = "type" if "type" in field else "name"
                raise ConfigError(f"{field} holds an empty name; delete it or give a layer {noun}",
                                  shown, line_of(f"{field}[{index}]"))

    prune_configs: list[tuple[str, retrain_config_pb2.PruneConfig]] = []
    if config.HasField("prune_config"):
        prune_configs.append(("prune_config", config.prune_config))
    for field, key in (("override_layer_configs", "layer_name"), ("override_layer_types", "layer_type")):
        first_index: dict[str, int] = {}
        for index, entry in enumerate(getattr(config, field)):
            name = getattr(entry, key)
            if not name.strip():
                raise ConfigError(f"{field}[{index}] has an empty {key}", shown, line_of(f"{field}[{index}]"))
            if name in first_index:
                earlier = line_of(f"{field}[{first_index[name]}]")
                also = f" (also at line {earlier})" if earlier is not None else ""
                raise ConfigError(
                    f'{key} "{name}" has two {field} entries{also}; keep one so it is clear which setting '
                    "applies", shown, line_of(f"{field}[{index}]"))
            first_index[name] = index
            if entry.HasField("prune_config"):
                prune_configs.append((f"{field}[{index}].prune_config", entry.prune_config))

    for where, prune_config in prune_configs:
        if not prune_config.HasField("filter_pruner"):
            continue
        if not prune_config.filter_pruner.HasField("balanced_l2_norm_filter_prune"):
            raise ConfigError(
                f"{where}.filter_pruner names no algorithm; give balanced_l2_norm_filter_prune "
                "{ prune_ratio: R } with R in [0, 1)", shown, line_of(f"{where}.filter_pruner"))
        ratio = proto_float(prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio)
        if not (0 <= ratio < 1):
            site_path = f"{where}.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio"
            site = text_map.path(site_path) if text_map is not None else None
            written = site.value if site is not None and site.value is not None else str(ratio)
            raise ConfigError(
                f"prune_ratio: {written} in {where} is out of range; it must be in [0, 1): the fraction of "
                "the layer's output channels to remove (1 would remove them all)", shown, _line(site))


def validate_override_targets(cfg: AMCTRetrainConfig, path: StrPath | None,
                              layers: Mapping[str, tuple[str, str | None]]) -> None:
    """Check that every skip and override entry of a config names something in the model.

    Args:
        cfg: the parsed override (or channel-prune) config.
        path: the file it came from, for ``file:line`` in messages; None when it was built in code.
        layers: every Conv/Linear layer of the model: name -> (``type(module).__name__``, the reason it cannot
            be pruned, or None when it can).

    Raises:
        ConfigError: at the line of the first bad entry, for a layer name not in the model (with close names),
            an ``override_layer_configs`` entry for a layer that cannot be pruned (with the reason), or a type
            that no layer of the model has (with the types present). Further problems are listed in the same
            message.
    """
    shown = os.fspath(path) if path is not None else None
    text_map: _TextMap | None = None
    if path is not None:
        try:
            text_map = _TextMap(read_bytes(path, "config", "config").decode("utf-8"))
        except (ConfigError, UnicodeDecodeError):
            logger.debug("cannot re-read %s for line numbers", path, exc_info=True)

    def line_of(field: str, index: int) -> int | None:
        return _line(text_map.element(field, index)) if text_map is not None else None

    problems: list[tuple[int | None, str]] = []
    for field in (*_SKIP_LAYER_FIELDS, "override_layer_configs"):
        entries = getattr(cfg, field)
        for index, entry in enumerate(entries):
            name = entry.layer_name if field == "override_layer_configs" else entry
            if name not in layers:
                close = difflib.get_close_matches(name, list(layers), n=3, cutoff=0.6)
                prefix, _, rest = name.partition(".")
                if prefix in _WRAPPER_PREFIXES and rest in layers:
                    hint = (f" (the config was written for the model wrapped in {_WRAPPER_PREFIXES[prefix]}, whose "
                            f"layers are named '{prefix}.*'; this model calls it {rest!r}: search the plain model "
                            "again, acps unwraps wrapped models itself)")
                elif close:
                    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)"
                elif layers:
                    hint = f" (names are model.named_modules() names, e.g. {next(iter(layers))!r})"
                else:
                    hint = " (the model has no Conv/Linear layer)"
                problems.append((line_of(field, index),
                                 f'{field} names layer "{name}", which is not a Conv/Linear layer of the '
                                 f"model{hint}"))
            elif field == "override_layer_configs" and layers[name][1] is not None:
                problems.append((line_of(field, index),
                                 f'override_layer_configs entry for "{name}": this layer cannot be pruned '
                                 f"({layers[name][1]}); delete the entry or move the layer to skip_layers"))

    present = sorted({layer_type for layer_type, _ in layers.values()})
    type_entries: list[tuple[str, int, str]] = [
        (field, index, name) for field in _SKIP_TYPE_FIELDS for index, name in enumerate(getattr(cfg, field))]
    type_entries += [("override_layer_types", index, entry.layer_type)
                     for index, entry in enumerate(cfg.override_layer_types)]
    for field, index, layer_type in type_entries:
        if layer_type not in present:
            problems.append((line_of(field, index),
                             f'{field} names layer type "{layer_type}", but no Conv/Linear layer of the '
                             f"model has it; {_did_you_mean(layer_type, present)}types present: "
                             f"{', '.join(present) or 'none'} (types are type(module).__name__)"))

    if problems:
        line, message = problems[0]
        if len(problems) > 1:
            message += "; also: " + "; ".join(
                (f"line {other_line}: " if other_line is not None else "") + other
                for other_line, other in problems[1:])
        raise ConfigError(message, shown, line)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def format_prune_config(cfg: AMCTRetrainConfig) -> str:
    """The text format of a channel-prune config: fields in field-number order, floats in shortest form.

    The same message always gives the same text, so outputs can be compared and diffed.
    """
    return text_format.MessageToString(cfg)


def write_prune_config(path: StrPath, cfg: AMCTRetrainConfig,
                       extra: Mapping[StrPath, str | bytes | None] | None = None, header: str = "") -> None:
    """Check a channel-prune config and write it, with any sidecar files, atomically.

    Every file is written to a temporary file first; the targets are replaced only once all of them are
    written (see :func:`acps_core.atomic.atomic_write_many`).

    Args:
        path: the config file to write.
        cfg: the config; it must pass :func:`parse_prune_config`'s checks, so the file can be read back.
        extra: further files to write alongside (path -> text), e.g. a report; None for a file the set no
            longer has (removed if it exists).
        header: comment lines (each starting with ``#``) put before the config; parsers ignore them.

    Raises:
        ConfigError: ``cfg`` fails the checks (a required field unset, a ratio out of range, ...).
        acps_core.errors.OutputPathError: a path cannot be written.
    """
    try:
        _check_prune_config(cfg, None, None)
        if not cfg.ListFields():
            raise ConfigError("it is empty (no prune_config, override or skip entry), which no reader accepts")
    except ConfigError as exc:
        raise ConfigError(
            f"refusing to write {os.fspath(path)}: the channel-prune config is invalid: {exc}") from exc
    if any(line and not line.startswith("#") for line in header.splitlines()):
        raise ValueError("header lines must be comments starting with '#'")
    if header and not header.endswith("\n"):
        # Without it the first config line would join the last comment line and be ignored.
        header += "\n"
    contents: dict[StrPath, str | bytes | None] = {path: header + format_prune_config(cfg)}
    for extra_path, text in (extra or {}).items():
        contents[extra_path] = text
    atomic_write_many(contents)
    logger.info("wrote channel-prune config %s", os.fspath(path))


__all__ = [
    "MAX_CONFIG_BYTES",
    "OVERRIDE_FILE_FIELDS",
    "AMCTRetrainConfig",
    "LayerDecision",
    "SearchSettings",
    "format_prune_config",
    "load_override_config",
    "load_search_config",
    "named_layers",
    "named_types",
    "parse_prune_config",
    "proto_float",
    "resolve_layer",
    "validate_override_targets",
    "write_prune_config",
]
