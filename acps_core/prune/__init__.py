"""The prune step: a pruned copy of the model from a channel-prune config (``create_prune_retrain_model``), the
record of what was removed, its replay onto a fresh model (``restore_prune_retrain_model``), the repairs that
make a pruned model work before fine-tuning (BatchNorm correction, re-fit), and the ONNX export.

- :mod:`~acps_core.prune.calls`: the public calls;
- :mod:`~acps_core.prune.keep`: which channels a config keeps;
- :mod:`~acps_core.prune.slicing`: cutting them out, layer by layer;
- :mod:`~acps_core.prune.copying`: the pruned copy, checked and repaired;
- :mod:`~acps_core.prune.norm_correction` and :mod:`~acps_core.prune.reconstruction`: the repairs;
- :mod:`~acps_core.prune.onnx`: the export.

The names below are importable from ``acps_core.prune`` itself (loaded when first used).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("WeightsChangedWarning", "create_prune_retrain_model", "pruned_with_record", "read_record",
                     "replay_prune_record", "restore_prune_retrain_model"), "acps_core.prune.calls"),
    **dict.fromkeys(("onnx_path", "save_prune_retrain_model"), "acps_core.prune.onnx"),
    "prune_channels": "acps_core.prune.slicing",
    "largest_norm_channels": "acps_core.prune.keep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'acps_core.prune' has no attribute {name!r}")
