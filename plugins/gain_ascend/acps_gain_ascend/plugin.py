"""Registers the plugin's methods with acps (named by the ``acps`` entry point)."""

from __future__ import annotations

from acps_core.plugin import Register, hookimpl


@hookimpl
def acps_register_gain_estimators(register: Register) -> None:
    from acps_gain_ascend.ascend import AscendLatency
    from acps_gain_ascend.bit_complexity import BitComplexity
    from acps_gain_ascend.measured import MeasuredLatency

    register("BitComplexity", BitComplexity)
    register("AscendLatency", AscendLatency)
    register("MeasuredLatency", MeasuredLatency)
