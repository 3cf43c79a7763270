"""Registers the plugin's methods with acps (named by the ``acps`` entry point)."""

from __future__ import annotations

from acps_core.plugin import Register, hookimpl


@hookimpl
def acps_register_sensitivities(register: Register) -> None:
    from acps_sensitivity_taylor.measured import MeasuredSensitivity
    from acps_sensitivity_taylor.norm import BalancedL2NormSensitivity, GroupMagnitudeSensitivity
    from acps_sensitivity_taylor.taylor import (
        FisherSensitivity,
        GroupTaylorSensitivity,
        NormalizedTaylorSensitivity,
        OutputChangeSensitivity,
        TaylorLossSensitivity,
    )

    register("TaylorLossSensitivity", TaylorLossSensitivity)
    register("NormalizedTaylorSensitivity", NormalizedTaylorSensitivity)
    register("FisherSensitivity", FisherSensitivity)
    register("BalancedL2NormSensitivity", BalancedL2NormSensitivity)
    register("OutputChangeSensitivity", OutputChangeSensitivity)
    register("MeasuredSensitivity", MeasuredSensitivity)
    register("GroupMagnitudeSensitivity", GroupMagnitudeSensitivity)
    register("GroupTaylorSensitivity", GroupTaylorSensitivity)
