"""The channel graph: which channels of a model must be pruned together, traced on real data, and checked by
execution."""

from acps_core.graph.build import (
    CONV_TYPES,
    FOLLOWER_TYPES,
    LINEAR_TYPES,
    NORM_TYPES,
    PRUNABLE_TYPES,
    TRANSPOSED_CONV_TYPES,
    ChannelGraph,
    ChannelGroup,
    ChannelUse,
    LayerGeometry,
    LayerInfo,
    ParamSlice,
    atom_size,
    build_channel_graph,
    channel_atoms,
    structure_problem,
    structure_violation,
    trace_sample,
)

__all__ = [
    "CONV_TYPES",
    "FOLLOWER_TYPES",
    "LINEAR_TYPES",
    "NORM_TYPES",
    "PRUNABLE_TYPES",
    "TRANSPOSED_CONV_TYPES",
    "ChannelGraph",
    "ChannelGroup",
    "ChannelUse",
    "LayerGeometry",
    "LayerInfo",
    "ParamSlice",
    "atom_size",
    "build_channel_graph",
    "channel_atoms",
    "structure_problem",
    "structure_violation",
    "trace_sample",
]
