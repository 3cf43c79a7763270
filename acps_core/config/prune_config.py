"""The channel-prune config (protobuf text format of ``AMCTRetrainConfig``): read and checked by
:func:`parse_prune_config`, read as an override file (skip and override entries only) by
:func:`load_override_config`, checked against a model by :func:`validate_override_targets`, and written
atomically by :func:`write_prune_config`.

Every problem with a file is a :class:`~acps_core.errors.ConfigError` whose message starts with
``file:line:column`` where the text allows it, names the field and the value at fault, and says what is valid.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import text_format

from acps_core._util.atomic import StrPath, atomic_write_many
from acps_core._util.reading import read_bytes
from acps_core.config.settings import (
    OVERRIDE_FILE_FIELDS,
    SKIP_LAYER_FIELDS,
    SKIP_TYPE_FIELDS,
    AMCTRetrainConfig,
    proto_float,
)
from acps_core.config.text import (
    OVERRIDE_FILE,
    PRUNE_CONFIG,
    TextMap,
    did_you_mean,
    parse_text,
    read_config_text,
    site_line,
)
from acps_core.errors import ConfigError
from acps_core.proto import retrain_config_pb2

logger = logging.getLogger(__name__)

#: Prefixes that wrappers put before every layer name, and the wrappers.
_WRAPPER_PREFIXES = {"module": "nn.DataParallel or DistributedDataParallel", "_orig_mod": "torch.compile"}


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
    config, _ = _load_prune_config(path, PRUNE_CONFIG)
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
    config, text_map = _load_prune_config(path, OVERRIDE_FILE)
    allowed = " / ".join(OVERRIDE_FILE_FIELDS)
    for descriptor, _ in config.ListFields():
        if descriptor.name not in OVERRIDE_FILE_FIELDS:
            hint = (" (the search decides the global setting; give per-layer settings in "
                    "override_layer_configs)" if descriptor.name == "prune_config" else "")
            raise ConfigError(
                f"{descriptor.name} is not allowed in an override file; it may hold only {allowed}{hint}",
                shown, site_line(text_map.first(descriptor.name)))
    for field, key in (("override_layer_configs", "layer_name"), ("override_layer_types", "layer_type")):
        for index, entry in enumerate(getattr(config, field)):
            site = text_map.element(field, index)
            what = f'{field} entry for "{getattr(entry, key)}"'
            expected = ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: R } } } "
                        "with R in [0, 1)")
            if not entry.HasField("prune_config"):
                skip = "layer in skip_layers" if key == "layer_name" else "type in skip_layer_types"
                raise ConfigError(f"{what} has no prune_config; give {expected}, or list the {skip} to "
                                  "keep it whole", shown, site_line(site))
            if entry.prune_config.HasField("n_out_of_m_pruner"):
                raise ConfigError(
                    f"{what} uses n_out_of_m_pruner, which is 4:2 weight sparsity, not channel pruning; an "
                    f"override file for the channel search takes filter_pruner only: {expected}",
                    shown, site_line(text_map.path(f"{field}[{index}].prune_config.n_out_of_m_pruner") or site))
            if not entry.prune_config.HasField("filter_pruner"):
                raise ConfigError(f"{what} has an empty prune_config; give {expected}", shown,
                                  site_line(text_map.path(f"{field}[{index}].prune_config") or site))
    return config


def _load_prune_config(path: Path, kind: str) -> tuple[AMCTRetrainConfig, TextMap]:
    """Read, parse and check a channel-prune config; the shared part of the two public readers."""
    text = read_config_text(path, kind)
    config = AMCTRetrainConfig()
    text_map = parse_text(text, config, path, kind)
    _check_prune_config(config, os.fspath(path), text_map)
    logger.debug("read %s %s", kind, path)
    return config, text_map


def _check_prune_config(config: AMCTRetrainConfig, shown: str | None, text_map: TextMap | None) -> None:
    """The checks of :func:`parse_prune_config` that need the message only (lines come from ``text_map``).

    Raises:
        ConfigError: the first problem found, in file order of the checks.
    """
    def line_of(dotted: str) -> int | None:
        return site_line(text_map.path(dotted)) if text_map is not None else None

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

    for field in (*SKIP_LAYER_FIELDS, *SKIP_TYPE_FIELDS):
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
                "the layer's output channels to remove (1 would remove them all)", shown, site_line(site))


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
    text_map: TextMap | None = None
    if path is not None:
        try:
            text_map = TextMap(read_bytes(path, "config", "config").decode("utf-8"))
        except (ConfigError, UnicodeDecodeError):
            logger.debug("cannot re-read %s for line numbers", path, exc_info=True)

    def line_of(field: str, index: int) -> int | None:
        return site_line(text_map.element(field, index)) if text_map is not None else None

    problems: list[tuple[int | None, str]] = []
    for field in (*SKIP_LAYER_FIELDS, "override_layer_configs"):
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
        (field, index, name) for field in SKIP_TYPE_FIELDS for index, name in enumerate(getattr(cfg, field))]
    type_entries += [("override_layer_types", index, entry.layer_type)
                     for index, entry in enumerate(cfg.override_layer_types)]
    for field, index, layer_type in type_entries:
        if layer_type not in present:
            problems.append((line_of(field, index),
                             f'{field} names layer type "{layer_type}", but no Conv/Linear layer of the '
                             f"model has it; {did_you_mean(layer_type, present)}types present: "
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
    return str(text_format.MessageToString(cfg))


def write_prune_config(path: StrPath, cfg: AMCTRetrainConfig,
                       extra: Mapping[StrPath, str | bytes | None] | None = None, header: str = "") -> None:
    """Check a channel-prune config and write it, with any sidecar files, atomically.

    Every file is written to a temporary file first; the targets are replaced only once all of them are
    written (see :func:`acps_core._util.atomic.atomic_write_many`).

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

