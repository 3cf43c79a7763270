"""AscendLatency: an analytic latency model of a layer on an Ascend AI Core.

The Cube unit of a Da Vinci core multiplies 16 x 16 fp16 fractals (16 x 32 for int8 operands) in one cycle, so a
layer's matrix work is done in whole fractals: its output positions and output channels are padded up to
multiples of 16, its input channels (times the kernel) to 16 (32 for int8), per conv group. Activations are
stored in the 5-D NC1HWC0 layout with C0 = 16 channels, so memory traffic is padded the same way. A layer's time
is the larger of its padded Cube work over the Cube's rate and its padded memory traffic over the bandwidth,
plus a fixed per-operator overhead (kernel launch and scheduling). Depthwise convolutions run on the Vector
unit, modelled as ``vector_share`` of the Cube's rate.

The result is a staircase: removing 3 channels from 67 saves a whole fractal, removing 3 from 64 saves nothing.
The search sees that exactly, because acps derives every cut's saving from ``layer_cost``.

Chip parameters are public peak figures (see :data:`CHIPS` for each source). Real kernels reach a fraction of
peak, which scales every layer alike and leaves the predicted speedups as they are. Override any figure with
keyword arguments, or pass a :class:`Chip` of your own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from acps_core import ArgumentError
from acps_core.plugin import GainEstimatorBase, LayerGeometry

#: Channels per fractal row/column (fp16), and per input column for int8 operands.
FRACTAL = 16
FRACTAL_INT8_K = 32


@dataclass(frozen=True)
class Chip:
    """Peak figures of one Ascend chip.

    Attributes:
        name: the chip.
        fp16_tflops: Cube peak in fp16 (TFLOPS; one multiply-accumulate is two operations).
        int8_tops: Cube peak with int8 operands (TOPS).
        bandwidth_gbs: off-chip memory bandwidth (GB/s).
        overhead_us: fixed time per operator (launch, scheduling), microseconds.
        vector_share: the Vector unit's multiply-accumulate rate as a share of the Cube's (depthwise convs).
        source: where the figures come from.
    """

    name: str
    fp16_tflops: float
    int8_tops: float
    bandwidth_gbs: float
    overhead_us: float
    vector_share: float = 1 / 16
    source: str = ""


CHIPS: dict[str, Chip] = {
    "Ascend910": Chip(
        "Ascend910", fp16_tflops=256.0, int8_tops=512.0, bandwidth_gbs=1200.0, overhead_us=5.0,
        source="Huawei, Hot Chips 31 (2019) Da Vinci talk and Ascend 910 launch: 32 Da Vinci cores, 256 TFLOPS "
               "fp16, 512 TOPS int8, 4 HBM2 stacks (1.2 TB/s); Cube of 16x16x16 fp16 / 8192 int8 MACs per cycle"),
    "AtlasA2": Chip(
        "AtlasA2", fp16_tflops=313.0, int8_tops=626.0, bandwidth_gbs=1600.0, overhead_us=5.0,
        source="Atlas 800T A2 / Ascend 910B class as publicly quoted: about 313 TFLOPS fp16, int8 twice that, "
               "64 GB HBM2e at about 1.6 TB/s"),
    "Ascend310": Chip(
        "Ascend310", fp16_tflops=8.0, int8_tops=16.0, bandwidth_gbs=47.8, overhead_us=10.0,
        source="Huawei Ascend 310 (Atlas 200/300 inference): 2 Da Vinci cores, 8 TFLOPS fp16, 16 TOPS int8, "
               "LPDDR4X (47.8 GB/s)"),
    "Ascend310P": Chip(
        "Ascend310P", fp16_tflops=70.0, int8_tops=140.0, bandwidth_gbs=204.8, overhead_us=8.0,
        source="Atlas 300I Pro datasheet: 140 TOPS int8, 70 TFLOPS fp16, LPDDR4X 204.8 GB/s"),
}

_INT8 = {torch.int8, torch.uint8, torch.qint8, torch.quint8}


def _up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


class AscendLatency(GainEstimatorBase):
    """Predicted latency of each layer on an Ascend chip, in microseconds (see the module docs).

    Args:
        chip: a name from :data:`CHIPS` (``Ascend910``, ``AtlasA2``, ``Ascend310``, ``Ascend310P``) or a
            :class:`Chip`.
        batch: samples per inference.
        **overrides: replace figures of the chip, e.g. ``bandwidth_gbs=900`` or ``overhead_us=0``.
    """

    unit = "us (Ascend model)"

    def __init__(self, chip: str | Chip = "Ascend910", batch: int = 1, **overrides: Any) -> None:
        if isinstance(chip, str):
            if chip not in CHIPS:
                raise ArgumentError(f"unknown Ascend chip {chip!r}; known: {', '.join(CHIPS)} (or pass a Chip)")
            chip = CHIPS[chip]
        unknown = set(overrides) - {f for f in Chip.__dataclass_fields__ if f != "name"}
        if unknown:
            raise ArgumentError(f"unknown chip figure(s) {', '.join(sorted(unknown))}; known: "
                                f"{', '.join(f for f in Chip.__dataclass_fields__ if f != 'name')}")
        if batch < 1:
            raise ArgumentError(f"batch must be at least 1, got {batch}")
        self.chip = replace(chip, **overrides)
        self.batch = batch

    def layer_cost(self, layer: LayerGeometry, in_channels: int, out_channels: int) -> float:
        """The layer's predicted time in microseconds at the given channel counts."""
        return self.layer_time(layer, in_channels, out_channels)[0]

    def layer_time(self, layer: LayerGeometry, in_channels: int, out_channels: int) -> tuple[float, float, float]:
        """(time, compute time, memory time) in microseconds; time = max of the two + the overhead."""
        int8 = layer.weight_dtype in _INT8
        k_fractal = FRACTAL_INT8_K if int8 else FRACTAL
        element_bytes = 1 if int8 else 2  # fp32 models run in fp16 on the Cube
        rate = (self.chip.int8_tops if int8 else self.chip.fp16_tflops) * 1e12 / 2  # MACs per second
        attention = layer.kind == "MultiheadAttention"
        if attention:  # tokens
            per_sample = layer.input_shape[1] if len(layer.input_shape) > 2 else 1
        else:
            per_sample = layer.output_positions
        positions = per_sample * self.batch
        kernel = math.prod(layer.kernel_size)
        if attention:
            tokens = _up(positions, FRACTAL)
            width = _up(out_channels, FRACTAL)
            # q, k and v projections, then the two attention products (self-attention)
            macs = 3 * tokens * width * _up(in_channels, k_fractal) + 2 * tokens * tokens * width
            weights = 3 * _up(in_channels, FRACTAL) * width
            compute = macs / rate
        elif layer.depthwise:
            channels = _up(in_channels, FRACTAL)
            macs = channels * positions * kernel
            weights = channels * kernel
            compute = macs / (rate * self.chip.vector_share)
        else:
            groups = layer.groups
            macs = (groups * _up(positions, FRACTAL) * _up(out_channels / groups, FRACTAL)
                    * _up(in_channels / groups, k_fractal) * kernel)
            weights = groups * _up(out_channels / groups, FRACTAL) * _up(in_channels / groups, FRACTAL) * kernel
            compute = macs / rate
        if attention or layer.kind == "Linear":
            spatial_in, spatial_out = math.prod(layer.input_shape[1:-1]), per_sample
        else:  # a transposed conv's output map is larger than the input positions it works on
            spatial_in, spatial_out = math.prod(layer.input_shape[2:]), math.prod(layer.output_shape[2:])
        activations = self.batch * (_up(in_channels, FRACTAL) * spatial_in + _up(out_channels, FRACTAL) * spatial_out)
        memory = (activations + weights) * element_bytes / (self.chip.bandwidth_gbs * 1e9)
        compute_us, memory_us = compute * 1e6, memory * 1e6
        return max(compute_us, memory_us) + self.chip.overhead_us, compute_us, memory_us
