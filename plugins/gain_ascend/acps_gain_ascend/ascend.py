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
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from pydantic import Field, model_validator

from acps_core.plugin import GainEstimatorBase, LayerGeometry, MethodOptions

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
#: The figures of a :class:`Chip` an option may override (every field but its name).
FIGURES = tuple(f.name for f in fields(Chip) if f.name != "name")
#: The figures a chip of one's own must give (the others have defaults).
REQUIRED_FIGURES = ("fp16_tflops", "int8_tops", "bandwidth_gbs", "overhead_us")


def _up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


class AscendLatency(GainEstimatorBase):
    """Predicted latency of each layer on an Ascend chip, in microseconds (see the module docs).

    Args:
        chip: a name from :data:`CHIPS` (``Ascend910``, ``AtlasA2``, ``Ascend310``, ``Ascend310P``), a
            :class:`Chip`, or the name of a chip of one's own whose figures ``fp16_tflops``, ``int8_tops``,
            ``bandwidth_gbs`` and ``overhead_us`` are all given.
        batch: samples per inference.
        **overrides: replace figures of the chip (:data:`FIGURES`), e.g. ``bandwidth_gbs=900`` or ``overhead_us=0``.

    Raises:
        MethodOptionsError: an unknown chip or figure, or a figure out of range (an ``ArgumentError``).
    """

    class Options(MethodOptions):
        """The options of :class:`AscendLatency`: the chip by name, the batch, and any figures that replace the
        chip's (None: the chip's own). A :class:`Chip` object is recorded as its name and the figures that differ
        from the chip of that name (all of them for a chip of one's own)."""

        chip: str = "Ascend910"
        batch: int = Field(default=1, ge=1)
        # Optional[...] rather than "X | None": pydantic evaluates these annotations at runtime on Python 3.9 too.
        fp16_tflops: Optional[float] = Field(default=None, gt=0)  # noqa: UP045
        int8_tops: Optional[float] = Field(default=None, gt=0)  # noqa: UP045
        bandwidth_gbs: Optional[float] = Field(default=None, gt=0)  # noqa: UP045
        overhead_us: Optional[float] = Field(default=None, ge=0)  # noqa: UP045
        vector_share: Optional[float] = Field(default=None, gt=0)  # noqa: UP045
        source: Optional[str] = None  # noqa: UP045

        @model_validator(mode="after")
        def _known_chip_or_every_figure(self) -> AscendLatency.Options:
            missing = [figure for figure in REQUIRED_FIGURES if getattr(self, figure) is None]
            if self.chip not in CHIPS and missing:
                raise ValueError(f"unknown Ascend chip {self.chip!r}; known: {', '.join(CHIPS)} (or, for a chip of "
                                 f"your own, also give {', '.join(missing)})")
            return self

    unit = "us (Ascend model)"

    def __init__(self, chip: str | Chip = "Ascend910", batch: int = 1, **overrides: float | str) -> None:
        if isinstance(chip, Chip):
            known = CHIPS.get(chip.name)
            figures = {figure: getattr(chip, figure) for figure in FIGURES
                       if known is None or getattr(chip, figure) != getattr(known, figure)}
            chip, overrides = chip.name, {**figures, **overrides}
        self.options = self.Options.checked(self, chip=chip, batch=batch, **overrides)
        given = {figure: getattr(self.options, figure) for figure in FIGURES
                 if getattr(self.options, figure) is not None}
        base = CHIPS.get(self.options.chip)
        if base is None:  # a chip of one's own: every required figure is given (the Options check it)
            base = Chip(self.options.chip, **{figure: given[figure] for figure in REQUIRED_FIGURES})
        self.chip = replace(base, **given)
        self.batch = self.options.batch

    def computation_cost(self, macs: float, dtype: torch.dtype) -> float:
        """The matrix products outside the layers on the Cube at its peak rate, in microseconds."""
        rate = (self.chip.int8_tops if dtype in _INT8 else self.chip.fp16_tflops) * 1e12 / 2
        return macs * self.batch / rate * 1e6

    def layer_cost(self, layer: LayerGeometry, in_channels: int, out_channels: int) -> float:
        """The layer's predicted time in microseconds at the given channel counts."""
        return self.layer_time(layer, in_channels, out_channels)[0]

    def layer_time(self, layer: LayerGeometry, in_channels: int, out_channels: int) -> tuple[float, float, float]:
        """(time, compute time, memory time) in microseconds; time = max of the two + the overhead."""
        int8 = layer.weight_dtype in _INT8
        k_fractal = FRACTAL_INT8_K if int8 else FRACTAL
        element_bytes = 1 if int8 else 2  # fp32 models run in fp16 on the Cube
        if layer.kind == "Embedding":  # a lookup: the rows it gathers, read and written once
            moved = 2 * self.batch * layer.output_positions * _up(out_channels, FRACTAL) * element_bytes
            memory_us = moved / (self.chip.bandwidth_gbs * 1e9) * 1e6
            return memory_us + self.chip.overhead_us, 0.0, memory_us
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
            # q, k and v projections, then the two attention products (self-attention), for each of its rows;
            # queries and keys are key_share times as wide as the values (and key/value heads fewer, kv_share)
            rows_per_channel = layer.projection_rows
            macs = layer.rows * (rows_per_channel * tokens * width * _up(in_channels, k_fractal)
                                 + (layer.key_share + 1) * tokens * tokens * width)
            weights = rows_per_channel * _up(in_channels, FRACTAL) * width
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
