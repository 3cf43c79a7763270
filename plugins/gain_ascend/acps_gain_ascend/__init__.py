"""Cost models (gain estimators) for acps: ``BitComplexity``, the reference's default."""

from __future__ import annotations

from acps_gain_ascend.bit_complexity import BitComplexity

__all__ = ["BitComplexity"]
