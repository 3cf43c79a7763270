"""The option every sensitivity method of this plugin spells the same way: ``normalize``.

``normalize`` says what each channel group's scores are divided by, so that groups of different size and depth
compare on relative importance: ``"none"`` (nothing), ``"mean"`` or ``"median"``. ``TaylorLossSensitivity`` once
took it as a bool (``True`` for ``"mean"``); :func:`bool_normalize_alias` keeps that spelling working.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import field_validator

#: What a group's scores are divided by.
Normalize = Literal["none", "mean", "median"]


def bool_normalize_alias() -> Any:
    """A validator for an Options model's ``normalize`` that reads the old bool spelling: ``True`` as ``"mean"``
    and ``False`` as ``"none"`` (the same scores as before), with a DeprecationWarning."""

    def read_bool(cls: type, value: Any) -> Any:
        if isinstance(value, bool):
            unified = "mean" if value else "none"
            method = cls.__qualname__.rsplit(".", 1)[0]
            warnings.warn(f"{method}: normalize={value} is deprecated; write normalize={unified!r} (the same scores)",
                          DeprecationWarning, stacklevel=2)
            return unified
        return value

    return field_validator("normalize", mode="before")(classmethod(read_bool))
