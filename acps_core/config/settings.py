"""What the config files mean: the validated search settings, and which entry of a channel-prune config applies
to a layer (:func:`resolve_layer`, the only place those rules live)."""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from acps_core._util.reading import LIMITS
from acps_core.proto import retrain_config_pb2

AMCTRetrainConfig = retrain_config_pb2.AMCTRetrainConfig

#: The default size limit of a config file (``ACPS_MAX_CONFIG_BYTES`` raises it; see :mod:`acps_core._util.reading`).
MAX_CONFIG_BYTES = LIMITS["config"][1]

#: The entries an override file may hold (``override_prune_cfg`` of the search config).
OVERRIDE_FILE_FIELDS = (
    "skip_layers", "skip_layer_types", "regular_prune_skip_layers", "regular_prune_skip_types",
    "override_layer_configs", "override_layer_types",
)
#: The skip lists by layer name and by layer type; a name or type in either list of a pair is skipped.
SKIP_LAYER_FIELDS = ("skip_layers", "regular_prune_skip_layers")
SKIP_TYPE_FIELDS = ("skip_layer_types", "regular_prune_skip_types")


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

    Precedence (as in AMCT): a layer named in, or of a type named in, any skip list (``skip_layers``
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
    skipped_by_name = any(layer_name in getattr(cfg, field) for field in SKIP_LAYER_FIELDS)
    skipped_by_type = any(layer_type in getattr(cfg, field) for field in SKIP_TYPE_FIELDS)
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

