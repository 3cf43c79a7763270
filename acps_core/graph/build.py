"""Building the channel graph: which channels of a model must be pruned together, traced on real data.

The model runs once on (up to two samples of) the calibration data (:mod:`acps_core.graph.trace`). Layers with an
adapter (:mod:`acps_core.layers`) are recorded whole; everything else function by function. The output channels
of each producer layer form a *channel space* (:mod:`acps_core.graph.spaces`); the recorded operations carry each
space forward through the model (:mod:`acps_core.graph.functions` and :mod:`acps_core.graph.shapes` for torch
functions, :mod:`acps_core.graph.modules` for layers) until it reaches the layers that consume it. Operations that
tie two spaces together (a residual add, a squeeze-and-excitation gate, the query-key product of attention) merge
them into one :class:`~acps_core.graph.model.ChannelGroup`, decided as one unit. Some uses constrain how a group
may shrink: a GroupNorm or an attention head split makes channels go in whole units (a norm group, a head), a
grouped convolution or a ``chunk`` makes every block keep the same count, a channel shuffle makes every block it
interleaves keep the same channels. Any use of a space acps cannot map exactly makes its group unprunable, with
the reason and the source line recorded, never a wrong prune.

The idea of a dependency graph over the traced operations, with coupled channels pruned as groups, comes from
Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (Torch-Pruning).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

import torch
from torch import nn

from acps_core._util.data import forward
from acps_core._util.model_checks import explain_trace_failure
from acps_core._util.tensors import tensors_in
from acps_core.graph.functional import LAYER_FUNCTIONS, computed_macs, functional_layer, why_not_layer
from acps_core.graph.functions import DTYPE_ONLY, EXPANDS, FUNCTION_RULES, UNARY_ELEMENTWISE
from acps_core.graph.model import ChannelGraph, ChannelGroup, ChannelUse, LayerInfo, atom_size, structure_problem
from acps_core.graph.modules import module_op
from acps_core.graph.shapes import RESHAPES, requested_sizes
from acps_core.graph.sharing import keep_tied, shared_weights
from acps_core.graph.spaces import Spaces, Tag
from acps_core.graph.trace import SIZE_QUERY, Op, Recorder, TensorRef, refs_in, trace_sample
from acps_core.layers.attention import AttentionAdapter
from acps_core.layers.base import BUILD_CACHES, adapter_for, by_pattern, whole_layer


class GroupBuilder(Spaces):
    """Walks the recorded ops in order, carrying each producer's channels forward (see the module docs)."""

    def __init__(self, recorder: Recorder, shared_weights: Mapping[str, str],
                 modules: Mapping[str, nn.Module] | None = None, buffers: Set[str] = frozenset()) -> None:
        super().__init__()
        self.recorder = recorder
        self.shared_weights = shared_weights
        self.modules = dict(modules or {})  # every module of the model by name
        self.buffers = buffers  # names of the model's buffers (a bare buffer is sliced as one, not as a parameter)
        # Norm weights (qualified names) whose norm's statistics run over the channels -> the function
        # ("layer_norm", "rms_norm"): masking recomputes those calls over the kept channels.
        self.norms_over_channels: dict[str, str] = {}
        self.other_macs = 0.0  # multiply-accumulates of the traced functions no layer accounts for (whole batch)
        self.batch = 1  # samples in the traced batch
        self.read_sizes: dict[int, set[int]] = {}  # a size read from a tensor's shape -> the spaces it counted
        self.head_parts: dict[nn.Module, int] = {}  # a child attention modules share -> the first one's heads
        self.layers: dict[str, dict[str, Any]] = {}  # per traced layer: geometry, out space, input uses, reason
        self.touched: dict[str, list[int]] = {}  # per leaf module: the spaces its calls so far used
        self.first_calls: dict[str, tuple[list[Tag], list[Tag], Any]] = {}  # per module: its first call's tags
        # Values that are a model parameter, or one expanded or cast: value -> (parameter name, leading dims added)
        self.param_origin: dict[int, tuple[str, int]] = {}
        # Bare parameters: where each op used one, and the uses acps could map (the others block its groups).
        self.param_ops: dict[str, list[Op]] = {}
        self.param_mapped: dict[str, set[int]] = {}
        self.param_space: dict[str, tuple[int, ChannelUse]] = {}
        self._readers: dict[int, list[Op]] | None = None

    def run(self) -> None:
        for op in self.recorder.ops:
            try:
                if op.module is not None:
                    module_op(self, op, whole_layer(op.module))  # type: ignore[arg-type]
                else:
                    self.function_op(op)
            except Exception as exc:  # an op acps fails to analyse must block its groups, never crash
                refs = list(refs_in((op.args, op.kwargs)))
                self.block_tags([t for r in refs for t in self.tags_of(r)],
                                f"acps could not analyse '{op.name}' at {op.location} ({type(exc).__name__}: {exc})")
        # A sliced parameter must not be used anywhere acps did not map (g.sum() would change with its slice).
        for name, (space, _) in self.param_space.items():
            for op in self.param_ops.get(name, []):
                if id(op) not in self.param_mapped.get(name, set()):
                    self.block(space, f"parameter {name} is sliced with these channels but also used by "
                                      f"'{op.name}' at {op.location}, which would change")
                    break
        # A child attention modules share (CoaT's) is sliced with their heads: not under one never called.
        for part, heads in self.head_parts.items():
            idle = [n for n, m in self.modules.items() if n not in self.layers and isinstance(adapter_for(m),
                    AttentionAdapter) and any(child is part for child in m.children())]
            if idle:
                self.block(heads, f"{', '.join(idle)} holds the {type(part).__name__} these heads share, but the "
                                  "forward pass never called it, so slicing that for these heads would break it")

    def function_op(self, op: Op) -> None:
        """A torch function: its channel rule from :data:`~acps_core.graph.functions.FUNCTION_RULES`, or, for a
        function acps does not know, every space it touches blocked."""
        refs = list(refs_in((op.args, op.kwargs)))
        for ref in refs:
            origin = self.origin(ref)
            if origin is not None:
                self.param_ops.setdefault(origin[0], []).append(op)
        self.check_sizes(op, refs)
        tagged = [r for r in refs if self.tags_of(r)]
        where = f"torch function '{op.name}' at {op.location}"
        if op.name in LAYER_FUNCTIONS:
            if not functional_layer(self, op, refs, where):
                self.other_macs += computed_macs(op, self.recorder.shapes)
                self.block_tags([t for r in tagged for t in self.tags_of(r)], why_not_layer(self, op, where))
            return
        self.other_macs += computed_macs(op, self.recorder.shapes)
        if not tagged:
            self.track_parameter(op, refs)
            return
        name = op.name
        if name == SIZE_QUERY:
            self.size_query(op, refs[0])
            return
        if name in DTYPE_ONLY:
            refs = refs[:1]  # x.to(y), x.type_as(y), x.reshape_as(y): y only gives a dtype, device or shape
            tagged = [r for r in refs if self.tags_of(r)]
            if not tagged:
                return
        rule = FUNCTION_RULES.get(name)
        if rule is None:
            self.block_tags([t for r in tagged for t in self.tags_of(r)],
                            f"{where} cannot be mapped channel by channel")
            return
        rule(self, op, refs, tagged, where)

    def origin(self, ref: TensorRef) -> tuple[str, int] | None:
        """The model parameter a tensor is (or was expanded or cast from), and how many leading dims it gained."""
        if ref.param is not None:
            return ref.param, 0
        return self.param_origin.get(ref.value) if ref.value is not None else None

    def param_use(self, op: Op, tag: Tag, ref: TensorRef, ref_dim: int, where: str) -> bool:
        """Record a bare parameter that holds these channels along ``ref_dim`` of ``ref``; False if ``ref`` is
        not one, or holds them in a way acps cannot slice."""
        origin = self.origin(ref)
        if (origin is None or tag.block != 1 or tag.unit != 1 or not tag.contiguous
                or ref.shape[ref_dim] < tag.offset + tag.length):
            return False
        name, added = origin
        if ref_dim - added < 0:
            return False
        use = ChannelUse(name, "Buffer" if name in self.buffers else "Parameter", tag.offset, 1, tag.start,
                         None if tag.start == 0 and tag.stop == self.spaces[tag.space].channels else tag.stop,
                         dim=ref_dim - added)
        earlier = self.param_space.get(name)
        if earlier is not None and self.find(earlier[0]) != self.find(tag.space):
            if earlier[1] != use:
                self.block(tag.space, f"parameter {name} ({where}) is also used with other channels")
                self.block(earlier[0], f"parameter {name} ({where}) is also used with other channels")
                return True
            self.union(earlier[0], tag.space, f"parameter {name} used by both ({where})")
        self.param_space.setdefault(name, (tag.space, use))
        self.param_mapped.setdefault(name, set()).add(id(op))
        followers = self.spaces[tag.space].followers
        if use not in followers:
            followers.append(use)
        return True

    def track_parameter(self, op: Op, refs: list[TensorRef]) -> None:
        """Follow a parameter through an expand or cast, so that a class token expanded to the batch and then
        concatenated with the tokens is still known to be the parameter."""
        if not refs or not op.outputs:
            return
        origin = self.origin(refs[0])
        if origin is not None and op.name in RESHAPES | {"getitem"}:
            # A per-channel vector given singleton dims (gamma.view(1, -1, 1, 1), w[:, None, None]): its
            # entries sit along the one dim that is not 1.
            before = [d for d, size in enumerate(refs[0].shape) if size != 1]
            after = [d for d, size in enumerate(self.recorder.shapes[op.outputs[0]]) if size != 1]
            if (len(before) == len(after) == 1 and before[0] == origin[1]
                    and refs[0].shape[before[0]] == self.recorder.shapes[op.outputs[0]][after[0]]):
                self.param_origin[op.outputs[0]] = (origin[0], after[0])
                self.param_mapped.setdefault(origin[0], set()).add(id(op))
            return
        if op.name not in UNARY_ELEMENTWISE | EXPANDS:
            return
        if origin is not None:
            added = len(self.recorder.shapes[op.outputs[0]]) - len(refs[0].shape)
            self.param_origin[op.outputs[0]] = (origin[0], origin[1] + added)
            self.param_mapped.setdefault(origin[0], set()).add(id(op))

    def check_sizes(self, op: Op, refs: list[TensorRef]) -> None:
        """A view/reshape asking for a size equal to a channel count the model read (``B, N, C = x.shape``) of a
        group the reshaped tensor does not hold: after pruning that group the size would change while the
        tensor does not, so the group is left alone. When the reshaped tensor holds a group whose count of that
        size was read, the size is taken to be that one (each block of a model reading its own width of the same
        size does not blame the others)."""
        sizes = requested_sizes(op)
        if not sizes or not self.read_sizes or not refs:
            return
        held = {self.find(t.space) for t in self.tags_of(refs[0])}
        for size in set(sizes):
            roots = {self.find(space) for space in self.read_sizes.get(size, ())}
            if roots & held:
                continue
            for root in roots:
                self.block(root, f"its channel count, read from a tensor's shape, sizes the reshape "
                                 f"'{op.name}' at {op.location} of a tensor that does not hold these channels")

    def size_query(self, op: Op, x: TensorRef) -> None:
        """x.shape / x.size(d): remember spaces whose channel count the model read."""
        dim = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else None)
        for tag in self.tags_of(x):
            if dim is None or (isinstance(dim, int) and dim % len(x.shape) == tag.dim):
                self.queried.add(self.find(tag.space))
                if tag.length == self.spaces[tag.space].channels:  # the read size is the channel count
                    self.read_sizes.setdefault(x.shape[tag.dim], set()).add(tag.space)

    def readers(self, value: int) -> list[Op]:
        """The recorded ops that read a traced value."""
        if self._readers is None:
            self._readers = {}
            for op in self.recorder.ops:
                for ref in refs_in((op.args, op.kwargs)):
                    if ref.value is not None:
                        self._readers.setdefault(ref.value, []).append(op)
        return self._readers.get(value, [])


def _record(model: nn.Module, sample: Any, leaf_names: dict[nn.Module, str], param_names: dict[int, str],
            watched: Set[nn.Module] = frozenset()
            ) -> tuple[Recorder, Any, set[nn.Module], dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]]]:
    """One traced forward pass: the recorder, the model's output, the layers recognised by a pattern (not
    their type) whose first call the adapter could not confirm (:meth:`~acps_core.layers.LayerAdapter.confirm`),
    and the first call's arguments of each ``watched`` module."""
    recorder = Recorder(leaf_names, param_names)
    for tensor in tensors_in(sample):
        recorder.add_value(tensor)
    calls: dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def remember(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.setdefault(module, (args, kwargs))

    # Hooks with kwargs on the leaf modules only: a layer called as conv(input=x) is recorded too.
    handles = []
    for module in leaf_names:
        handles.append(module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(recorder.post_hook, with_kwargs=True, always_call=True))
        if by_pattern(module):
            handles.append(module.register_forward_pre_hook(remember, with_kwargs=True))
    for module in watched:
        handles.append(module.register_forward_pre_hook(remember, with_kwargs=True))
    failure: Exception | None = None
    try:
        with torch.no_grad(), recorder:
            output = forward(model, sample)
    except Exception as exc:
        failure = exc
    finally:
        for handle in handles:
            handle.remove()
    if failure is not None:
        # Explained once the hooks are gone: a DataError when the data's dtype is at fault, else a GraphError.
        raise explain_trace_failure(model, sample, failure) from failure
    unconfirmed = set()
    for module, (args, kwargs) in calls.items():
        adapter = adapter_for(module)
        if module not in watched and (adapter is None or not adapter.confirm(module, args, kwargs)):
            unconfirmed.add(module)
    return recorder, output, unconfirmed, {m: calls[m] for m in watched if m in calls}


def build_channel_graph(model: nn.Module, data: Any) -> ChannelGraph:
    """Trace ``model`` on ``data`` (a tensor, or a tuple of the forward's arguments) and find its channel groups.

    Only the first two samples of the data are used. The model is run under ``torch.no_grad()`` in whatever mode
    it is in; the caller puts it in eval mode. Nothing of the model is changed.

    Raises:
        GraphError: when the forward pass raises, naming the error.
        DataError: when it raises on data whose dtype is not the parameters' and runs once the data is converted
            (integer, bool or complex images; see :func:`~acps_core.model_checks.explain_trace_failure`).
    """
    for cache in BUILD_CACHES:  # what trials found on another model's modules does not hold for these
        cache.clear()
    module_names: dict[nn.Module, str] = {}
    module_types: dict[str, str] = {}
    for name, module in model.named_modules():
        module_names.setdefault(module, name)
        module_types[name] = type(module).__name__
    leaf_names = {m: n for m, n in module_names.items() if whole_layer(m) is not None}

    param_names = {id(p): n for n, p in model.named_parameters()}
    buffer_names = {id(b): n for n, b in model.named_buffers()}
    for key, name in buffer_names.items():
        param_names.setdefault(key, name)
    sample = trace_sample(data)
    recorder, output, unconfirmed, _ = _record(model, sample, leaf_names, param_names)
    refused: dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    if unconfirmed:  # layers recognised by their parts whose forward is not what their adapter assumes
        leaf_names = {m: n for m, n in leaf_names.items() if m not in unconfirmed}
        recorder, output, _, refused = _record(model, sample, leaf_names, param_names, unconfirmed)

    named = {name: module for module, name in module_names.items()}
    shared, families = shared_weights(model, module_names)
    builder = GroupBuilder(recorder, shared, named, set(buffer_names.values()))
    first = next(iter(tensors_in(sample)), None)
    builder.batch = first.shape[0] if first is not None and first.dim() > 0 and first.shape[0] > 0 else 1
    builder.run()
    for family in families:
        keep_tied(builder, family)
    for module, call in refused.items():  # a module its pattern's adapter refused says why on its channels
        if (adapter := adapter_for(module)) is not None:
            builder.explain_first(adapter.unconfirmed(module, module_names[module]),
                                  [recorder.value_of(t) for t in tensors_in(call)], f"{module_names[module]}.")
    output_layers: list[str] = []
    for tensor in tensors_in(output):
        value = recorder.value_of(tensor)
        for tag in builder.tags.get(value, []) if value is not None else []:
            builder.block(tag.space, "its channels are the model's output, whose shape must not change")
            producer = builder.spaces[tag.space].producer
            if producer not in output_layers:
                output_layers.append(producer)
    graph = _assemble(model, builder, output_layers, module_types)
    graph.output = output
    graph.other_macs = builder.other_macs / builder.batch
    return graph


def _assemble(model: nn.Module, builder: GroupBuilder, output_layers: list[str],
              module_types: dict[str, str]) -> ChannelGraph:
    """Turn the builder's spaces into numbered groups and describe every Conv/Linear layer."""
    group_of_root: dict[int, int] = {}
    groups: list[ChannelGroup] = []
    for space_id, space in enumerate(builder.spaces):
        root = builder.find(space_id)
        if root not in group_of_root:
            top = builder.spaces[root]
            reasons = list(top.reasons)
            problem = structure_problem(top.channels, top.unit, top.blocks, top.aligned)
            if problem:
                reasons.append(problem)
            elif atom_size(top.unit, top.blocks, top.aligned) >= top.channels > 1:
                reasons.append(f"its {top.channels} channels form one unit (a single head, group or chunk), which "
                               "cannot be removed without removing all of them")
            group_of_root[root] = len(groups)
            groups.append(ChannelGroup(len(groups), top.channels, [], reasons=reasons, unit=top.unit,
                                       blocks=top.blocks, aligned=top.aligned))
        group = groups[group_of_root[root]]
        if not space.folded:
            group.producers.append(space.producer)
        for use in space.followers:
            if use not in group.followers:
                group.followers.append(use)
        for use in space.consumers:
            if use not in group.consumers:
                group.consumers.append(use)

    layers: dict[str, LayerInfo] = {}
    attention = {f"{name}.{path}": name for name, module in model.named_modules()
                 if isinstance(adapter := adapter_for(module), AttentionAdapter)
                 and (path := adapter.projection(module)) is not None}
    # The layers inside an attention module traced whole (its q/k/v projections) but its out projection.
    fused = {f"{name}.{path}" for name, module in model.named_modules()
             if isinstance(adapter := adapter_for(module), AttentionAdapter) and name in builder.layers
             for path, _ in module.named_modules() if path and path != adapter.projection(module)}
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is None or adapter.role == "follower" or name in layers:
            continue
        entry = builder.layers.get(name)
        if name in fused or (entry is None and by_pattern(module)):
            continue  # part of an attention module traced whole; or such a module traced function by function
        if entry is None and name in attention:
            owner = attention[name]
            layers[name] = LayerInfo(name, type(module).__name__, None,
                                     reason=f"the out projection of attention {owner}, which acps could not trace "
                                            f"as a whole (see {owner})")
            continue
        if entry is None:
            reason = ("not called in the forward pass on the calibration data" if adapter.traced_whole(module) else
                      f"a {type(module).__name__} with its own forward or extra parameters, which acps does not "
                      "prune (its inputs are left alone too)")
            layers[name] = LayerInfo(name, type(module).__name__, None, reason=reason)
            continue
        out_group = group_of_root[builder.find(entry["out"])] if entry["out"] is not None else None
        in_uses = [(group_of_root[builder.find(space)], use) for space, use in entry["in"]]
        reason = entry["reason"]
        if reason is None and out_group is not None and not groups[out_group].prunable:
            reason = "; ".join(groups[out_group].reasons)
        layers[name] = LayerInfo(name, type(module).__name__, entry["geometry"], out_group, in_uses, reason,
                                 entry.get("repeat", 1), entry.get("calls", 1))
    slots = {name: (adapter.output_parameters(module), adapter.input_parameters(module))
             for name, module in model.named_modules() if (adapter := adapter_for(module)) is not None}
    graph = ChannelGraph(layers, groups, output_layers, module_types, slots=slots)
    graph.norms_over_channels = dict(builder.norms_over_channels)
    return graph
