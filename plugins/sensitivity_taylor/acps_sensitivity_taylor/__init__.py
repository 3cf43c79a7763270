"""Channel sensitivity methods for acps: first-order Taylor (``TaylorLossSensitivity``, the reference's default,
and ``NormalizedTaylorSensitivity``), its squared, Fisher-style accumulation (``FisherSensitivity``) and the
label-free filter norm (``BalancedL2NormSensitivity``)."""

from __future__ import annotations

from acps_sensitivity_taylor.norm import BalancedL2NormSensitivity
from acps_sensitivity_taylor.taylor import (
    FisherSensitivity,
    NormalizedTaylorSensitivity,
    OutputChangeSensitivity,
    TaylorLossSensitivity,
)

__all__ = ["BalancedL2NormSensitivity", "FisherSensitivity", "NormalizedTaylorSensitivity", "OutputChangeSensitivity",
           "TaylorLossSensitivity"]
