"""Bit complexity: the reference's cost of a layer, MACs x activation bits x weight bits.

Unlike the reference, the MACs come from the layer's real traced geometry (its output feature-map size, or
token count for a Linear on a sequence), the activation bit width from the activation's dtype and the weight
bit width from the weight's dtype.
"""

from __future__ import annotations

import torch

from acps_core.plugin import GainEstimatorBase, LayerGeometry, MethodOptions


def dtype_bits(dtype: torch.dtype) -> int:
    """Bit width of a tensor element of ``dtype``."""
    if dtype.is_floating_point:
        return torch.finfo(dtype).bits
    if dtype == torch.bool:
        return 8
    return torch.iinfo(dtype).bits


class BitComplexity(GainEstimatorBase):
    """Cost = MACs(in_channels, out_channels) x activation bits x weight bits, per sample."""

    class Options(MethodOptions):
        """:class:`BitComplexity` takes no options."""

    unit = "bit-ops"

    def computation_cost(self, macs: float, dtype: torch.dtype) -> float:
        """The bit-operations of the matrix products outside the layers (weights taken at the activations' width)."""
        return macs * dtype_bits(dtype) ** 2

    def layer_cost(self, layer: LayerGeometry, in_channels: int, out_channels: int) -> float:
        """The layer's bit-operations per sample at the given channel counts."""
        return layer.macs(in_channels, out_channels) * dtype_bits(layer.dtype) * dtype_bits(layer.weight_dtype)
