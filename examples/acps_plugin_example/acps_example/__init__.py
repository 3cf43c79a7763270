"""An example third-party acps plugin: ``ActivationSensitivity`` and ``ParameterCount``."""

from __future__ import annotations

from acps_example.methods import ActivationSensitivity, ParameterCount

__all__ = ["ActivationSensitivity", "ParameterCount"]
