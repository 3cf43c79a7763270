"""The config files: the search config (``AutoChannelPruneConfig``), the channel-prune config and override file
(``AMCTRetrainConfig``), and the selection and record files (``ScaleOffsetRecord``), read with ``file:line:column``
errors and written atomically."""

from acps_core.config.prune_config import (
    format_prune_config,
    load_override_config,
    parse_prune_config,
    validate_override_targets,
    write_prune_config,
)
from acps_core.config.search_config import load_search_config
from acps_core.config.settings import (
    MAX_CONFIG_BYTES,
    OVERRIDE_FILE_FIELDS,
    AMCTRetrainConfig,
    LayerDecision,
    SearchSettings,
    proto_float,
    resolve_layer,
)

__all__ = [
    "MAX_CONFIG_BYTES",
    "OVERRIDE_FILE_FIELDS",
    "AMCTRetrainConfig",
    "LayerDecision",
    "SearchSettings",
    "format_prune_config",
    "load_override_config",
    "load_search_config",
    "parse_prune_config",
    "proto_float",
    "resolve_layer",
    "validate_override_targets",
    "write_prune_config",
]
