"""The channel rules of layers traced whole (Conv, Linear, norms, nn.MultiheadAttention, and any type registered with
:func:`~acps_core.layers.register_layer`): what a call of one does to the channels it reads and produces. The
layer's adapter (:mod:`acps_core.layers`) says where its channels sit; the rules here decide how the channel
spaces flow through it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import nn

from acps_core.graph.model import ChannelUse, LayerGeometry
from acps_core.graph.recalls import called_again, remember_call
from acps_core.graph.spaces import Tag
from acps_core.graph.trace import Op, TensorRef, first_tensor, refs_in
from acps_core.layers import projections
from acps_core.layers.attention import CROSS_INPUTS, AttentionAdapter, other_layout, per_head
from acps_core.layers.base import LayerAdapter
from acps_core.layers.norm import approximate_norms_allowed, approximation_refused

if TYPE_CHECKING:
    from acps_core.graph.build import GroupBuilder


def module_op(builder: GroupBuilder, op: Op, adapter: LayerAdapter) -> None:
    """A call of a layer traced whole, by its adapter's role."""
    module = op.module
    assert module is not None
    name = op.name
    x = first_tensor((op.args, op.kwargs))
    in_tags = builder.tags_of(x)
    touched = builder.touched.get(name)
    if touched is not None and adapter.role != "attention" and called_again(builder, op, in_tags):
        return  # it reads its channels where its first call did: one set of channels for both
    if touched is not None:
        # A module called again on other channels (or attention traced whole) ties what acps does not map.
        reason = f"called more than once in one forward pass (again at {op.location})"
        for space in touched + [t.space for t in in_tags]:
            builder.block(space, f"{name} is {reason}")
        if name in builder.layers:
            builder.layers[name]["reason"] = builder.layers[name]["reason"] or reason
            builder.other_macs += _call_macs(builder, op, module, adapter)  # (its first call's entry holds one)
    touched = builder.touched.setdefault(name, [])
    touched.extend(t.space for t in in_tags)
    shared = builder.shared_weights.get(name)
    if shared:
        # Slicing its inputs (or, for a norm, its parameters) would unshare the weights.
        builder.block_tags(in_tags, f"{name}'s parameters are shared with {shared}")
    if adapter.role == "attention":
        assert isinstance(adapter, AttentionAdapter)
        attention_module(builder, op, module, adapter, touched)
    elif adapter.role == "follower":
        follower_module(builder, op, module, adapter, in_tags, x)
    else:
        layer_module(builder, op, module, adapter, in_tags, x, touched)
    if name not in builder.first_calls:
        remember_call(builder, op, in_tags)


def _call_macs(builder: GroupBuilder, op: Op, module: nn.Module, adapter: LayerAdapter) -> float:
    """Multiply-accumulates of one call of a layer (the whole batch it was called on); for attention, its first
    call's per sample times the traced batch."""
    entry = builder.layers[op.name]
    x = first_tensor((op.args, op.kwargs))
    if isinstance(adapter, AttentionAdapter):  # (with its out projection and any fixed part)
        inner = adapter.projection(module)
        projection = builder.layers.get(f"{op.name}.{inner}") if inner is not None else None
        per_sample = entry["geometry"].macs() + (projection["geometry"].macs() if projection else 0.0)
        return float(per_sample * builder.batch + adapter.fixed_macs(module))
    if x is None or not op.outputs:
        return float(entry["geometry"].macs() * builder.batch)
    out_shape = builder.recorder.shapes[op.outputs[0]]
    geometry = adapter.geometry(op.name, module, x.shape, out_shape, x.dtype)
    return geometry.macs() * (out_shape[0] if out_shape else 1)


def follower_module(builder: GroupBuilder, op: Op, module: nn.Module, adapter: LayerAdapter, in_tags: list[Tag],
                    x: TensorRef | None) -> None:
    """A norm or per-channel activation: its parameters follow the channels along its channel dim one to one
    (in whole units for a GroupNorm); the other dims pass through, unless it mixes them (a LayerNorm over
    several dims)."""
    if not adapter.follows(module):
        builder.set_tags(op, in_tags)  # no per-channel parameter (a PReLU with one shared slope): element-wise
        return
    name, kind = op.name, type(module).__name__
    ndim = len(x.shape) if x is not None else 0
    channel_dim = adapter.input_dim(module, ndim)
    mixed = adapter.mixed_dims(module, ndim)
    builder.block_tags([t for t in in_tags if t.dim in mixed],
                 f"{name} ({kind}) at {op.location} normalises over several dims including these channels")
    kept = [t for t in in_tags if t.dim not in mixed]
    followed = follow(builder, op, name, kind, kept, channel_dim, adapter.follow_unit(module))
    if adapter.approximate and not approximate_norms_allowed():
        builder.block_tags(followed, approximation_refused(f"{name} ({kind}) at {op.location}"))
    builder.set_tags(op, followed + [t for t in kept if t.dim != channel_dim])


def layer_module(builder: GroupBuilder, op: Op, module: nn.Module, adapter: LayerAdapter, in_tags: list[Tag],
                 x: TensorRef | None, touched: list[int]) -> None:
    """A layer that reads input channels and produces its own (Conv, ConvTranspose, Linear): its input channels
    are consumed there, its output channels start a space; a depthwise conv follows its input instead; a grouped
    conv keeps equal counts in its groups."""
    name, kind = op.name, type(module).__name__
    out_value = op.outputs[0] if op.outputs else None
    out_shape = builder.recorder.shapes[out_value] if out_value is not None else ()
    in_shape = x.shape if x is not None else ()
    channel_dim = adapter.output_dim(module, len(out_shape)) if out_shape else 1
    weight_dtype = next((p.dtype for p in module.parameters(recurse=False)), None)
    dtype = x.dtype if x is not None else weight_dtype
    assert dtype is not None, f"{name} has no parameter and no input"
    in_dim = adapter.input_dim(module, len(in_shape)) if in_shape else 1
    geometry = adapter.geometry(name, module, _per_sample(in_shape, builder.batch, in_dim),
                                _per_sample(out_shape, builder.batch, channel_dim), dtype)
    entry = builder.layers.setdefault(name, {"geometry": geometry, "spaces": [], "in": [], "out": None,
                                       "reason": None, "location": op.location})
    groups = geometry.groups
    in_dim = adapter.input_dim(module, len(in_shape)) if x is not None else 1
    if geometry.depthwise and not geometry.transposed:
        # Depthwise: output channel c is input channel c filtered; it follows the input's group(s).
        for tag in follow(builder, op, name, kind, in_tags, 1):
            entry["in"].append((tag.space, builder.use(name, kind, tag)))
            entry["out"] = entry["out"] if entry["out"] is not None else tag.space
        builder.set_tags(op, [t for t in in_tags if t.dim == 1 and t.block == 1 and t.unit == 1])
        if not entry["in"]:
            entry["reason"] = entry["reason"] or (
                "depthwise convolution whose input channels come from no prunable layer")
        return
    for tag in in_tags:
        if tag.dim != in_dim:
            builder.block(tag.space, f"{name} ({kind}) at {op.location} reads these channels along dim "
                               f"{tag.dim}, not its channel dim {in_dim}")
        elif tag.unit != 1:
            builder.block(tag.space, f"{name} ({kind}) at {op.location} reads these channels split in units")
        elif groups > 1 and (geometry.transposed or not spread_over_groups(builder, tag, geometry)):
            builder.block(tag.space, f"grouped convolution {name} (groups={groups}) at {op.location} reads "
                               "these channels together with others; acps keeps its groups only when "
                               "one group of channels feeds it whole (or shuffled evenly over its groups)")
        else:
            if groups > 1:  # every conv group keeps the same input count
                builder.require(tag.space, blocks=builder.spaces[tag.space].channels * groups // (tag.stop - tag.start))
            use = builder.use(name, kind, tag)
            builder.spaces[tag.space].consumers.append(use)
            entry["in"].append((tag.space, use))
    if out_value is None:
        return
    space = builder.new_space(name, geometry.out_channels)
    touched.append(space)
    entry["spaces"].append(space)
    entry["out"] = space
    if entry["reason"]:
        builder.block(space, f"{name} is {entry['reason']}")
    if groups > 1:
        if geometry.transposed:
            builder.block(space, f"{name} is a grouped transposed convolution, which acps does not prune")
        else:
            builder.require(space, blocks=groups)  # every conv group keeps the same output count
    shared = builder.shared_weights.get(name)
    if shared:
        builder.block(space, f"{name}'s weight is shared with {shared}")
        entry["reason"] = entry["reason"] or f"weight shared with {shared}"
    builder.tags[out_value] = [builder.whole(space, channel_dim)]


def _per_sample(shape: tuple[int, ...], batch: int, channel_dim: int) -> tuple[int, ...]:
    """A layer's input or output shape for one sample: batch 1. When the leading dim is not the batch (windows of
    a Swin block or patches of a MobileViT block, ``batch * k`` rows; a sequence-first ``(tokens, batch,
    channels)`` tensor), the layer's positions per sample are kept right: with the channels last, all positions of
    a sample go into one dim, ``(1, positions, channels)``; otherwise the ``k`` goes into the first dim after the
    leading one that is not the channel dim."""
    if not shape or shape[0] == batch:
        return (1, *shape[1:]) if shape else shape
    positions = math.prod(shape[:-1])
    if channel_dim == len(shape) - 1 and batch and positions % batch == 0:
        return (1, positions // batch, shape[-1])
    rows = shape[0] // batch if batch and shape[0] % batch == 0 else 1
    out = [1, *shape[1:]]
    if rows > 1:
        if len(out) == 2:
            out.insert(1, rows)  # (batch * k, C) -> (1, k, C)
        else:
            position = 2 if channel_dim == 1 else 1
            out[position] *= rows
    return tuple(out)


def follow(builder: GroupBuilder, op: Op, name: str, kind: str, in_tags: list[Tag], channel_dim: int,
           unit: int = 1) -> list[Tag]:
    """A layer whose parameters follow its input channels one to one (norms, depthwise convs); with
    ``unit > 1`` (GroupNorm) the channels must go in whole norm groups. Returns the tags it passes on."""
    good = []
    for tag in in_tags:
        if tag.dim != channel_dim:
            continue
        if tag.block != 1 or tag.unit != 1:
            builder.block(tag.space, f"{name} ({kind}) at {op.location} works along dim {channel_dim}, which "
                                  "does not hold these channels one to one")
            continue
        if unit > 1 and (tag.offset % unit or tag.length % unit or tag.start % unit or not tag.contiguous):
            builder.block(tag.space, f"{name} ({kind}) at {op.location} has norm groups of {unit} channels that "
                                  "do not line up with these channels")
            continue
        if unit > 1:
            builder.require(tag.space, unit=unit)
        builder.spaces[tag.space].followers.append(builder.use(name, kind, tag))
        good.append(tag)
    return good


def spread_over_groups(builder: GroupBuilder, tag: Tag, geometry: LayerGeometry) -> bool:
    """Whether a grouped conv's groups each read an equal, consecutive share of the tag's channels, in
    shares that tile the tag's space: then the space keeping equal counts in those shares keeps the conv's
    groups equal. True for one group of channels feeding the conv whole; after a channel shuffle, for each
    of its units spread evenly over the conv's groups."""
    channels, groups = tag.stop - tag.start, geometry.groups
    share, remainder = divmod(channels, groups)
    if tag.block != 1 or remainder or tag.start % share or builder.spaces[tag.space].channels % share:
        return False
    per_group = geometry.in_channels // groups
    step = tag.stride or 1
    return all((tag.offset + k * step) // per_group == k // share for k in range(channels))


def attention_module(builder: GroupBuilder, op: Op, module: nn.Module, adapter: AttentionAdapter,
                     touched: list[int]) -> None:
    """nn.MultiheadAttention (or self-attention with a fused qkv projection), three layers in one module:

    - its packed q/k/v projection consumes the embed_dim channels of query, key and value, which share the
      projection's columns, so they must be the same channels (or channels pruned alike);
    - its heads form a group of their own: the q/k/v projection rows of each head and the out projection's
      matching inputs, pruned in whole heads;
    - its out projection produces the output channels, a space of its own (usually joined to the residual
      stream by the add that follows), with the norms over them that the module holds as followers. Without
      an out projection (BoTNet), the heads are the module's output channels.
    """
    name = op.name
    where = f"{type(module).__name__} {name} at {op.location}"
    inputs = [first_tensor((op.args, op.kwargs)), None, None] if adapter.self_attention() else call_inputs(op)
    cross = next((op.kwargs[k] for k in CROSS_INPUTS if isinstance(op.kwargs.get(k), TensorRef)), None)
    if adapter.self_attention() and cross is not None:  # cross-attention: keys and values from another sequence
        inputs[1] = inputs[2] = cross
    query = inputs[0]
    num_heads, head_dim = adapter.heads(module)
    width = num_heads * head_dim
    others = [r for r in refs_in((op.args, op.kwargs)) if all(r is not i for i in inputs)]
    biases = [r for r in others if isinstance(r, TensorRef) and (per_head(r.shape, num_heads)
                                                               or other_layout(r.shape, num_heads))]
    builder.block_tags([t for r in others for t in builder.tags_of(r)
                        if not (any(r is b for b in biases) and _head_tag(t, head_dim, width))],
                       f"{where} reads these channels as a mask, which acps does not map")
    if query is None or not op.outputs:
        builder.block_tags([t for r in inputs for t in builder.tags_of(r)], f"{where} could not be traced")
        return
    channel_dim = adapter.input_dim(module, len(query.shape))
    # Tokens per sequence: every dim but the batch (or, sequence-first, the sequence's) and the channels.
    batch_dim = 0 if adapter.batch_first(module) else 1
    if len(query.shape) == 2:  # one unbatched sequence
        tokens, rows = query.shape[0], 1
    else:
        tokens = math.prod(s for d, s in enumerate(query.shape) if d not in (batch_dim, channel_dim))
        rows = max(1, query.shape[batch_dim] // builder.batch)
    weight_dtype = next(p.dtype for p in module.parameters())
    geometry = LayerGeometry(name, "MultiheadAttention", query.shape[channel_dim], width, 1, (1,), (1,),
                             (1, tokens, query.shape[channel_dim]), (1, tokens, width), query.dtype, weight_dtype,
                             rows, adapter.key_share(module), adapter.kv_share(module), adapter.attended(module))
    entry = builder.layers.setdefault(name, {"geometry": geometry, "spaces": [], "in": [], "out": None,
                                          "reason": None, "location": op.location})
    embed_inputs(builder, op, name, inputs, channel_dim, entry, where)
    if fixed := adapter.input_fixed(module):
        builder.block_tags(builder.tags_of(query), f"{where}: {fixed}")
    builder.other_macs += adapter.fixed_macs(module)

    heads = builder.new_space(name, width)
    touched.append(heads)
    entry["spaces"].append(heads)
    entry["out"] = heads
    builder.require(heads, unit=adapter.unit(module), aligned=adapter.aligned(module))
    _per_head_tensors(builder, op, heads, biases, head_dim, where)
    for part in adapter.tied_parts(module):
        first = builder.head_parts.setdefault(part, heads)
        if first != heads:
            builder.union(first, heads, f"{where} shares {type(part).__name__} with another attention module")
    made = [heads]
    inner = adapter.projection(module)
    space = heads
    if inner is not None:
        out_proj = module.get_submodule(inner)
        projection = f"{name}.{inner}"
        kind = type(out_proj).__name__ if isinstance(out_proj, nn.Conv2d) else "Linear"
        use = ChannelUse(projection, kind)
        builder.spaces[heads].consumers.append(use)
        out_width = projections.out_width(out_proj)
        out_weight = out_proj.weight
        assert isinstance(out_weight, nn.Parameter)
        out_geometry = LayerGeometry(projection, "Linear", width, out_width, 1, (1,), (1,),
                                     (1, rows * tokens, width), (1, rows * tokens, out_width), query.dtype,
                                     out_weight.dtype)
        out_entry = builder.layers.setdefault(projection, {"geometry": out_geometry, "spaces": [], "in": [],
                                                        "out": None, "reason": entry["reason"],
                                                        "location": op.location})
        out_entry["in"].append((heads, use))
        space = builder.new_space(projection, out_width)
        touched.append(space)
        out_entry["spaces"].append(space)
        out_entry["out"] = space
        for path in adapter.projection_followers(module):
            follower = module.get_submodule(path)
            builder.spaces[space].followers.append(ChannelUse(f"{name}.{path}", type(follower).__name__))
        made.append(space)
    shared = "; ".join(f"{n}'s weights are shared with {builder.shared_weights[n]}"
                       for n in (name, f"{name}.{inner}" if inner else name) if n in builder.shared_weights)
    for blocked in made:
        if entry["reason"]:
            builder.block(blocked, f"{name} is {entry['reason']}")
        if shared:
            builder.block(blocked, shared)
    if shared:
        builder.block_tags([t for r in inputs for t in builder.tags_of(r)], shared)
    builder.tags[op.outputs[0]] = [builder.whole(space, channel_dim)]


def _head_tag(tag: Tag, head_dim: int, width: int) -> bool:
    """Whether ``tag`` marks the heads dim of a per-head tensor, one position per head of ``head_dim`` channels."""
    return (tag.dim, tag.unit, tag.block, tag.start, tag.stop) == (1, head_dim, 1, 0, width)


def _per_head_tensors(builder: GroupBuilder, op: Op, heads: int, biases: list[TensorRef], head_dim: int,
                      where: str) -> None:
    """Tensors with one slice per head that the module reads or returns (``(batch, heads, queries, keys)``): a
    position bias computed once and passed from block to block (T5's), attention weights. One a module returns
    carries its heads; one it reads ties its heads to the heads of the module that made it, so that both lose
    the same ones (and its head count stays what the tensor holds). One no attention module made keeps the heads."""
    width = builder.spaces[heads].channels
    layout = "in a layout acps does not map (it maps (batch, heads, queries, keys))"
    for ref in biases:
        found = [t for t in builder.tags_of(ref) if _head_tag(t, head_dim, width)]
        if other_layout(ref.shape, width // head_dim):
            builder.block(heads, f"{where} reads a tensor that may hold one slice per head (shape "
                                 f"{list(ref.shape)}) {layout}")
        elif not found:
            builder.block(heads, f"{where} reads a tensor with one slice per head (shape {list(ref.shape)}) that no "
                                 "attention layer acps prunes made, so pruning heads would not slice it")
        for tag in found:
            builder.union(heads, tag.space, f"{where} reads a per-head tensor made with these heads")
    for value in op.outputs[1:]:
        shape = builder.recorder.shapes[value]
        if per_head(shape, width // head_dim):
            builder.tags[value] = [Tag(heads, 1, 0, 1, 0, width, unit=head_dim)]
        elif other_layout(shape, width // head_dim):
            builder.block(heads, f"{where} returns a tensor that may hold one slice per head (shape {list(shape)}) "
                                 f"{layout}")


def embed_inputs(builder: GroupBuilder, op: Op, name: str, inputs: list[TensorRef | None], channel_dim: int,
                 entry: dict[str, Any], where: str) -> None:
    """The embed_dim channels query, key and value bring to an nn.MultiheadAttention: one consumer use (the
    packed projection's columns) for the query's channels, with key and value tied to them."""
    query = inputs[0]
    assert query is not None
    query_tags = builder.tags_of(query)
    mapped = []
    for tag in query_tags:
        if tag.dim != channel_dim:
            builder.block(tag.space, f"{where} reads these channels along dim {tag.dim}, not its embed_dim")
        elif tag.unit != 1:
            builder.block(tag.space, f"{where} reads these channels split in units")
        else:
            mapped.append(tag)
    for ref in inputs[1:]:
        if ref is None or ref.value == query.value:
            continue
        tags = builder.tags_of(ref)
        ours, theirs = (sorted(found, key=lambda t: (t.offset, t.start)) for found in (query_tags, tags))
        if len(ours) == len(theirs) and all(a.same_place(b) for a, b in zip(ours, theirs)):
            for a, b in zip(ours, theirs):
                builder.union(a.space, b.space, f"{where} reads them as query and as key/value")
            continue
        reason = (f"{where} reads its query and its key/value from different channels, which its packed "
                  "projection must prune alike")
        builder.block_tags(query_tags + tags, reason)
        mapped = []
    for tag in mapped:
        use = builder.use(name, "MultiheadAttention", tag)
        builder.spaces[tag.space].consumers.append(use)
        entry["in"].append((tag.space, use))


def call_inputs(op: Op) -> list[TensorRef | None]:
    """The query, key and value an nn.MultiheadAttention call was given (positionally or by name)."""
    found: list[TensorRef | None] = []
    for position, key in enumerate(("query", "key", "value")):
        ref = op.args[position] if len(op.args) > position else op.kwargs.get(key)
        found.append(ref if isinstance(ref, TensorRef) else None)
    return found
