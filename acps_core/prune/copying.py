"""The pruned copy of a model: copied without copying its tensors, traced, cut and checked against the masked
model, and repaired on calibration data (BatchNorm statistics corrected, the layers that read removed channels
re-fitted)."""

from __future__ import annotations

import copy
import logging
import os
import warnings
from typing import Any, cast

import torch
from torch import nn

from acps_core._util.data import forward
from acps_core._util.state import preserved_modes
from acps_core._util.tensors import tensors_in
from acps_core.errors import ArgumentError, DataError, GraphError
from acps_core.graph.build import build_channel_graph
from acps_core.graph.masking import masked_channels, output_difference, output_shape_difference
from acps_core.graph.model import ChannelGraph
from acps_core.graph.removal import removal
from acps_core.graph.trace import trace_sample
from acps_core.prune.model_config import PerLayerWidthsWarning, sync_config
from acps_core.prune.norm_correction import Statistics, correct_norm_statistics, measure_norm_inputs
from acps_core.prune.reconstruction import LayerInput, reconstructing, recording_layer_inputs
from acps_core.prune.slicing import prune_channels

logger = logging.getLogger(__name__)


def model_input(input_data: Any, device: torch.device, what: str = "input_data") -> Any:
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


def _output_shapes(model: nn.Module, data: Any) -> Any:
    """The model's output on ``data`` computed on fake tensors, which carry shapes and no values (no arithmetic:
    a small fraction of a forward pass), by a copy that shares its tensors, so that whatever the forward caches
    stays in the copy. A forward that needs values (data-dependent control flow) runs for real."""
    trial = copy_sharing_tensors(model)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # an op fake tensors cannot run is not the user's error: it runs for real
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            return forward(trial, data)
    except Exception:
        return _checked_output(model, data, "pruned")
    finally:
        fake_log.setLevel(level)


def copy_sharing_tensors(model: nn.Module) -> nn.Module:
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


def pruned_copy(model: nn.Module, data: Any, keep_of: Any, norm_data: Any = None, reconstruct: bool = False
                 ) -> tuple[nn.Module, ChannelGraph, dict[int, list[int]]]:
    """Deep-copy ``model``, trace it, decide what to keep with ``keep_of(copy, graph) -> (keep, checked)``, prune
    and check. ``checked`` says the groups were already checked by execution (the search does, for every group it
    may prune): then only the pruned model's output shapes are compared, not its values, which saves a forward.
    With ``norm_data``, the BatchNorm running statistics are corrected for the removed channels on it, and with
    ``reconstruct`` too the layers that read removed channels are re-fitted on it, in the same pass."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    pruned = copy_sharing_tensors(model)
    sample = trace_sample(data)
    with preserved_modes(pruned):
        pruned.eval()
        graph = build_channel_graph(pruned, data)
        keep, checked = keep_of(pruned, graph)
        unpruned_norms, unpruned_inputs = None, {}
        removed_outputs: dict[str, set[int]] = {}
        removed_inputs: dict[str, set[int]] = {}
        if norm_data is not None:  # one pass measures the norms' inputs and those of the layers to re-fit
            removed = removal(graph, keep)
            removed_outputs, removed_inputs = removed.outputs, removed.inputs
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
        got = _output_shapes(pruned, sample) if checked else _checked_output(pruned, sample, "pruned")
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
                with reconstructing(pruned, unpruned_weights, unpruned_inputs, removed_inputs, removed_outputs,
                                    _samples(norm_data)) as refitted:
                    changed = correct_norm_statistics(pruned, unpruned_norms,
                                                      removal(graph, keep).followers, norm_data)
            except Exception as exc:
                raise GraphError(f"the pruned model raised on calibration_data: {type(exc).__name__}: {exc}") from exc
        logger.info("corrected the running statistics of %d BatchNorm layers for the removed channels", len(changed))
        if reconstruct:
            logger.info("re-fitted %d of the %d layers that read removed channels", len(refitted),
                        len(removed_inputs))
    why_not = sync_config(pruned)
    if why_not:
        warnings.warn(f"the pruned model's config keeps its old widths: {why_not}", PerLayerWidthsWarning,
                      stacklevel=4)
    return pruned, graph, keep


def inputs_of(calibration_data: Any, input_data: Any) -> Any:
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


def _samples(data: Any) -> int:
    """How many samples a batch holds: its first tensor's leading dim."""
    tensors = tensors_in(data)
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0


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


def path_argument(value: Any, parameter: str) -> str | os.PathLike[str]:
    """``value`` when it is a file path (str or os.PathLike), else an ArgumentError naming ``parameter``."""
    if isinstance(value, (str, os.PathLike)):
        return value
    raise ArgumentError(f"{parameter} must be a file path (str or pathlib.Path), got {type(value).__name__}")
