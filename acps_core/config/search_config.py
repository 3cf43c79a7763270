"""The search config: protobuf text format of ``AutoChannelPruneConfig``, read into a frozen
:class:`~acps_core.config.settings.SearchSettings` by :func:`load_search_config`."""

from __future__ import annotations

import math
import os
from pathlib import Path

from pydantic import ValidationError

from acps_core._util.atomic import StrPath
from acps_core.config.settings import SearchSettings, proto_float
from acps_core.config.text import SEARCH_CONFIG, TextMap, parse_text, read_config_text, site_line
from acps_core.errors import ConfigError
from acps_core.proto import basic_info_pb2


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
    text = read_config_text(path, SEARCH_CONFIG)
    message = basic_info_pb2.AutoChannelPruneConfig()
    text_map = parse_text(text, message, path, SEARCH_CONFIG)

    def fail(field: str, value: object, reason: str) -> ConfigError:
        site = text_map.first(field)
        written = site.value if site is not None and site.value is not None else value
        return ConfigError(f"{field}: {written} {reason}", shown, site_line(site))

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


def _resolve_override_path(raw: str, config_path: Path, text_map: TextMap) -> Path:
    """The absolute override file a search config names, checked to exist and to be a separate file.

    Raises:
        ConfigError: at the line of ``override_prune_cfg``.
    """
    shown = os.fspath(config_path)
    line = site_line(text_map.first("override_prune_cfg"))
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
