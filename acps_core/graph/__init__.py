"""The channel graph: which channels of a model must be pruned together, traced on real data, and checked by
execution.

- :mod:`~acps_core.graph.model`: what the graph reports (``ChannelGraph``, ``ChannelGroup``, ``ChannelUse``,
  ``LayerGeometry``, ``LayerInfo``, ``ParamSlice``);
- :mod:`~acps_core.graph.trace`: recording one forward pass;
- :mod:`~acps_core.graph.spaces`: channel spaces, tags and their union-find;
- :mod:`~acps_core.graph.functions` and :mod:`~acps_core.graph.shapes`: the channel rule of each torch function;
- :mod:`~acps_core.graph.modules`: the channel rules of layers traced whole;
- :mod:`~acps_core.graph.build`: ``build_channel_graph``;
- :mod:`~acps_core.graph.verify`: the check by execution; :mod:`~acps_core.graph.masking`: masked channels.

The names below are importable from ``acps_core.graph`` itself (loaded when first used, so that importing this
package runs nothing).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("ChannelGraph", "ChannelGroup", "ChannelUse", "LayerGeometry", "LayerInfo", "ParamSlice",
                     "atom_size", "channel_atoms", "structure_problem", "structure_violation"),
                    "acps_core.graph.model"),
    "build_channel_graph": "acps_core.graph.build",
    "trace_sample": "acps_core.graph.trace",
    **dict.fromkeys(("CONV_TYPES", "TRANSPOSED_CONV_TYPES"), "acps_core.layers.conv"),
    "NORM_TYPES": "acps_core.layers.norm",
}
#: Names built here from the layer types (kept for code written against the older module).
_DERIVED = ("LINEAR_TYPES", "PRUNABLE_TYPES", "FOLLOWER_TYPES")

__all__ = sorted([*_EXPORTS, *_DERIVED])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _DERIVED:
        from torch import nn

        from acps_core.layers.conv import CONV_TYPES, TRANSPOSED_CONV_TYPES
        from acps_core.layers.norm import NORM_TYPES

        return {"LINEAR_TYPES": (nn.Linear,),
                "PRUNABLE_TYPES": (*CONV_TYPES, *TRANSPOSED_CONV_TYPES, nn.Linear),
                "FOLLOWER_TYPES": (*NORM_TYPES, nn.GroupNorm, nn.LayerNorm, nn.PReLU)}[name]
    raise AttributeError(f"module 'acps_core.graph' has no attribute {name!r}")
