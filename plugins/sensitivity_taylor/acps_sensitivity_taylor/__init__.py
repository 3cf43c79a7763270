"""First-order Taylor channel sensitivity for acps (``TaylorLossSensitivity``)."""

from __future__ import annotations

from acps_sensitivity_taylor.taylor import TaylorLossSensitivity

__all__ = ["TaylorLossSensitivity"]
