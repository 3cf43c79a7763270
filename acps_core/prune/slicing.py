"""Cutting channels out of a model: every layer a decision touches, sliced by its layer adapter.

A decision says, for each channel group, which channels it keeps; :func:`acps_core.graph.removal.removal` works
out what that removes from every layer (its output channels, its input positions) and bare parameter, and
:func:`prune_channels` cuts them, each layer by its adapter (:mod:`acps_core.layers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from acps_core.errors import GraphError
from acps_core.graph.model import ChannelGraph
from acps_core.graph.removal import check_decision, removal
from acps_core.layers.base import LayerAdapter, adapter_for, select, take


def prune_channels(model: nn.Module, graph: ChannelGraph, keep: Mapping[int, Sequence[int]], *,
                   share: bool = False) -> None:
    """Remove channels from ``model`` in place: group ``g`` keeps only the channel indices ``keep[g]``.

    ``graph`` must have been built from ``model`` (or an identical one). A layer touched by several groups (the
    consumer of a concat) is sliced once, with every group's removals combined; a layer's outputs are sliced
    before its inputs. Every tensor cut gets memory of its own, unless ``share``: then a tensor that keeps one run
    of consecutive channels stays a view of the unpruned one (a trial that only runs the pruned model and drops
    it, which must then not write into it).

    Raises:
        GraphError: a group that is not prunable, indices out of range, or a keep set that breaks the group's
            units or blocks.
    """
    check_decision(graph, keep)
    tied = _tied_parameters(model)
    unpruned = {id(t) for t in (*model.parameters(), *model.buffers())}
    removed = removal(graph, keep)
    for name, drop in removed.outputs.items():
        module = model.get_submodule(name)
        adapter = _adapter(module, name)
        adapter.keep_outputs(module, _kept(adapter.out_size(module), drop))
        owner_name, _, child = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner_adapter = adapter_for(owner)
        if owner_adapter is not None:
            owner_adapter.child_pruned(owner, child)  # nn.MultiheadAttention, whose out projection lost outputs
    for name, drop in removed.inputs.items():
        module = model.get_submodule(name)
        adapter = _adapter(module, name)
        adapter.keep_inputs(module, _kept(adapter.in_size(module), drop))
    for (name, dim), drop in removed.parameters.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        tensor = getattr(owner, attr)
        index = _kept(tensor.shape[dim], drop)
        if attr in owner._buffers:
            owner._buffers[attr] = select(tensor, dim, index)
        else:
            setattr(owner, attr, take(tensor, dim, index))
    _retie(tied)
    if not share:
        _own_memory(model, unpruned)


def _tied_parameters(model: nn.Module) -> list[tuple[nn.Parameter, list[tuple[nn.Module, str]]]]:
    """Each parameter that several modules hold (a tied family), with its ``(module, attribute)`` places."""
    places: dict[int, tuple[nn.Parameter, list[tuple[nn.Module, str]]]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                places.setdefault(id(param), (param, []))[1].append((module, attr))
    return [found for found in places.values() if len(found[1]) > 1]


def _retie(tied: list[tuple[nn.Parameter, list[tuple[nn.Module, str]]]]) -> None:
    """Parameters tied before slicing were sliced alike in each place the forward calls: make them one parameter
    again, also in the places it never calls (T5's ``shared`` embedding), which take the new sizes."""
    for original, places in tied:
        sliced = [getattr(module, attr) for module, attr in places if getattr(module, attr) is not original]
        if not sliced:
            continue
        kept = sliced[0]
        for module, attr in places:
            now = getattr(module, attr)
            if now is original and attr == "weight" and isinstance(module, (nn.Embedding, nn.Linear)):
                setattr(module, attr, kept)
                if isinstance(module, nn.Embedding):
                    module.num_embeddings, module.embedding_dim = kept.shape
                else:
                    module.out_features, module.in_features = kept.shape
            elif now is not kept and now.shape == kept.shape and torch.equal(now, kept):
                setattr(module, attr, kept)


def _own_memory(model: nn.Module, unpruned: set[int]) -> None:
    """Give every new parameter and buffer that is a view (of an unpruned tensor, or of a larger copy) memory of
    its own, contiguous; parameters tied to each other stay tied."""
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is None or id(tensor) in unpruned or not _is_view(tensor):
                    continue
                if id(tensor) not in copies:
                    data = tensor.detach().clone(memory_format=torch.contiguous_format)
                    copies[id(tensor)] = (nn.Parameter(data, requires_grad=tensor.requires_grad)
                                          if isinstance(tensor, nn.Parameter) else data)
                tensors[name] = copies[id(tensor)]  # type: ignore[assignment]


def _is_view(tensor: torch.Tensor) -> bool:
    return not tensor.is_contiguous() or tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()


def _kept(size: int, dropped: set[int]) -> torch.Tensor:
    kept = torch.ones(size, dtype=torch.bool)
    kept[torch.tensor(sorted(dropped), dtype=torch.long)] = False
    return kept.nonzero().flatten()


def _adapter(module: nn.Module, name: str) -> LayerAdapter:
    adapter = adapter_for(module)
    if adapter is None:
        raise GraphError(f"acps cannot slice {name} ({type(module).__name__}): no layer adapter is registered for "
                         "its type (acps_core.register_layer)")
    return adapter
