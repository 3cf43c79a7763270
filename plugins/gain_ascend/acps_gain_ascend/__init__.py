"""Cost models (gain estimators) for acps: ``BitComplexity`` (the reference's default), ``AscendLatency`` (an
analytic latency model of the Ascend AI Core) and ``MeasuredLatency`` (latency tables timed on the device)."""

from __future__ import annotations

from acps_gain_ascend.ascend import CHIPS, AscendLatency, Chip
from acps_gain_ascend.bit_complexity import BitComplexity
from acps_gain_ascend.measured import LatencyTable, MeasuredLatency

__all__ = ["CHIPS", "AscendLatency", "BitComplexity", "Chip", "LatencyTable", "MeasuredLatency"]
