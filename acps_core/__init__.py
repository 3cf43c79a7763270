"""acps: automatic channel pruning search for PyTorch.

A drop-in replacement for the ``auto_channel_prune_search`` interface of Huawei's AMCT::

    import acps_core as acps
    acps.auto_channel_prune_search(model, "search.cfg", [data, labels], "prune.cfg",
                                   sensitivity="TaylorLossSensitivity", search_alg="GreedySearch")

Methods come from plugins registered under the ``acps`` entry-point group; ``acps plugins`` lists them.
"""

from __future__ import annotations

from acps_core import _compat
from acps_core._version import __version__
from acps_core.errors import (
    AcpsError,
    ArgumentError,
    ConfigError,
    DataError,
    DistributedError,
    GraphError,
    OutputPathError,
    PluginError,
    SearchError,
)
from acps_core.graph.build import build_channel_graph
from acps_core.graph.model import ChannelGraph, ChannelGroup, LayerGeometry
from acps_core.layers import LayerAdapter, register_layer, unregister_layer
from acps_core.methods.bases import GainEstimatorBase, SearchChannelBase, SensitivityBase
from acps_core.methods.hookspecs import hookimpl
from acps_core.prune.calls import WeightsChangedWarning, create_prune_retrain_model, restore_prune_retrain_model
from acps_core.prune.model_config import PerLayerWidthsWarning
from acps_core.prune.onnx import save_prune_retrain_model
from acps_core.report.result import LayerReport, SearchResult
from acps_core.search.problem import GraphInfo, PruneSearchConfig, SearchRecord
from acps_core.search.run import PruneTargetWarning, auto_channel_prune_search

_compat.install()  # old module names (acps_core.bases, acps_core.problem, ...) import as their new modules


def __getattr__(name: str) -> object:
    """``acps_core.masking`` and the other old module names, as attributes too (see :mod:`acps_core._compat`)."""
    return _compat.old_module(__name__, name)

__all__ = [
    "AcpsError",
    "ArgumentError",
    "ChannelGraph",
    "ChannelGroup",
    "ConfigError",
    "DataError",
    "DistributedError",
    "GainEstimatorBase",
    "GraphError",
    "GraphInfo",
    "LayerAdapter",
    "LayerGeometry",
    "LayerReport",
    "OutputPathError",
    "PerLayerWidthsWarning",
    "PluginError",
    "PruneSearchConfig",
    "PruneTargetWarning",
    "SearchChannelBase",
    "SearchError",
    "SearchRecord",
    "SearchResult",
    "SensitivityBase",
    "WeightsChangedWarning",
    "__version__",
    "auto_channel_prune_search",
    "build_channel_graph",
    "create_prune_retrain_model",
    "hookimpl",
    "register_layer",
    "restore_prune_retrain_model",
    "save_prune_retrain_model",
    "unregister_layer",
]
