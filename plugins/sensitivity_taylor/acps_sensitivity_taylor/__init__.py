"""Channel sensitivity methods for acps: first-order Taylor (``TaylorLossSensitivity``, the reference's default,
``NormalizedTaylorSensitivity``, and Torch-Pruning's group form ``GroupTaylorSensitivity``), its squared,
Fisher-style accumulation (``FisherSensitivity``), the label-free output change (``OutputChangeSensitivity``), the
filter norm (``BalancedL2NormSensitivity``), the magnitude of every weight tied to a channel
(``GroupMagnitudeSensitivity``) and the measured output change of real cuts (``MeasuredSensitivity``)."""

from __future__ import annotations

from acps_sensitivity_taylor.measured import MeasuredSensitivity
from acps_sensitivity_taylor.norm import BalancedL2NormSensitivity, GroupMagnitudeSensitivity
from acps_sensitivity_taylor.taylor import (
    FisherSensitivity,
    GroupTaylorSensitivity,
    NormalizedTaylorSensitivity,
    OutputChangeSensitivity,
    TaylorLossSensitivity,
)

__all__ = ["BalancedL2NormSensitivity", "FisherSensitivity", "GroupMagnitudeSensitivity", "GroupTaylorSensitivity",
           "MeasuredSensitivity", "NormalizedTaylorSensitivity", "OutputChangeSensitivity", "TaylorLossSensitivity"]
