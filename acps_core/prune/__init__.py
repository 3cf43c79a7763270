"""The prune step: a pruned copy of the model from a channel-prune config (``create_prune_retrain_model``), the
record of what was removed, its replay onto a fresh model (``restore_prune_retrain_model``), the repairs that
make a pruned model work before fine-tuning (BatchNorm correction, re-fit), and the ONNX export."""

from acps_core.prune.calls import (
    WeightsChangedWarning,
    create_prune_retrain_model,
    dropped_positions,
    largest_norm_channels,
    onnx_path,
    prune_channels,
    pruned_with_record,
    read_record,
    replay_prune_record,
    restore_prune_retrain_model,
    save_prune_retrain_model,
)

__all__ = [
    "WeightsChangedWarning",
    "create_prune_retrain_model",
    "dropped_positions",
    "largest_norm_channels",
    "onnx_path",
    "prune_channels",
    "pruned_with_record",
    "read_record",
    "replay_prune_record",
    "restore_prune_retrain_model",
    "save_prune_retrain_model",
]
