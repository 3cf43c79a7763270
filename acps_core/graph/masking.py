"""Evaluating a pruning decision without changing the model: the removed channels are zeroed where they are read.

Zeroing the input channels a consumer layer would lose makes its output exactly what the physically pruned
layer computes, so ``masked_channels`` gives the pruned model's outputs (before fine-tuning) on the unpruned
model. A LayerNorm over the channels is the one follower whose kept outputs depend on the removed channels (its
mean and variance); inside the block it normalises over the kept channels only, as the pruned LayerNorm will.
Hooks are removed on exit. The one parameter touched is the out projection of an ``nn.MultiheadAttention``, whose
removed-head columns are zeroed inside the block (it is not called as a module, so no hook sees its input) and
restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from acps_core._util.tensors import tensors_in
from acps_core.graph.model import ChannelGraph, ChannelGroup
from acps_core.graph.removal import Removal, removal
from acps_core.layers.attention import AttentionAdapter
from acps_core.layers.base import adapter_for


@contextmanager
def masked_channels(model: nn.Module, graph: ChannelGraph, keep: Mapping[int, Sequence[int]]) -> Iterator[None]:
    """Within the block, ``model`` behaves as if group ``g`` kept only the channels ``keep[g]``."""
    handles = []
    zeroed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, its values) to put back on exit
    removed = removal(graph, keep)
    for name, positions in removed.inputs.items():
        module = model.get_submodule(name)
        if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention):
            # Its out projection is applied as a function, not called as a module, so no hook sees its input:
            # the columns of the removed heads are zeroed for the duration instead, and put back on exit.
            weight = cast(torch.Tensor, module.weight)
            zeroed.append((weight, weight.detach().clone()))
            with torch.no_grad():
                weight[:, sorted(positions)] = 0
            continue
        adapter = adapter_for(module)
        assert adapter is not None, f"{name} reads a group's channels but has no layer adapter"
        attention = adapter.role == "attention"
        size = adapter.in_size(module)
        mask = torch.ones(size).index_fill_(0, torch.tensor(sorted(positions), dtype=torch.long), 0)
        # The inputs come positionally, or by name (layer(input=x) is traced the same way); nn.MultiheadAttention
        # reads its embed_dim channels from query, key and value; self-attention from its first tensor, whatever
        # its name (hidden_states=...), as the graph read it.
        self_attention = isinstance(adapter, AttentionAdapter) and adapter.self_attention()
        names = ("query", "key", "value") if attention and not self_attention else ("input",)
        first_tensor_only = self_attention

        def zero_inputs(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], mask: torch.Tensor = mask,
                        names: tuple[str, ...] = names, adapter: Any = adapter, first: bool = first_tensor_only
                        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            positional, kwargs = list(args), dict(kwargs)
            places: list[tuple[Any, Any]] = [
                (positional if position < len(positional) else kwargs, position if position < len(positional)
                 else key) for position, key in enumerate(names)]
            if first:  # self-attention: its first tensor, positional or named
                every: list[tuple[Any, Any]] = [(positional, i) for i in range(len(positional))]
                every += [(kwargs, k) for k in kwargs]
                places = [next(((h, k) for h, k in every if isinstance(h[k], torch.Tensor)), (kwargs, None))]
            for holder, slot in places:
                if (holder is kwargs and slot not in kwargs) or not isinstance(holder[slot], torch.Tensor):
                    continue
                x = holder[slot]
                dim = adapter.input_dim(layer, x.dim())
                shape = [-1 if d == dim else 1 for d in range(x.dim())]
                holder[slot] = x * mask.to(x.device, x.dtype).reshape(shape)  # one pass, no clone
            return tuple(positional), kwargs

        handles.append(module.register_forward_pre_hook(zero_inputs, with_kwargs=True))
    for name, positions in removed.followers.items():
        if f"{name}.weight" in graph.norms_over_channels:
            continue  # called as a function: masked by _KeptChannelNorms below
        module = model.get_submodule(name)
        follower = adapter_for(module)
        hook = follower.masked_output(module, positions) if follower is not None else None
        if hook is not None:  # a follower whose kept outputs depend on the removed channels (a LayerNorm)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    norms = _norms_over_kept_channels(model, graph, removed)
    try:
        if norms:
            with _KeptChannelNorms(norms):
                yield
        else:
            yield
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for weight, values in zeroed:
                weight.copy_(values)


def approximated_groups(model: nn.Module, graph: ChannelGraph) -> list[ChannelGroup]:
    """The prunable groups that a norm over their channels normalises (a LayerNorm, ``F.layer_norm`` or
    ``F.rms_norm`` over them): pruned, it normalises over the kept channels only, an approximation of zeroing
    them (see :func:`acps_core.layers.approximate_norms`)."""
    found = []
    for group in graph.prunable_groups:
        for use in group.followers:
            bare = use.kind in ("Parameter", "Buffer")  # a tensor of the model, not a module
            named = use.layer if bare else f"{use.layer}.weight"
            module = None if bare else model.get_submodule(use.layer)
            adapter = adapter_for(module) if module is not None else None
            if named in graph.norms_over_channels or (adapter is not None and adapter.approximate):
                found.append(group)
                break
    return found


def output_difference(got: Any, expected: Any) -> str | None:
    """Why a pruned model's output differs from the masked model's beyond rounding (None when they agree)."""
    got_tensors, expected_tensors = tensors_in(got), tensors_in(expected)
    if len(got_tensors) != len(expected_tensors):
        return "the pruned model returns a different number of tensors"
    for a, b in zip(got_tensors, expected_tensors):
        if a.shape != b.shape:
            return f"an output changed shape from {list(b.shape)} to {list(a.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return "an integer output changed"
            continue
        finite = b.detach()[torch.isfinite(b.detach())]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        # In half precision the two models round differently (a norm's folded weight, fewer terms in a sum): two
        # units of the dtype's rounding are allowed there, which is far below what a wrongly mapped channel moves.
        rounding = 2 * torch.finfo(b.dtype).eps if b.dtype in (torch.float16, torch.bfloat16) else 0.0
        rtol, atol = max(1e-3, rounding), max(1e-4, rounding) * max(scale, 1e-6)
        if not torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True):
            return f"an output changed by up to {float((a.double() - b.double()).abs().max()):.3g}"
    return None


def output_shape_difference(got: Any, expected: Any) -> str | None:
    """Why two model outputs differ in number or shapes of tensors (None when they agree)."""
    got_tensors, expected_tensors = tensors_in(got), tensors_in(expected)
    if [t.shape for t in got_tensors] != [t.shape for t in expected_tensors]:
        return (f"the outputs changed shape from {[list(t.shape) for t in expected_tensors]} to "
                f"{[list(t.shape) for t in got_tensors]}")
    return None


def _norms_over_kept_channels(model: nn.Module, graph: ChannelGraph, removed: Removal) -> dict[int, torch.Tensor]:
    """For every norm called as a function over channels that lose some: id(its weight) -> the kept positions."""
    norms = {}
    for name in graph.norms_over_channels:
        owner = name.rpartition(".")[0]
        positions = removed.followers.get(owner) or removed.parameters.get((name, 0))
        if not positions:
            continue
        weight = model.get_parameter(name)
        kept = [p for p in range(weight.shape[0]) if p not in positions]
        norms[id(weight)] = torch.tensor(kept, dtype=torch.long)
    return norms


_NORM_SIGNATURES = {"layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
                    "rms_norm": ("input", "normalized_shape", "weight", "eps")}


class _KeptChannelNorms(TorchFunctionMode):
    """Computes the ``layer_norm`` / ``rms_norm`` calls of known weights over their kept channels only (the last
    dim), as the pruned norm will; the removed positions come out zero."""

    def __init__(self, kept: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.kept = kept

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        names = _NORM_SIGNATURES.get(getattr(func, "__name__", ""))
        if names is not None:
            bound = {**dict(zip(names, args)), **kwargs}
            index = self.kept.get(id(bound.get("weight")))
            if index is not None:
                x = bound.pop("input")
                index = index.to(x.device)
                out = torch.zeros_like(x)
                bound["normalized_shape"] = (len(index),)
                for key in ("weight", "bias"):
                    if bound.get(key) is not None:
                        bound[key] = bound[key].index_select(0, index)
                out[..., index] = func(x.index_select(-1, index), **bound)
                return out
        return func(*args, **kwargs)
