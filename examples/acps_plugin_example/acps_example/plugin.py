"""The module the ``acps`` entry point names: it registers the methods by name."""

from __future__ import annotations

from acps_core.plugin import Register, hookimpl


@hookimpl
def acps_register_sensitivities(register: Register) -> None:
    from acps_example.methods import ActivationSensitivity

    register("ActivationSensitivity", ActivationSensitivity)


@hookimpl
def acps_register_gain_estimators(register: Register) -> None:
    from acps_example.methods import ParameterCount

    register("ParameterCount", ParameterCount)
