"""The prune step: apply a channel-prune config to a model, physically, and replay it from a record file.

These are the reference's downstream calls (SPEC section 6)::

    pruned = create_prune_retrain_model(model, input_data, "prune.cfg", "prune.record")
    ...fine-tune pruned...
    restored = restore_prune_retrain_model(fresh_model, input_data, "prune.record", "prune.cfg", "tuned.pth")
    save_prune_retrain_model(restored, "model.onnx", input_data)

Channels are removed per channel group of the :class:`~acps_core.graph.ChannelGraph`, so every parameter tied
to a channel goes with it: producers' filters and biases, the norms and depthwise convs that follow, the
consumers' input columns.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from acps_core._util.atomic import StrPath, atomic_write_bytes, atomic_write_text, check_writable_output, reading
from acps_core._util.checkpoints import load_weights
from acps_core._util.data import check_dense, forward, model_device, tensors_in
from acps_core._util.model_checks import check_initialized, check_model
from acps_core._util.paths import check_paths
from acps_core._util.reading import read_bytes
from acps_core._util.state import parameters_left_alone, preserved_model_state, preserved_modes
from acps_core._util.wrappers import unwrap
from acps_core.config.prune_config import parse_prune_config, resolve_layer, validate_override_targets
from acps_core.config.selection import (
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
from acps_core.errors import ArgumentError, ConfigError, DataError, GraphError
from acps_core.graph.build import (
    CONV_TYPES,
    FOLLOWER_TYPES,
    LINEAR_TYPES,
    NORM_TYPES,
    TRANSPOSED_CONV_TYPES,
    ChannelGraph,
    ChannelGroup,
    build_channel_graph,
    trace_sample,
)
from acps_core.graph.masking import masked_channels, output_difference, output_shape_difference, removed_positions
from acps_core.layers.attention import make_prunable, shrink_embed_dim, shrink_heads
from acps_core.prune.norm_correction import Statistics, correct_norm_statistics, measure_norm_inputs
from acps_core.prune.reconstruction import LayerInput, reconstructing, recording_layer_inputs
from acps_core.search.problem import kept_from_ratio

logger = logging.getLogger(__name__)

__all__ = [
    "WeightsChangedWarning",
    "create_prune_retrain_model",
    "prune_channels",
    "pruned_with_record",
    "replay_prune_record",
    "restore_prune_retrain_model",
    "save_prune_retrain_model",
]


# ----------------------------------------------------------------------------------------------------------------
# Slicing modules
# ----------------------------------------------------------------------------------------------------------------

def _take(param: torch.Tensor | None, dim: int, index: torch.Tensor) -> nn.Parameter | None:
    if param is None:
        return None
    data = param.detach().index_select(dim, index.to(param.device))  # a new tensor already
    return nn.Parameter(data, requires_grad=param.requires_grad)


def _take_buffer(buffer: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if buffer is None else buffer.index_select(0, index.to(buffer.device))


def _slice_output(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep output channels ``keep`` of a Conv/ConvTranspose/Linear producer (and of a depthwise conv, which
    follows its input, its inputs too)."""
    layer = cast(Any, module)
    if isinstance(module, nn.MultiheadAttention):
        shrink_heads(module, keep)
        return
    if isinstance(module, LINEAR_TYPES):
        layer.weight = _take(layer.weight, 0, keep)
        layer.bias = _take(layer.bias, 0, keep)
        layer.out_features = len(keep)
        return
    transposed = isinstance(module, TRANSPOSED_CONV_TYPES)
    layer.weight = _take(layer.weight, 1 if transposed else 0, keep)
    layer.bias = _take(layer.bias, 0, keep)
    if not transposed and layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels:
        layer.in_channels = layer.groups = len(keep)
    layer.out_channels = len(keep)


def _slice_input(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep input positions ``keep`` of a Conv/ConvTranspose/Linear consumer. A grouped conv keeps, in every
    group, the kept positions of that group (the graph made every group keep the same count)."""
    layer = cast(Any, module)
    if isinstance(module, nn.MultiheadAttention):
        shrink_embed_dim(module, keep)
        return
    if isinstance(module, LINEAR_TYPES):
        layer.weight = _take(layer.weight, 1, keep)
        layer.in_features = len(keep)
        return
    if isinstance(module, TRANSPOSED_CONV_TYPES):
        layer.weight = _take(layer.weight, 0, keep)
    elif layer.groups > 1:
        per_group = layer.in_channels // layer.groups
        rows = layer.weight.shape[0] // layer.groups
        parts = []
        for g in range(layer.groups):
            columns = torch.tensor([int(p) - g * per_group for p in keep if g * per_group <= p < (g + 1) * per_group],
                                   dtype=torch.long, device=layer.weight.device)
            parts.append(layer.weight.detach()[g * rows:(g + 1) * rows].index_select(1, columns))
        layer.weight = nn.Parameter(torch.cat(parts).clone(), requires_grad=layer.weight.requires_grad)
    else:
        layer.weight = _take(layer.weight, 1, keep)
    layer.in_channels = len(keep)


def _slice_follower(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep channels ``keep`` of a norm or per-channel PReLU (parameters, statistics and sizes)."""
    layer = cast(Any, module)
    if isinstance(module, nn.PReLU):
        layer.weight = _take(layer.weight, 0, keep)
        layer.num_parameters = len(keep)
        return
    if isinstance(module, nn.LayerNorm):
        layer.weight = _take(layer.weight, 0, keep)
        layer.bias = _take(layer.bias, 0, keep)
        layer.normalized_shape = (len(keep),)
        return
    if isinstance(module, nn.GroupNorm):
        per_group = layer.num_channels // layer.num_groups
        layer.weight = _take(layer.weight, 0, keep)
        layer.bias = _take(layer.bias, 0, keep)
        layer.num_channels = len(keep)
        layer.num_groups = len(keep) // per_group  # whole norm groups go (the graph made sure)
        return
    if layer.affine:
        layer.weight = _take(layer.weight, 0, keep)
        layer.bias = _take(layer.bias, 0, keep)
    if layer.track_running_stats and layer.running_mean is not None:
        layer.running_mean = _take_buffer(layer.running_mean, keep)
        layer.running_var = _take_buffer(layer.running_var, keep)
    layer.num_features = len(keep)


def dropped_positions(graph: ChannelGraph, keep: Mapping[int, Sequence[int]]
                      ) -> tuple[dict[str, set[int]], dict[str, set[int]], dict[tuple[str, int], set[int]]]:
    """What keeping only ``keep[g]`` of each group ``g`` removes: (layer -> output channels, for producers and
    followers; layer -> input positions, for consumers; (bare parameter, dim) -> positions).

    Raises:
        GraphError: a group that is not prunable, indices out of range, or a keep set that breaks the group's
            units or blocks.
    """
    outputs: dict[str, set[int]] = {}
    inputs: dict[str, set[int]] = {}
    parameters: dict[tuple[str, int], set[int]] = {}
    for group_id, kept_list in keep.items():
        group = graph.group(group_id)
        if not group.prunable:
            raise GraphError(f"channel group {group.name} cannot be pruned: {'; '.join(group.reasons)}")
        kept = set(kept_list)
        if not kept or any(c < 0 or c >= group.channels for c in kept):
            raise GraphError(f"channel group {group.name} has {group.channels} channels; keep indices must be a "
                             f"non-empty subset of 0..{group.channels - 1}")
        broken = group.check_keep(sorted(kept))
        if broken:
            raise GraphError(f"cannot keep those channels of group {group.name}: {broken}")
        removed = [c for c in range(group.channels) if c not in kept]
        for name in group.producers:
            outputs.setdefault(name, set()).update(removed)
        for use in group.followers:
            if use.kind == "Parameter":
                parameters.setdefault((use.layer, use.dim), set()).update(use.positions(removed, group.channels))
            else:
                outputs.setdefault(use.layer, set()).update(use.positions(removed, group.channels))
        for use in group.consumers:
            inputs.setdefault(use.layer, set()).update(use.positions(removed, group.channels))
    return outputs, inputs, parameters


def prune_channels(model: nn.Module, graph: ChannelGraph, keep: Mapping[int, Sequence[int]]) -> None:
    """Remove channels from ``model`` in place: group ``g`` keeps only the channel indices ``keep[g]``.

    ``graph`` must have been built from ``model`` (or an identical one). A layer touched by several groups (the
    consumer of a concat) is sliced once, with every group's removals combined; a layer's outputs are sliced
    before its inputs.

    Raises:
        GraphError: a group that is not prunable, indices out of range, or a keep set that breaks the group's
            units or blocks.
    """
    outputs, inputs, parameters = dropped_positions(graph, keep)
    for name, drop in outputs.items():
        module = model.get_submodule(name)
        index = torch.tensor([i for i in range(_size(module, "out")) if i not in drop], dtype=torch.long)
        if isinstance(module, FOLLOWER_TYPES):
            _slice_follower(module, index)
        else:
            _slice_output(module, index)
        owner = model.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, nn.MultiheadAttention):
            make_prunable(owner)  # its out projection lost outputs: the stock forward would assume embed_dim
    for name, drop in inputs.items():
        module = model.get_submodule(name)
        _slice_input(module, torch.tensor([i for i in range(_size(module, "in")) if i not in drop], dtype=torch.long))
    for (name, dim), drop in parameters.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        param = getattr(owner, attr)
        index = torch.tensor([i for i in range(param.shape[dim]) if i not in drop], dtype=torch.long)
        setattr(owner, attr, _take(param, dim, index))


def _size(module: nn.Module, axis: str) -> int:
    layer = cast(Any, module)
    if isinstance(module, nn.MultiheadAttention):
        return int(layer.num_heads * layer.head_dim if axis == "out" else layer.in_proj_weight.shape[1])
    if isinstance(module, nn.PReLU):
        return int(layer.num_parameters)
    if isinstance(module, nn.LayerNorm):
        return int(layer.normalized_shape[0])
    if isinstance(module, nn.GroupNorm):
        return int(layer.num_channels)
    if isinstance(module, NORM_TYPES):
        return int(layer.num_features)
    if isinstance(module, LINEAR_TYPES):
        return int(layer.out_features if axis == "out" else layer.in_features)
    if isinstance(module, CONV_TYPES + TRANSPOSED_CONV_TYPES):
        return int(layer.out_channels if axis == "out" else layer.in_channels)
    raise GraphError(f"acps cannot slice a {type(module).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Deciding what to keep from a channel-prune config
# ----------------------------------------------------------------------------------------------------------------

def _group_kept_count(graph: ChannelGraph, group: ChannelGroup, cfg: Any, config_path: str) -> int | None:
    """How many channels the config keeps in ``group`` (None: not pruned), from its producers' entries."""
    members = group.producers + [u.layer for u in group.followers if u.layer in graph.layers]
    decisions = {name: resolve_layer(cfg, name, graph.module_type(name)) for name in members}
    if any(d.source == "skip" for d in decisions.values()):
        return None
    # An entry without ascend_optimized takes the schema's default, true.
    counts = {name: kept_from_ratio(group.channels, float(d.prune_ratio), d.ascend_optimized is not False,
                                    group.atom)
              for name, d in decisions.items()
              if d.source != "none" and d.prune_ratio is not None and name in group.producers}
    if not counts:
        return None
    if len(set(counts.values())) > 1:
        given = ", ".join(f"{name} keeps {count}" for name, count in counts.items())
        raise ConfigError(f"layers {', '.join(counts)} share their output channels (one channel group) but the "
                          f"config keeps different counts of them ({given}); give them the same prune_ratio and "
                          "ascend_optimized", path=config_path)
    kept = next(iter(counts.values()))
    return kept if kept < group.channels else None


def _check_indices(removed: Mapping[str, Sequence[int]], producers: Mapping[str, ChannelGroup], path: StrPath,
                   what: str) -> None:
    """Refuse removed channel indices beyond a layer's channels, or removing all of them.

    Raises:
        ConfigError: naming the file, the layer and what is wrong.
    """
    for name, indices in removed.items():
        group = producers.get(name)
        if group is None:
            continue
        beyond = [i for i in indices if i >= group.channels]
        if beyond:
            raise ConfigError(f'{what} removes channel {max(beyond)} of layer "{name}", which has only '
                              f"{group.channels} output channels (0..{group.channels - 1}); it was written for "
                              "another model or edited: search again, or use the file written for this model",
                              path=os.fspath(path))
        if len(set(indices)) >= group.channels:
            raise ConfigError(f'{what} removes all {group.channels} output channels of layer "{name}"; a layer '
                              "must keep at least one: search again, or use the file written for this model",
                              path=os.fspath(path))


def largest_norm_channels(model: nn.Module, group: ChannelGroup, count: int) -> list[int]:
    """The ``count`` channels of ``group`` with the largest filter L2 norms summed over its producers (the
    reference's rule), taken in whole atoms when the group has units or blocks. Sorted."""
    norms = torch.zeros(group.channels, dtype=torch.float64)
    for name in group.producers:
        module = model.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention):
            # The q, k and v rows of each head channel, taken together.
            weight = module.in_proj_weight.detach().reshape(3, group.channels, -1).transpose(0, 1)
        else:
            weight = cast(torch.Tensor, module.weight).detach()
        if isinstance(module, TRANSPOSED_CONV_TYPES):
            weight = weight.transpose(0, 1)  # (in, out, k...): output channels are dim 1
        norms += torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1).float(), dim=1).double().cpu() ** 2
    removed = [c for atom in group.atoms(norms)[: (group.channels - count) // group.atom] for c in atom]
    return sorted(set(range(group.channels)) - set(removed))


def _decide_keep(model: nn.Module, graph: ChannelGraph, cfg: Any, config_path: Path,
                 selection: dict[str, list[int]]) -> tuple[dict[int, list[int]], bool]:
    """What each group keeps, and whether every choice came from the search's selection file.

    Raises:
        ConfigError: the config names a layer or type the model does not have (with the closest names), gives a
            ratio to a layer that cannot be pruned, or the selection file removes channels the model lacks.
    """
    # Entries for a norm or depthwise conv that follows a group are allowed (the producers' entries decide).
    validate_override_targets(cfg, config_path, {name: (info.kind, info.reason) for name, info in graph.layers.items()})
    _check_indices(selection, {p: g for g in graph.groups for p in g.producers}, selection_path(config_path),
                   "the selection file")
    keep: dict[int, list[int]] = {}
    searched = True
    for group in graph.groups:
        if not group.prunable:
            continue
        count = _group_kept_count(graph, group, cfg, str(config_path))
        if count is None:
            continue
        chosen = [selection[p] for p in group.producers if p in selection]
        if chosen and all(c == chosen[0] for c in chosen) and group.channels - len(chosen[0]) == count:
            removed = set(chosen[0])
            keep[group.id] = [c for c in range(group.channels) if c not in removed]
        else:
            if chosen:
                logger.info("the selection file does not match the config for %s (edited?); choosing channels "
                            "by filter L2 norm", group.name)
            keep[group.id] = largest_norm_channels(model, group, count)
            searched = False
    return keep, searched


# ----------------------------------------------------------------------------------------------------------------
# The public calls
# ----------------------------------------------------------------------------------------------------------------

def _model_input(input_data: Any, device: torch.device, what: str = "input_data") -> Any:
    """The model's forward arguments: a tensor, a tuple of tensors (positional) or a dict of tensors (keyword),
    moved to the model's device."""
    if isinstance(input_data, torch.Tensor):
        return input_data.to(device)
    if isinstance(input_data, (tuple, list)) and input_data and all(isinstance(t, torch.Tensor) for t in input_data):
        return tuple(t.to(device) for t in input_data)
    if isinstance(input_data, dict) and input_data and all(isinstance(t, torch.Tensor) for t in input_data.values()):
        return {k: t.to(device) for k, t in input_data.items()}
    raise DataError(f"{what} must be the model's input: a tensor, a tuple of tensors or a dict of tensors, "
                    f"got {type(input_data).__name__}")


def _checked_output(model: nn.Module, data: Any, what: str) -> Any:
    try:
        with torch.no_grad():
            return forward(model, data)
    except Exception as exc:
        raise GraphError(f"the {what} model raised on input_data: {type(exc).__name__}: {exc}") from exc


def _copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A deep copy of the module structure whose parameters and buffers are still the original's: pruning
    replaces most of them with sliced copies anyway, so copying them all first would be wasted work."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _own_tensors(pruned: nn.Module, original: nn.Module) -> None:
    """Give ``pruned`` its own copy of every parameter and buffer it still shares with ``original`` (keeping
    parameters tied to each other tied)."""
    shared = {id(t) for t in (*original.parameters(), *original.buffers())}
    copies: dict[int, torch.Tensor] = {}
    for module in pruned.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in shared:
                if id(param) not in copies:
                    copies[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                module._parameters[name] = copies[id(param)]  # type: ignore[assignment]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and id(buffer) in shared:
                copies.setdefault(id(buffer), buffer.clone())
                module._buffers[name] = copies[id(buffer)]


def _pruned_copy(model: nn.Module, data: Any, keep_of: Any, norm_data: Any = None, reconstruct: bool = False
                 ) -> tuple[nn.Module, ChannelGraph, dict[int, list[int]]]:
    """Deep-copy ``model``, trace it, decide what to keep with ``keep_of(copy, graph) -> (keep, checked)``, prune
    and check. ``checked`` says the groups were already checked by execution (the search does, for every group it
    may prune): then only the pruned model's output shapes are compared, not its values, which saves a forward.
    With ``norm_data``, the BatchNorm running statistics are corrected for the removed channels on it, and with
    ``reconstruct`` too the layers that read removed channels are re-fitted on it, in the same pass."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    pruned = _copy_sharing_tensors(model)
    sample = trace_sample(data)
    with preserved_modes(pruned):
        pruned.eval()
        graph = build_channel_graph(pruned, data)
        keep, checked = keep_of(pruned, graph)
        unpruned_norms, unpruned_inputs = None, {}
        removed_outputs: dict[str, set[int]] = {}
        removed_inputs: dict[str, set[int]] = {}
        if norm_data is not None:  # one pass measures the norms' inputs and those of the layers to re-fit
            removed_outputs, removed_inputs, _ = dropped_positions(graph, keep)
            with recording_layer_inputs(pruned, set(removed_inputs) if reconstruct else set()) as unpruned_inputs:
                unpruned_norms = _measure_norms(pruned, norm_data)
            _check_layer_inputs(unpruned_inputs)
        unpruned_weights = {name: cast(torch.Tensor, pruned.get_submodule(name).weight) for name in unpruned_inputs}
        if checked:
            expected = graph.output  # on the same samples; only its shapes are compared
        else:
            # What the pruned model must compute: the unpruned copy with the removed channels masked.
            with masked_channels(pruned, graph, keep), torch.no_grad():
                expected = forward(pruned, sample)
        prune_channels(pruned, graph, keep)
        got = _checked_output(pruned, sample, "pruned")
        why = output_shape_difference(got, expected) if checked else output_difference(got, expected)
    _own_tensors(pruned, model)
    if why:
        raise GraphError(f"pruning as the config says changes what the model computes ({why}): something in its "
                         "forward pass uses a channel count in a way acps cannot trace. auto_channel_prune_search "
                         "checks every group and leaves such groups alone; skip the layers of the groups named "
                         "in its report")
    if unpruned_norms is not None:
        with preserved_modes(pruned):
            pruned.eval()
            try:
                with reconstructing(pruned, unpruned_weights, unpruned_inputs, removed_inputs,
                                    removed_outputs) as refitted:
                    changed = correct_norm_statistics(pruned, unpruned_norms,
                                                      removed_positions(graph, keep, followers=True), norm_data)
            except Exception as exc:
                raise GraphError(f"the pruned model raised on calibration_data: {type(exc).__name__}: {exc}") from exc
        logger.info("corrected the running statistics of %d BatchNorm layers for the removed channels", len(changed))
        if reconstruct:
            logger.info("re-fitted %d of the %d layers that read removed channels", len(refitted),
                        len(removed_inputs))
    return pruned, graph, keep


def _inputs_of(calibration_data: Any, input_data: Any) -> Any:
    """The inputs of ``calibration_data``: for an iterable of batches (a DataLoader), its first batch; then the
    data of a search-style ``[data, label]`` pair whose data has the structure of ``input_data`` (the model's
    arguments, as :func:`_model_input` returned them); else ``calibration_data`` itself."""
    if not isinstance(calibration_data, (torch.Tensor, list, tuple, dict, str, bytes)) and hasattr(
            calibration_data, "__iter__"):
        calibration_data = next(iter(calibration_data), None)
        if calibration_data is None:
            raise DataError("calibration_data is an iterable with no batches: pass a batch of inputs or a "
                            "DataLoader that yields at least one")
    if (isinstance(calibration_data, (list, tuple)) and len(calibration_data) == 2
            and isinstance(calibration_data[1], torch.Tensor) and _shaped_like(calibration_data[0], input_data)):
        return calibration_data[0]
    return calibration_data


def _shaped_like(data: Any, reference: Any) -> bool:
    """Whether ``data`` has the structure of ``reference`` (a tensor, or a tuple or dict of tensors) with the
    same shape after the batch dimension everywhere; a lone tensor matches a one-tensor tuple."""
    if isinstance(reference, torch.Tensor):
        return isinstance(data, torch.Tensor) and data.shape[1:] == reference.shape[1:]
    if isinstance(reference, tuple):
        if len(reference) == 1 and isinstance(data, torch.Tensor):
            return _shaped_like(data, reference[0])
        return (isinstance(data, (list, tuple)) and len(data) == len(reference)
                and all(_shaped_like(d, r) for d, r in zip(data, reference)))
    if isinstance(reference, dict):
        return (isinstance(data, dict) and data.keys() == reference.keys()
                and all(_shaped_like(data[k], reference[k]) for k in reference))
    return False


def _measure_norms(model: nn.Module, data: Any) -> Statistics:
    """The BatchNorm inputs' statistics of the unpruned model on ``calibration_data``, checked."""
    if any(t.dim() == 0 or t.shape[0] == 0 for t in tensors_in(data)):
        raise DataError("calibration_data holds no samples: pass a batch of real inputs, e.g. 16 to 64 of them")
    try:
        statistics = measure_norm_inputs(model, data)
    except Exception as exc:
        raise DataError(f"calibration_data could not be run through the model: {type(exc).__name__}: {exc}. Pass "
                        "a batch like input_data (same shape after the batch dimension, dtype and device)") from exc
    for name, (mean, variance) in statistics.items():
        if not (torch.isfinite(mean).all() and torch.isfinite(variance).all()):
            raise DataError(f"the input of BatchNorm layer {name!r} holds NaN or Inf on calibration_data: pass "
                            "finite calibration samples, or leave calibration_data out")
    return statistics


def _check_layer_inputs(inputs: dict[str, LayerInput]) -> None:
    """Refuse NaN or Inf in the unpruned input of a layer to re-fit (it would spread into the weights)."""
    for name, measured in inputs.items():
        if not (measured.finite and torch.isfinite(measured.values).all()):
            raise DataError(f"the input of layer {name!r} holds NaN or Inf on calibration_data: pass finite "
                            "calibration samples, or leave calibration_data out")


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
    config_path = Path(_path_argument(config_defination, "config_defination"))
    record_file = _path_argument(record_file, "record_file")
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
    data = _model_input(input_data, device)
    check_dense(data, "input_data")
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors_in(data)):
        raise DataError("input_data holds NaN or Inf: pass real, finite input samples")
    norm_data = None
    if calibration_data is not None:
        norm_data = _model_input(_inputs_of(calibration_data, data), device, "calibration_data")
        check_dense(norm_data, "calibration_data")
    fingerprint = weights_fingerprint(model)
    if selection is not None and selection.header.fingerprint not in (None, fingerprint):
        message = (f"the model's weights differ from those auto_channel_prune_search ran on (fingerprint "
                   f"{fingerprint}, {selection_file.name} says {selection.header.fingerprint}), so the channels it "
                   "chose may not suit them; prune the trained model the search saw (on the command line: "
                   "--weights TRAINED.pth when --model names a factory)")
        warnings.warn(message, WeightsChangedWarning, stacklevel=3)
    removed = selection.removed if selection is not None else {}
    with parameters_left_alone(model):  # the copy shares the user's tensors while it is traced
        pruned, graph, keep = _pruned_copy(
            model, data, lambda copy_, graph: _decide_keep(copy_, graph, cfg, config_path, removed), norm_data,
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
    parse_prune_config(_path_argument(config_defination, "config_defination"))
    pth_file = _path_argument(pth_file, "pth_file")
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
    record_file = _path_argument(record_file, "record_file")
    with reading(record_file):
        removed = read_record(record_file)
    data = _model_input(input_data, model_device(model))
    check_dense(data, "input_data")

    def keep_of(copy_: nn.Module, graph: ChannelGraph) -> tuple[dict[int, list[int]], bool]:
        keep: dict[int, list[int]] = {}
        producers = {p: g for g in graph.groups for p in g.producers}
        unknown = [name for name in removed if name not in producers]
        if unknown:
            raise ConfigError(f"the record names {', '.join(unknown[:5])}, which the model has no channel group "
                              "for; restore needs a model of the architecture that was pruned", path=str(record_file))
        _check_indices(removed, producers, record_file, "the record")
        for name, indices in removed.items():
            group = producers[name]
            kept = [c for c in range(group.channels) if c not in set(indices)]
            if group.id in keep and keep[group.id] != kept:
                raise ConfigError(f"the record removes different channels from {name} than from the other "
                                  f"producers of its group {group.name}", path=str(record_file))
            keep[group.id] = kept
        return keep, True  # the record was written by create_prune_retrain_model, which checked it

    with parameters_left_alone(model):
        pruned, _, _ = _pruned_copy(model, data, keep_of)
    return pruned


def onnx_path(save_path: StrPath) -> StrPath:
    """The file :func:`save_prune_retrain_model` writes for ``save_path``: ``save_path`` itself when its name ends
    in ``.onnx`` (any case), else with ``.onnx`` appended (``model`` -> ``model.onnx``, ``.onnx`` ->
    ``.onnx.onnx``). A path that names a folder is returned as it is, for the check to refuse."""
    text = os.fspath(save_path)
    path = Path(text)
    if path.name in ("", ".", "..") or text.endswith(os.sep):
        return save_path
    if path.name.lower().endswith(".onnx") and path.name.lower() != ".onnx":
        return path
    return path.with_name(path.name + ".onnx")


def _path_argument(value: Any, parameter: str) -> str | os.PathLike[str]:
    """``value`` when it is a file path (str or os.PathLike), else an ArgumentError naming ``parameter``."""
    if isinstance(value, (str, os.PathLike)):
        return value
    raise ArgumentError(f"{parameter} must be a file path (str or pathlib.Path), got {type(value).__name__}")


def save_prune_retrain_model(model: nn.Module, save_path: StrPath, input_data: Any,
                             input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                             dynamic_axes: Mapping[str, Any] | None = None) -> Path:
    """Export the (pruned) model to ONNX at ``save_path`` (``.onnx`` appended when missing), atomically.

    Needs the ``onnx`` extra (``pip install 'acps-core[onnx]'``).

    Returns:
        The path of the ONNX file written.

    Raises:
        AcpsError: when the ONNX exporter is not installed, or the export fails.
        OutputPathError: ``save_path`` is not a file path or cannot be written.
    """
    from acps_core.errors import AcpsError

    path = check_writable_output(onnx_path(_path_argument(save_path, "save_path")), "save_path")
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, _ = unwrap(model)
    check_initialized(model)
    try:
        import onnx  # noqa: F401 - the exporter needs it; fail early with the fix
    except ImportError as exc:
        raise AcpsError("exporting to ONNX needs the onnx package: pip install 'acps-core[onnx]'") from exc
    data = _model_input(input_data, model_device(model))
    check_dense(data, "input_data")
    args = data if isinstance(data, tuple) else (data,)
    exported = io.BytesIO()
    try:
        # The TorchScript exporter (deprecated, still shipped) handles any model that runs; the torch.export one
        # needs onnxscript and an exportable forward, so the reliable path is chosen and its warning silenced.
        with preserved_model_state(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model.eval()
            torch.onnx.export(model, args, exported,  # type: ignore[arg-type]  # a file object works too
                              input_names=list(input_names) if input_names else None,
                              output_names=list(output_names) if output_names else None,
                              dynamic_axes=dict(dynamic_axes) if dynamic_axes else None, dynamo=False)
    except Exception as exc:
        raise AcpsError(f"ONNX export to {path} failed: {type(exc).__name__}: {exc}") from exc
    atomic_write_bytes(path, exported.getvalue(), "save_path")
    return path
