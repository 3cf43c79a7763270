"""Torch functions that do a layer's work with the model's parameters: ``F.batch_norm``, ``F.group_norm``,
``F.instance_norm``, ``F.layer_norm``, ``F.rms_norm``, ``F.prelu``, ``F.conv*`` and ``F.linear``, called from a
module's own forward (timm's ``BatchNormAct2d``, ``LayerNorm2d``, ``Conv2dSame``) or from any other code.

They are mapped by what they compute on the channel dimension, not by which module calls them:

- a norm or PReLU keeps one entry per channel in each of its per-channel arguments (weight, bias, running
  statistics), which follow the channels of its input. When those arguments all belong to one module with a
  follower adapter (a subclass of ``nn.BatchNorm2d`` with its own forward), that module follows the channels and is
  sliced by its adapter, size attributes included; otherwise each argument is sliced where it lives, as a bare
  parameter or buffer. A norm whose statistics run over the channels (``layer_norm`` and ``rms_norm`` over the last
  dim) is masked by recomputing it over the kept channels (:mod:`acps_core.graph.masking`).
- a conv or linear called with a module's own ``weight`` (and ``bias``) is that module's computation: it is mapped
  as if the module were called (:func:`acps_core.graph.modules.module_op`). One called with a weight computed in
  the forward pass (weight standardisation) cannot be pruned exactly, and says so.

Every mapping is proven by the check by execution (:mod:`acps_core.graph.verify`), like the rest of the graph.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from acps_core.graph.modules import follow, module_op
from acps_core.graph.spaces import Tag
from acps_core.graph.trace import Op, TensorRef
from acps_core.layers.base import STATISTICS, adapter_for
from acps_core.layers.norm import approximate_norms_allowed, approximation_refused

if TYPE_CHECKING:
    from acps_core.graph.build import GroupBuilder

#: Norm-like functions: name -> the (position, keyword) of each per-channel argument.
NORM_ARGUMENTS: dict[str, tuple[tuple[int, str], ...]] = {
    "batch_norm": ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")),
    "instance_norm": ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")),
    "group_norm": ((2, "weight"), (3, "bias")),
    "layer_norm": ((2, "weight"), (3, "bias")),
    "rms_norm": ((2, "weight"),),
    "prelu": ((1, "weight"),),
}
#: Norms whose statistics run over the channels they normalise (the last dims).
OVER_CHANNELS = frozenset({"layer_norm", "rms_norm"})
#: Functions that are a layer's computation when called with a module's weight.
LAYER_FUNCTIONS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                             "conv_transpose3d", "linear", "embedding"})


def argument(op: Op, position: int, key: str) -> Any:
    """An argument of a recorded call, given positionally or by keyword (None when absent)."""
    return op.args[position] if len(op.args) > position else op.kwargs.get(key)


def _owner(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


def functional_norm(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
                    where: str) -> None:
    """A norm or PReLU called as a function: its per-channel arguments follow the channels of its input."""
    x = argument(op, 0, "input")
    all_tags = [t for r in tagged for t in builder.tags_of(r)]
    if not isinstance(x, TensorRef) or not op.outputs or any(r is not x for r in tagged):
        builder.block_tags(all_tags, f"{where} uses these channels as a norm's parameter or statistic")
        return
    ndim = len(x.shape)
    per_channel = [(key, ref) for position, key in NORM_ARGUMENTS[op.name]
                   if isinstance(ref := argument(op, position, key), TensorRef)]
    tags = builder.tags_of(x)
    if op.name in OVER_CHANNELS:
        shape = argument(op, 1, "normalized_shape")
        count = len(shape) if isinstance(shape, (list, tuple)) else 1
        channel_dim = ndim - 1
        mixed = set(range(ndim - count, ndim)) if count > 1 else set()
    else:
        channel_dim = 1 if ndim > 1 else 0
        mixed = set()
        if op.name == "prelu" and all(math.prod(r.shape) == 1 for _, r in per_channel):
            builder.set_tags(op, tags)  # one shared slope: element-wise
            return
    builder.block_tags([t for t in tags if t.dim in mixed], f"{where} normalises over several dims including "
                                                           "these channels")
    tags = [t for t in tags if t.dim not in mixed]
    at_channels = [t for t in tags if t.dim == channel_dim]
    passing = [t for t in tags if t.dim != channel_dim]
    if op.name in ("layer_norm", "rms_norm", "group_norm") and not any(k == "weight" for k, _ in per_channel):
        if op.name != "group_norm" and channel_dim in {t.dim for t in tags}:
            builder.block_tags(at_channels, f"{where} normalises over these channels without a weight acps could "
                                            "follow them by")
            at_channels = []
    unit = 1
    if op.name == "group_norm":
        groups = argument(op, 1, "num_groups")
        unit = x.shape[1] // groups if isinstance(groups, int) and groups > 0 else 0
        if not unit:
            builder.block_tags(at_channels, f"{where} has a group count acps cannot read")
            at_channels = []
    followed = _follow_module(builder, op, per_channel, at_channels, channel_dim, unit, where)
    if followed is None:
        followed = _follow_parameters(builder, op, per_channel, at_channels, channel_dim, unit, where)
    builder.set_tags(op, followed + passing)


def _follow_module(builder: GroupBuilder, op: Op, per_channel: list[tuple[str, TensorRef]], tags: list[Tag],
                   channel_dim: int, unit: int, where: str) -> list[Tag] | None:
    """The per-channel arguments are all one follower module's own: that module follows the channels (None when
    they are not)."""
    names = [r.param for _, r in per_channel]
    if not per_channel or any(n is None for n in names):
        return None
    owners = {_owner(n)[0] for n in names if n is not None}
    if len(owners) != 1:
        return None
    owner = owners.pop()
    module = builder.modules.get(owner)
    adapter = adapter_for(module) if module is not None else None
    if module is None or adapter is None or adapter.role != "follower" or not adapter.follows(module):
        return None
    known = {slot for slot, _, _ in adapter.output_parameters(module)} | STATISTICS
    if not {_owner(n)[1] for n in names if n is not None} <= known or not set(module._parameters) <= known:
        return None
    kind = type(module).__name__
    followed = follow(builder, op, owner, kind, tags, channel_dim, unit)
    if op.name in OVER_CHANNELS and followed:
        builder.norms_over_channels[f"{owner}.weight"] = op.name
        if not approximate_norms_allowed():
            builder.block_tags(followed, approximation_refused(f"{owner} ({kind}) at {op.location}"))
    return followed


def _follow_parameters(builder: GroupBuilder, op: Op, per_channel: list[tuple[str, TensorRef]], tags: list[Tag],
                       channel_dim: int, unit: int, where: str) -> list[Tag]:
    """Each per-channel argument sliced where it lives, as a bare parameter or buffer."""
    if unit > 1:
        builder.block_tags(tags, f"{where} takes its group count as a constant, which would not follow a pruned "
                                 "channel count (use an nn.GroupNorm subclass)")
        return []
    followed = []
    for tag in tags:
        if tag.block != 1 or tag.unit != 1:
            builder.block(tag.space, f"{where} works along dim {channel_dim}, which does not hold these channels "
                                     "one to one")
            continue
        if any(len(ref.shape) != 1 for _, ref in per_channel):
            builder.block(tag.space, f"{where} takes a per-channel argument that is not one entry per channel")
            continue
        if all(builder.param_use(op, tag, ref, 0, where) for _, ref in per_channel):
            followed.append(tag)
            weight = next((ref for key, ref in per_channel if key == "weight"), None)
            if op.name in OVER_CHANNELS and weight is not None and weight.param is not None:
                builder.norms_over_channels[weight.param] = op.name
            if op.name in OVER_CHANNELS and not approximate_norms_allowed():
                builder.block(tag.space, approximation_refused(where))
        else:
            builder.block(tag.space, f"{where} takes a per-channel argument that is neither a parameter nor a "
                                     "buffer of the model")
    return followed


def functional_layer(builder: GroupBuilder, op: Op, refs: list[TensorRef], where: str) -> bool:
    """A conv, linear or embedding called with a module's own weight (an embedding that scales its output, as
    Gemma's does): mapped as that module's call. False when the weight is not a layer module's own (the caller
    then blocks the channels, with :func:`why_not_layer`'s reason)."""
    x = argument(op, 0, "input")
    weight = argument(op, 1, "weight")
    bias = None if op.name == "embedding" else argument(op, 2, "bias")
    if not isinstance(x, TensorRef) or not isinstance(weight, TensorRef) or weight.param is None:
        return False
    owner, attr = _owner(weight.param)
    module = builder.modules.get(owner)
    adapter = adapter_for(module) if module is not None else None
    if module is None or adapter is None or adapter.role != "layer" or attr != "weight":
        return False
    if bias is not None and (not isinstance(bias, TensorRef) or bias.param != f"{owner}.bias"):
        return False
    if not set(module._parameters) <= {"weight", "bias"}:
        return False
    module_op(builder, Op(owner, module, (x,), {}, op.outputs, op.location), adapter)
    return True


def why_not_layer(builder: GroupBuilder, op: Op, where: str) -> str:
    """Why a conv or linear called as a function cannot be pruned."""
    weight = argument(op, 1, "weight")
    if isinstance(weight, TensorRef) and weight.value is not None and builder.origin(weight) is None:
        return (f"{where} uses a weight computed in the forward pass (such as weight standardisation, whose mean "
                "and variance run over every input channel), so removing channels would change the kept weights")
    if isinstance(weight, TensorRef) and weight.param is not None:
        owner = weight.param.rpartition(".")[0]
        module = builder.modules.get(owner)
        extra = sorted(set(module._parameters) - {"weight", "bias"}) if module is not None else []
        if module is not None and extra:
            return (f"{where} uses the weight of {owner} ({type(module).__name__}), which also has the parameters "
                    f"{', '.join(extra)} that acps does not know how to slice (register a layer adapter for its type: "
                    "acps_core.register_layer)")
    return f"{where} uses a weight that is not a Conv or Linear module's own parameter"


def computed_macs(op: Op, shapes: list[tuple[int, ...]]) -> float:
    """Multiply-accumulates of one traced function that multiplies matrices (convs, linears, matmuls, attention,
    einsum), for the whole traced batch; 0 for any other function."""
    tensors = [a for a in op.args if isinstance(a, TensorRef)] + [
        v for v in op.kwargs.values() if isinstance(v, TensorRef)]
    out = math.prod(shapes[op.outputs[0]]) if op.outputs else 0
    name = op.name
    try:
        if name == "linear":
            return float(out * tensors[1].shape[-1])
        if name.startswith("conv_transpose"):
            weight = tensors[1].shape
            return float(math.prod(tensors[0].shape) * math.prod(weight[1:]))
        if name in ("conv1d", "conv2d", "conv3d"):
            return float(out * math.prod(tensors[1].shape[1:]))
        if name in ("matmul", "mm", "bmm"):
            return float(out * tensors[0].shape[-1])
        if name == "rmatmul":
            return float(out * tensors[1].shape[-1])
        if name in ("addmm", "baddbmm", "addmv"):
            return float(out * tensors[1].shape[-1])
        if name == "scaled_dot_product_attention":
            q, k, v = tensors[:3]
            return float(math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1]))
        if name == "einsum":
            return _einsum_macs(op)
    except (IndexError, TypeError):
        return 0.0
    return 0.0


def _einsum_macs(op: Op) -> float:
    """An einsum's multiply-accumulates: the product of the sizes of every index it names (no ellipsis)."""
    equation = op.args[0] if op.args and isinstance(op.args[0], str) else None
    operands = [a for a in op.args[1:] if isinstance(a, TensorRef)]
    if len(op.args) == 2 and isinstance(op.args[1], (list, tuple)):
        operands = [a for a in op.args[1] if isinstance(a, TensorRef)]
    if equation is None or "..." in equation:
        return 0.0
    inputs = equation.split("->")[0].replace(" ", "").split(",")
    sizes: dict[str, int] = {}
    for letters, ref in zip(inputs, operands):
        for letter, size in zip(letters, ref.shape):
            sizes[letter] = size
    return float(math.prod(sizes.values())) if len(operands) > 1 else 0.0
