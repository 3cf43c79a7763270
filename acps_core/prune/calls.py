"""The prune step's public calls: ``create_prune_retrain_model`` (a pruned copy of the model as a channel-prune
config says, and the record of what was removed), ``restore_prune_retrain_model`` (the record replayed onto a fresh
model, and a fine-tuned checkpoint loaded into it) and ``replay_prune_record``.

These are the reference's downstream calls::

    pruned = create_prune_retrain_model(model, input_data, "prune.cfg", "prune.record")
    ...fine-tune pruned...
    restored = restore_prune_retrain_model(fresh_model, input_data, "prune.record", "prune.cfg", "tuned.pth")
    save_prune_retrain_model(restored, "model.onnx", input_data)

Channels are removed per channel group of the :class:`~acps_core.graph.model.ChannelGraph`, so every parameter
tied to a channel goes with it: producers' filters and biases, the norms and depthwise convs that follow, the
consumers' input columns.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acps_core._util.atomic import StrPath, atomic_write_text, reading
from acps_core._util.checkpoints import load_weights
from acps_core._util.data import check_dense, model_device
from acps_core._util.model_checks import check_initialized, check_model
from acps_core._util.paths import check_paths
from acps_core._util.reading import read_bytes
from acps_core._util.state import parameters_left_alone
from acps_core._util.tensors import tensors_in
from acps_core._util.wrappers import unwrap
from acps_core.config.prune_config import parse_prune_config
from acps_core.config.selection import (
    FINGERPRINT_KIND,
    FINGERPRINT_LINE,
    Selection,
    build_selection,
    format_selection,
    one_line,
    read_header,
    read_selection,
    selection_path,
    weights_fingerprint,
)
from acps_core.errors import ArgumentError, ConfigError, DataError
from acps_core.graph.model import ChannelGraph
from acps_core.prune.copying import inputs_of, model_input, path_argument, pruned_copy
from acps_core.prune.keep import check_indices, decide_keep

logger = logging.getLogger(__name__)

__all__ = [
    "WeightsChangedWarning",
    "create_prune_retrain_model",
    "pruned_with_record",
    "read_record",
    "replay_prune_record",
    "restore_prune_retrain_model",
]


def create_prune_retrain_model(model: nn.Module, input_data: Any, config_defination: StrPath,
                               record_file: StrPath, *, calibration_data: Any = None,
                               reconstruct: bool = True) -> nn.Module:
    """Prune a copy of ``model`` as a channel-prune config says, and write what was removed to ``record_file``.

    For each channel group whose producers the config prunes (``override_layer_configs`` > ``override_layer_types``
    > global ``prune_config``; skipped layers never), the kept count is ``kept_from_ratio`` of the producers'
    ``prune_ratio``. The channels removed are the ones the search chose when the config's selection file
    (``<config>.selection``, written by :func:`~acps_core.auto_channel_prune_search`) matches the count, else those
    with the smallest filter L2 norm (the reference's rule).

    The config and its selection file are read together (another acps process cannot replace them meanwhile),
    and must belong together: a selection file written with another config is an error. Every layer the config
    names must be a Conv/Linear layer of the model.

    Args:
        model: the trained model; it is not modified (a pruned deep copy is returned). A model wrapped in
            ``nn.DataParallel``, ``DistributedDataParallel`` or ``torch.compile`` is pruned through the module
            inside, and the pruned copy returned is that plain module (wrap it again to train it so).
        input_data: the model's input (a tensor or tuple of tensors) to trace and check the pruned model with.
        config_defination: path of the channel-prune config (the reference's spelling of the parameter).
        record_file: where to write the prune record (``ScaleOffsetRecord`` text format), atomically; it may not
            be the config or its selection file.
        calibration_data: acps's addition: real input samples shaped like ``input_data`` (a few are enough, e.g.
            16 images), the search's ``[data, label]`` pair (labels unused), or a DataLoader (its first batch is
            used). With them, the pruned model's BatchNorm running statistics are corrected for the removed
            channels (see :mod:`acps_core.prune.norm_correction`), so the model is usable before fine-tuning: the
            running statistics of the unpruned model otherwise drop it near chance at 2x and beyond. Without them
            the statistics are copied unchanged, as the reference does. Fine-tuning re-estimates them either way.
        reconstruct: acps's addition, used with ``calibration_data``: also re-fit the weights of the Conv and
            Linear layers that read removed channels, by least squares, so that they compute from the kept
            channels what they computed from all of them (see :mod:`acps_core.prune.reconstruction`). ``False`` keeps
            their weights as pruned (only the statistics are corrected).

    Returns:
        The pruned model, in the same train/eval mode as ``model``; its output shape is unchanged.

    Raises:
        ConfigError: the config cannot be read, names layers or types the model does not have, gives coupled
            layers different settings, or its selection file belongs to another config or removes channels the
            model does not have.
        GraphError: the model cannot be traced, or the pruned model does not run.
        DataError: ``input_data`` or ``calibration_data`` is not a tensor, tuple or dict of tensors, or
            ``calibration_data`` does not run through the model or gives NaN/Inf.
        OutputPathError: ``record_file`` cannot be written or is one of the inputs.
    """
    pruned, record_path, record_text = pruned_with_record(model, input_data, config_defination, record_file,
                                                          calibration_data=calibration_data, reconstruct=reconstruct)
    atomic_write_text(record_path, record_text)
    logger.info("wrote %s", record_path)
    return pruned


class WeightsChangedWarning(UserWarning):
    """The model's weights differ from those the search that wrote the config ran on."""


def pruned_with_record(model: nn.Module, input_data: Any, config_defination: StrPath, record_file: StrPath, *,
                       calibration_data: Any = None, reconstruct: bool = True,
                       extra_outputs: Sequence[tuple[str, StrPath | None]] = ()) -> tuple[nn.Module, Path, str]:
    """What :func:`create_prune_retrain_model` does, without writing the record: returns the pruned model, the
    record's path (checked writable) and its text, so that a caller can write it with other outputs as one set.
    ``extra_outputs`` are those other outputs, ``(role, path)``, checked with the record before any work."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, _ = unwrap(model)
    config_path = Path(path_argument(config_defination, "config_defination"))
    record_file = path_argument(record_file, "record_file")
    selection_file = selection_path(config_path)
    record_path = check_paths(reads=[("config_defination", config_path),
                                     ("the config's selection file", selection_file)],
                              writes=[("record_file", record_file), *extra_outputs])[0]
    if not isinstance(reconstruct, bool):
        raise ArgumentError(f"reconstruct must be True or False, got {reconstruct!r}")
    with reading(config_path, selection_file):  # no acps process replaces them while they are read
        cfg = parse_prune_config(config_path)
        selection = _selection_of(config_path, selection_file)
    device = model_device(model)
    check_model(model)  # before anything reads the weights: a lazy module cannot be read
    data = model_input(input_data, device)
    check_dense(data, "input_data")
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors_in(data)):
        raise DataError("input_data holds NaN or Inf: pass real, finite input samples")
    norm_data = None
    if calibration_data is not None:
        norm_data = model_input(inputs_of(calibration_data, data), device, "calibration_data")
        check_dense(norm_data, "calibration_data")
    fingerprint = weights_fingerprint(model)
    recorded = selection.header.fingerprint if selection is not None else None
    # A file written before the current kind of fingerprint is compared in its own kind.
    seen = fingerprint if recorded is None or recorded.startswith(FINGERPRINT_KIND) else weights_fingerprint(
        model, like=recorded)
    if recorded is not None and recorded != seen:
        message = (f"the model's weights differ from those auto_channel_prune_search ran on (fingerprint {seen}, "
                   f"{selection_file.name} says {recorded}), so the channels it chose may not suit them; prune the "
                   "trained model the search saw (on the command line: --weights TRAINED.pth when --model names a "
                   "factory)")
        warnings.warn(message, WeightsChangedWarning, stacklevel=3)
    removed = selection.removed if selection is not None else {}
    with parameters_left_alone(model):  # the copy shares the user's tensors while it is traced
        pruned, graph, keep = pruned_copy(
            model, data, lambda copy_, graph: decide_keep(copy_, graph, cfg, config_path, removed), norm_data,
            reconstruct)
    header = (f"# Prune record written by acps create_prune_retrain_model from {one_line(config_path.name)}: "
              f"the channel indices removed from each layer.\n{FINGERPRINT_LINE}{fingerprint}\n")
    text = format_selection(build_selection(graph, keep), config_path.name).split("\n", 2)[2]
    logger.info("pruned %d channel groups", len(keep))
    return pruned, record_path, header + text


def _selection_of(config_path: Path, selection_file: Path) -> Selection | None:
    """The config's selection file, checked to belong to it (None when there is none).

    Raises:
        ConfigError: the selection file carries another output set than the config (it was written by another
            search, or one of the two was copied or edited since).
    """
    if not os.path.lexists(selection_file):
        return None
    selection = read_selection(selection_file)
    config_set = read_header(read_bytes(config_path, "channel-prune config", "config").decode("utf-8",
                                                                                             "replace")).output_set
    if config_set is not None and selection.header.output_set is not None and \
            config_set != selection.header.output_set:
        raise ConfigError(f"{selection_file.name} belongs to another search (output set "
                          f"{selection.header.output_set}) than {config_path.name} (output set {config_set}): one of "
                          "them was replaced or copied since the search wrote them together; search again, or "
                          "delete the selection file to choose the channels by filter norm",
                          path=os.fspath(selection_file), line=selection.header.lines.get("output_set"))
    return selection


def read_record(record_file: StrPath) -> dict[str, list[int]]:
    """Producer name -> removed output channel indices, from a prune record file.

    Raises:
        ConfigError: the file is missing, not a regular file, over the size limit, not a valid record, or lists a
            negative or repeated channel index.
    """
    return read_selection(record_file, "record file").removed


def restore_prune_retrain_model(model: nn.Module, input_data: Any, record_file: StrPath,
                                config_defination: StrPath, pth_file: StrPath,
                                state_dict_name: str | None = None) -> nn.Module:
    """Replay a prune record onto a freshly built, unpruned model and load a fine-tuned checkpoint into it.

    Args:
        model: a newly built model of the same architecture as the one pruned; not modified (a copy is pruned).
            A wrapped model (``nn.DataParallel``, ``DistributedDataParallel``, ``torch.compile``) is restored
            through the module inside, which is returned.
        input_data: the model's input, to trace it.
        record_file: the record ``create_prune_retrain_model`` wrote.
        config_defination: the channel-prune config used then (checked to be a valid config; the record decides).
        pth_file: a checkpoint of the pruned, fine-tuned model: a state dict, or a dict holding one under
            ``state_dict_name``. Loaded with ``weights_only=True``: no code in the file is run.
        state_dict_name: the key of the state dict inside the checkpoint, if it is nested.

    Returns:
        The pruned model with the checkpoint's weights.

    Raises:
        ConfigError: a missing or invalid record or config, or a record that does not fit the model.
        DataError: a checkpoint that cannot be read or does not fit the pruned model.
    """
    parse_prune_config(path_argument(config_defination, "config_defination"))
    pth_file = path_argument(pth_file, "pth_file")
    pruned = replay_prune_record(model, input_data, record_file)
    load_weights(pruned, pth_file, "checkpoint", state_dict_name, role="pruned model")
    return pruned


def replay_prune_record(model: nn.Module, input_data: Any, record_file: StrPath) -> nn.Module:
    """A pruned copy of ``model`` with exactly the channels the record removed (no checkpoint loaded): what
    :func:`restore_prune_retrain_model` does before it loads the fine-tuned weights.

    Raises:
        ConfigError: a missing or invalid record, or one that does not fit the model (a layer it does not have,
            a channel index beyond a layer's channels, all of a layer's channels removed).
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, _ = unwrap(model)
    check_initialized(model)  # not check_weights: a fresh model awaiting a checkpoint may hold anything
    record_file = path_argument(record_file, "record_file")
    with reading(record_file):
        removed = read_record(record_file)
    data = model_input(input_data, model_device(model))
    check_dense(data, "input_data")

    def keep_of(copy_: nn.Module, graph: ChannelGraph) -> tuple[dict[int, list[int]], bool]:
        keep: dict[int, list[int]] = {}
        producers = {p: g for g in graph.groups for p in g.producers}
        unknown = [name for name in removed if name not in producers]
        if unknown:
            raise ConfigError(f"the record names {', '.join(unknown[:5])}, which the model has no channel group "
                              "for; restore needs a model of the architecture that was pruned", path=str(record_file))
        check_indices(removed, producers, record_file, "the record")
        for name, indices in removed.items():
            group = producers[name]
            kept = [c for c in range(group.channels) if c not in set(indices)]
            if group.id in keep and keep[group.id] != kept:
                raise ConfigError(f"the record removes different channels from {name} than from the other "
                                  f"producers of its group {group.name}", path=str(record_file))
            keep[group.id] = kept
        return keep, True  # the record was written by create_prune_retrain_model, which checked it

    with parameters_left_alone(model):
        pruned, _, _ = pruned_copy(model, data, keep_of)
    return pruned
