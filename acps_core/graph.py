"""The channel graph: which channels of a model must be pruned together, traced on real data.

The model runs once on (up to two samples of) the calibration data under a ``TorchFunctionMode``, which sees
every torch function the forward pass calls, whatever Python control flow produced it. Conv and Linear layers
(and the norms that follow them) are recorded as whole modules; everything else is recorded function by
function. The output channels of each producer layer form a *channel space*; the recorded operations carry
each space forward through the model (element-wise ops, norms, pools, flatten, concat, depthwise convs) until
it reaches the layers that consume it. Operations that tie two spaces together (a residual add) merge them
into one :class:`ChannelGroup`, decided as one unit. Any use of a space this module cannot map exactly makes
its group unprunable, with the reason and the source line recorded, never a wrong prune.

The idea of a dependency graph over the traced operations, with coupled channels pruned as groups, comes from
Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (Torch-Pruning).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from acps_core.data import forward
from acps_core.errors import GraphError

_TORCH_DIR = os.path.dirname(torch.__file__)
_ACPS_DIR = os.path.dirname(__file__)

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)
PRUNABLE_TYPES = CONV_TYPES + LINEAR_TYPES
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Modules with one parameter entry per channel of their input, which they follow one to one.
FOLLOWER_TYPES: tuple[type[nn.Module], ...] = (*NORM_TYPES, nn.PReLU)
_LEAF_TYPES = PRUNABLE_TYPES + FOLLOWER_TYPES

#: Functions that only report a tensor's shape.
_SIZE_QUERIES = frozenset({"size", "get", "shape", "dim", "numel"})
_SIZE_QUERY = "<size query>"
#: Functions whose further tensor arguments only give a dtype or device.
_DTYPE_ONLY = frozenset({"to", "type_as"})

# Functions whose output has the input's channels at the same place, one to one.
_UNARY_ELEMENTWISE = frozenset({
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
    "hardtanh", "sigmoid", "tanh", "softplus", "softsign", "tanhshrink", "logsigmoid", "threshold", "rrelu",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "clamp", "clip",
    "abs", "neg", "exp", "log", "sqrt", "rsqrt", "square", "pow", "reciprocal", "sin", "cos", "erf",
    "contiguous", "clone", "detach", "float", "half", "bfloat16", "double", "to", "type_as", "requires_grad",
    "identity", "positive", "nan_to_num",
})
# Binary element-wise functions: operands of the same channels are coupled.
_BINARY_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "true_divide", "iadd", "isub", "imul", "idiv", "itruediv", "radd", "rsub",
    "rmul", "rdiv", "rtruediv", "maximum", "minimum", "max", "min", "where", "floor_divide", "fmod",
    "remainder", "addcmul", "addcdiv", "lerp", "floordiv", "rfloordiv", "ifloordiv", "mod", "rmod", "imod",
    "rpow", "ipow",
})
# Pools keep the channel dimension (dim 1) and only shrink the spatial ones.
_POOLS = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear",
})
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "prod", "std", "var", "logsumexp", "norm"})
_RESHAPES = frozenset({"view", "reshape", "flatten", "unsqueeze", "squeeze", "view_as", "reshape_as"})
_PERMUTES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "t"})


def _op_name(func: Any) -> str:
    """A torch function's plain name: ``__iadd__`` -> ``iadd``, ``add_`` -> ``add``, ``_max_pool2d`` ->
    ``max_pool2d``."""
    name = getattr(func, "__name__", repr(func))
    name = name.strip("_")
    if name.endswith("_"):
        name = name.rstrip("_")
    return name


def _user_location() -> str:
    """``file:line`` of the innermost frame outside torch and acps: the user's code that made the call."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (filename.startswith(_TORCH_DIR) or filename.startswith(_ACPS_DIR)):
            return f"{os.path.basename(filename)}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "<unknown>"


# ----------------------------------------------------------------------------------------------------------------
# What the graph reports
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class LayerGeometry:
    """The real geometry of one Conv/Linear layer, as traced on the calibration data.

    Shapes are per sample (batch dimension 1). ``kind`` is the module's class name (``Conv2d``, ``Linear``).
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dtype: torch.dtype
    weight_dtype: torch.dtype

    @property
    def depthwise(self) -> bool:
        """A conv with one group per input channel: its channel count follows its input."""
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def output_positions(self) -> int:
        """How many times per sample the layer's filters are applied (output pixels, or tokens for Linear)."""
        if self.kind in {t.__name__ for t in LINEAR_TYPES}:
            return math.prod(self.output_shape[1:-1])
        return math.prod(self.output_shape[2:])

    def macs(self, in_channels: int | None = None, out_channels: int | None = None) -> float:
        """Multiply-accumulates per sample at the given channel counts (the traced ones by default)."""
        cin = self.in_channels if in_channels is None else in_channels
        cout = self.out_channels if out_channels is None else out_channels
        # Depthwise: one group per channel, so every output sees in_channels/groups inputs whatever the count.
        inputs_per_output = self.in_channels / self.groups if self.depthwise else cin / self.groups
        return float(self.output_positions * cout * inputs_per_output * math.prod(self.kernel_size))


@dataclass(frozen=True)
class ChannelUse:
    """A layer touched by a channel group: channel ``c`` of the group is positions
    ``offset + c * block ... offset + (c + 1) * block - 1`` of the layer's channel dimension."""

    layer: str
    kind: str
    offset: int = 0
    block: int = 1


@dataclass
class ChannelGroup:
    """Channels that must be pruned together: the output channels of its producers, with every parameter tied
    to them (norms and depthwise convs that follow, the input channels of the layers that consume them)."""

    id: int
    channels: int
    producers: list[str]
    followers: list[ChannelUse] = field(default_factory=list)
    consumers: list[ChannelUse] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def name(self) -> str:
        """The group's name: its first producer layer."""
        return self.producers[0]


@dataclass
class LayerInfo:
    """One Conv/Linear layer of the model and how the graph sees it."""

    name: str
    kind: str
    geometry: LayerGeometry | None
    out_group: int | None = None
    in_groups: list[tuple[int, int]] = field(default_factory=list)  # (group id, block)
    reason: str | None = None

    @property
    def prunable(self) -> bool:
        return self.reason is None and self.out_group is not None


@dataclass(frozen=True)
class ParamSlice:
    """Where a channel group sits inside one parameter (or buffer): along ``dim``, channel ``c`` is entries
    ``offset + c * block`` to ``offset + (c + 1) * block - 1``."""

    module: str
    param: str
    dim: int
    offset: int
    block: int

    def per_channel(self, tensor: torch.Tensor, channels: int) -> torch.Tensor:
        """Sum ``tensor`` (shaped like the parameter) over everything but the group's channels: shape ``[channels]``."""
        moved = tensor.movedim(self.dim, 0).narrow(0, self.offset, channels * self.block)
        return moved.reshape(channels, -1).sum(dim=1)


class ChannelGraph:
    """Every Conv/Linear layer of a model and the channel groups found by tracing it.

    Build it with :func:`build_channel_graph`.
    """

    def __init__(self, layers: dict[str, LayerInfo], groups: list[ChannelGroup], output_layers: list[str],
                 module_types: dict[str, str], output: Any = None) -> None:
        #: The model's output on the traced samples (the first two of the calibration data).
        self.output = output
        self.layers = layers
        self.groups = groups
        self.output_layers = output_layers
        self._module_types = module_types

    def group(self, group_id: int) -> ChannelGroup:
        return self.groups[group_id]

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def module_type(self, name: str) -> str:
        """Class name of the module called ``name`` (as ``model.named_modules()`` names it)."""
        return self._module_types[name]

    def param_slices(self, group: ChannelGroup) -> list[ParamSlice]:
        """Every parameter entry tied to the group's channels (weights and biases; not norm statistics)."""
        slices = [ParamSlice(name, p, 0, 0, 1) for name in group.producers for p in ("weight", "bias")]
        for use in group.followers:
            slices += [ParamSlice(use.layer, p, 0, use.offset, 1) for p in ("weight", "bias")]
        for use in group.consumers:
            slices.append(ParamSlice(use.layer, "weight", 1, use.offset, use.block))
        return slices

    def channel_counts(self, layer: LayerInfo, kept: Mapping[int, int]) -> tuple[int, int]:
        """A layer's (input, output) channel counts when group ``g`` keeps ``kept[g]`` channels.

        Groups missing from ``kept`` keep all their channels.
        """
        geometry = layer.geometry
        assert geometry is not None
        cin = geometry.in_channels
        for group_id, block in layer.in_groups:
            removed = self.groups[group_id].channels - kept.get(group_id, self.groups[group_id].channels)
            cin -= removed * block
        if geometry.depthwise:
            return cin, cin  # its outputs are its inputs, filtered (several groups after a concat)
        cout = geometry.out_channels
        if layer.out_group is not None:
            cout = kept.get(layer.out_group, cout)
        return cin, cout

    def explain(self) -> dict[str, str]:
        """For every Conv/Linear layer: ``"prunable (group G)"`` or why it is left alone."""
        out = {}
        for name, layer in self.layers.items():
            if layer.prunable:
                out[name] = f"prunable (group {self.groups[layer.out_group].name})"  # type: ignore[index]
            else:
                out[name] = layer.reason or "not prunable"
        return out


# ----------------------------------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _TensorRef:
    """A tensor argument of a recorded op: the traced value it is (None for constants and parameters)."""

    value: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Op:
    name: str                      # function name, or the module's name for leaf modules
    module: nn.Module | None       # the leaf module, for module ops
    args: tuple[Any, ...]          # tensors replaced by _TensorRef
    kwargs: dict[str, Any]
    outputs: list[int]             # value ids of the tensor outputs
    location: str


def _replace_tensors(obj: Any, ref: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return ref(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_tensors(o, ref) for o in obj) if not hasattr(obj, "_fields") else obj
    if isinstance(obj, dict):
        return {k: _replace_tensors(v, ref) for k, v in obj.items()}
    return obj


def _tensors_in(obj: Any) -> Iterator[Any]:
    if isinstance(obj, (torch.Tensor, _TensorRef)):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors_in(o)


class _Recorder(TorchFunctionMode):
    """Records the torch functions and leaf-module calls of one forward pass."""

    def __init__(self, leaf_names: Mapping[nn.Module, str]) -> None:
        super().__init__()
        self.leaf_names = leaf_names
        self.ops: list[_Op] = []
        self.shapes: list[tuple[int, ...]] = []
        self._value_of: dict[int, int] = {}
        self._keepalive: list[torch.Tensor] = []  # keeps ids unique while tracing
        self._inside_leaf = 0
        self._paused = False
        self._pending: list[tuple[nn.Module, tuple[Any, ...], dict[str, Any], str]] = []

    def add_value(self, tensor: torch.Tensor) -> int:
        value = len(self.shapes)
        self.shapes.append(tuple(tensor.shape))
        self._value_of[id(tensor)] = value
        self._keepalive.append(tensor)
        return value

    def ref(self, tensor: torch.Tensor) -> _TensorRef:
        return _TensorRef(self._value_of.get(id(tensor)), tuple(tensor.shape), tensor.dtype)

    def value_of(self, tensor: torch.Tensor) -> int | None:
        return self._value_of.get(id(tensor))

    def _record(self, name: str, module: nn.Module | None, args: tuple[Any, ...], kwargs: dict[str, Any],
                out: Any, location: str) -> None:
        out_tensors = [t for t in _tensors_in(out) if isinstance(t, torch.Tensor)]
        in_refs = _replace_tensors(args, self.ref), _replace_tensors(kwargs, self.ref)
        touches_trace = any(r.value is not None for r in _tensors_in(in_refs))
        if not out_tensors:
            if touches_trace and name in _SIZE_QUERIES:
                # Remembered so that a reshape to a size computed from x.shape is not mistaken for a constant.
                self.ops.append(_Op(_SIZE_QUERY, None, in_refs[0], in_refs[1], [], location))
            elif touches_trace and name.endswith("setitem"):
                self.ops.append(_Op(name, module, in_refs[0], in_refs[1], [], location))
            return  # other non-tensor results cannot move channels
        outputs = [self.add_value(t) for t in out_tensors]
        self.ops.append(_Op(name, module, in_refs[0], in_refs[1], outputs, location))

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._paused and not self._inside_leaf:
            self._paused = True
            try:
                self._record(_op_name(func), None, args, kwargs, out, _user_location())
            finally:
                self._paused = False
        return out

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._paused:
            return
        if not self._inside_leaf:
            self._paused = True
            self._pending.append((module, args, kwargs, _user_location()))
            self._paused = False
        self._inside_leaf += 1

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._paused:
            return
        self._inside_leaf -= 1
        if not self._inside_leaf:
            self._paused = True
            try:
                pending_module, pending_args, pending_kwargs, location = self._pending.pop()
                self._record(self.leaf_names[module], pending_module, pending_args, pending_kwargs, output,
                             location)
            finally:
                self._paused = False


# ----------------------------------------------------------------------------------------------------------------
# From the recorded ops to channel groups
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tag:
    """Channels of space ``space`` sit along ``dim`` of a value, starting at ``offset``, ``block`` wide each."""

    space: int
    dim: int
    offset: int
    block: int


@dataclass
class _Space:
    producer: str
    channels: int
    followers: list[ChannelUse] = field(default_factory=list)
    consumers: list[ChannelUse] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


class _GroupBuilder:
    """Walks the recorded ops in order, carrying each producer's channels forward."""

    def __init__(self, recorder: _Recorder, module_names: Mapping[nn.Module, str],
                 shared_weights: Mapping[str, str]) -> None:
        self.recorder = recorder
        self.module_names = module_names
        self.shared_weights = shared_weights
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.tags: dict[int, list[_Tag]] = {}
        self.layers: dict[str, dict[str, Any]] = {}  # per Conv/Linear: geometry, out_space, in_spaces, reason
        self.touched: dict[str, list[int]] = {}  # per leaf module: the spaces its calls so far used
        self.queried: set[int] = set()  # spaces whose size the model read (x.shape, x.size())

    # -- union-find over spaces ---------------------------------------------------------------------------------
    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int, why: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.spaces[ra].channels != self.spaces[rb].channels:
            self.block(ra, why + f" joins {self.spaces[rb].channels} channels with {self.spaces[ra].channels}")
            self.block(rb, why + f" joins {self.spaces[ra].channels} channels with {self.spaces[rb].channels}")
        self.parent[rb] = ra

    def block(self, space: int, reason: str) -> None:
        reasons = self.spaces[self.find(space)].reasons
        if reason not in reasons:
            reasons.append(reason)

    def block_tags(self, tags: Sequence[_Tag], reason: str) -> None:
        for tag in tags:
            self.block(tag.space, reason)

    def new_space(self, producer: str, channels: int) -> int:
        self.spaces.append(_Space(producer, channels))
        self.parent.append(len(self.parent))
        return len(self.spaces) - 1

    # -- walking ops ---------------------------------------------------------------------------------------------
    def tags_of(self, ref: Any) -> list[_Tag]:
        if isinstance(ref, _TensorRef) and ref.value is not None:
            return self.tags.get(ref.value, [])
        return []

    def run(self) -> None:
        for op in self.recorder.ops:
            try:
                if op.module is not None:
                    self.module_op(op)
                else:
                    self.function_op(op)
            except Exception as exc:  # an op acps fails to analyse must block its groups, never crash
                refs = list(_tensors_in((op.args, op.kwargs)))
                self.block_tags([t for r in refs for t in self.tags_of(r)],
                                f"acps could not analyse '{op.name}' at {op.location} ({type(exc).__name__}: {exc})")

    def module_op(self, op: _Op) -> None:
        module = op.module
        assert module is not None
        name, kind = op.name, type(module).__name__
        x = _first_tensor((op.args, op.kwargs))
        in_tags = self.tags_of(x)
        out_value = op.outputs[0] if op.outputs else None
        touched = self.touched.get(name)
        if touched is not None:
            # A module called twice ties the channels of both calls together; acps does not map that.
            reason = f"called more than once in one forward pass (again at {op.location})"
            for space in touched + [t.space for t in in_tags]:
                self.block(space, f"{name} is {reason}")
            if name in self.layers:
                self.layers[name]["reason"] = self.layers[name]["reason"] or reason
        touched = self.touched.setdefault(name, [])
        touched.extend(t.space for t in in_tags)
        if isinstance(module, FOLLOWER_TYPES):
            if isinstance(module, nn.PReLU) and module.num_parameters == 1:
                if out_value is not None:
                    self.tags[out_value] = in_tags  # one shared slope: element-wise
                return
            self.follow(op, name, kind, in_tags, channel_dim=1)
            return
        is_linear = isinstance(module, LINEAR_TYPES)
        out_shape = self.recorder.shapes[out_value] if out_value is not None else ()
        channel_dim = len(out_shape) - 1 if is_linear else 1
        geometry = _geometry(name, module, x, out_shape)
        entry = self.layers.setdefault(name, {"geometry": geometry, "spaces": [], "in": [], "out": None,
                                              "reason": None, "location": op.location})
        groups = getattr(module, "groups", 1)
        in_dim = (len(x.shape) - 1) if (is_linear and x is not None) else 1
        if groups > 1 and groups == geometry.in_channels == geometry.out_channels:
            # Depthwise: output channel c is input channel c filtered; it follows the input's group(s).
            self.follow(op, name, kind, in_tags, channel_dim=1)
            for tag in in_tags:
                entry["in"].append((tag.space, 1))
                entry["out"] = entry["out"] if entry["out"] is not None else tag.space
            if not in_tags:
                entry["reason"] = entry["reason"] or (
                    "depthwise convolution whose input channels come from no prunable layer")
            return
        for tag in in_tags:
            if tag.dim != in_dim:
                self.block(tag.space, f"{name} ({kind}) at {op.location} reads these channels along dim "
                                      f"{tag.dim}, not its channel dim {in_dim}")
                continue
            if groups > 1:
                self.block(tag.space, f"consumed by grouped convolution {name} (groups={groups}) at "
                                      f"{op.location}, whose group structure acps does not yet prune")
                continue
            self.spaces[tag.space].consumers.append(ChannelUse(name, kind, tag.offset, tag.block))
            entry["in"].append((tag.space, tag.block))
        if out_value is None:
            return
        space = self.new_space(name, geometry.out_channels)
        touched.append(space)
        entry["spaces"].append(space)
        entry["out"] = space
        if entry["reason"]:
            self.block(space, f"{name} is {entry['reason']}")
        if groups > 1:
            self.block(space, f"{name} is a grouped convolution (groups={groups}); acps does not yet prune "
                              "its output channels")
        shared = self.shared_weights.get(name)
        if shared:
            self.block(space, f"{name}'s weight is shared with {shared}")
            entry["reason"] = entry["reason"] or f"weight shared with {shared}"
        self.tags[out_value] = [_Tag(space, channel_dim, 0, 1)]

    def follow(self, op: _Op, name: str, kind: str, in_tags: list[_Tag], channel_dim: int) -> None:
        """A layer whose parameters follow its input channels one to one (norms, depthwise convs)."""
        good = []
        for tag in in_tags:
            if tag.dim != channel_dim or tag.block != 1:
                self.block(tag.space, f"{name} ({kind}) at {op.location} normalises along dim {channel_dim}, "
                                      f"which does not hold these channels one to one")
                continue
            self.spaces[tag.space].followers.append(ChannelUse(name, kind, tag.offset, 1))
            good.append(tag)
        if op.outputs:
            self.tags[op.outputs[0]] = good

    def function_op(self, op: _Op) -> None:
        refs = [r for r in _tensors_in((op.args, op.kwargs))]
        tagged = [r for r in refs if self.tags_of(r)]
        if not tagged:
            return
        name = op.name
        all_tags = [t for r in tagged for t in self.tags_of(r)]
        where = f"torch function '{name}' at {op.location}"
        out = op.outputs[0] if op.outputs else None
        if name == _SIZE_QUERY:
            self.size_query(op, refs[0])
            return
        if name in _DTYPE_ONLY:
            refs = refs[:1]  # x.to(y) / x.type_as(y): y only gives a dtype and device
        if name in _UNARY_ELEMENTWISE | _BINARY_ELEMENTWISE and len(refs) == 1:
            if tagged[0] is refs[0] and out is not None and self.recorder.shapes[out] == refs[0].shape:
                self.tags[out] = self.tags_of(refs[0])
            else:
                self.block_tags(all_tags, f"{where} changes the shape of the tensor")
        elif name in _UNARY_ELEMENTWISE | _BINARY_ELEMENTWISE:
            # Element-wise with several tensor operands (x + y, clamp(x, min=t), x ** t): channels of one
            # operand meet the same positions of the others.
            self.binary(op, refs, where)
        elif name == "pad":
            self.pad(op, tagged, where)
        elif name in _POOLS:
            x = refs[0]
            tags = self.tags_of(x)
            if all(t.dim == 1 for t in tags) and x is tagged[0] and len(tagged) == 1 and out is not None:
                self.tags[out] = tags
            else:
                self.block_tags(all_tags, f"{where} pools along the channel dimension")
        elif name in _REDUCTIONS:
            self.reduction(op, tagged, where)
        elif name in _RESHAPES:
            self.reshape(op, tagged, where)
        elif name in _PERMUTES:
            self.permute(op, tagged, where)
        elif name == "cat" or name == "concat" or name == "concatenate":
            self.concat(op, where)
        else:
            self.block_tags(all_tags, f"{where} cannot be mapped channel by channel")

    def binary(self, op: _Op, refs: list[_TensorRef], where: str) -> None:
        out = op.outputs[0] if op.outputs else None
        if out is None:
            self.block_tags([t for r in refs for t in self.tags_of(r)], f"{where} modifies a tensor in place")
            return
        out_shape = self.recorder.shapes[out]
        ndim = len(out_shape)
        # The channel dims each operand brings, aligned to the output (broadcasting aligns from the right).
        aligned: list[tuple[_TensorRef, list[_Tag]]] = []
        for ref in refs:
            shift = ndim - len(ref.shape)
            aligned.append((ref, [_Tag(t.space, t.dim + shift, t.offset, t.block) for t in self.tags_of(ref)]))
        result: list[_Tag] = []
        for ref, tags in aligned:
            for tag in tags:
                ok = True
                for other, other_tags in aligned:
                    if other is ref:
                        continue
                    other_dim = tag.dim - (ndim - len(other.shape))
                    if other_dim < 0 or other.shape[other_dim] == 1:
                        continue  # broadcast along the channels: a per-sample or scalar factor
                    match = [t for t in other_tags
                             if t.dim == tag.dim and t.offset == tag.offset and t.block == tag.block]
                    if not match:
                        ok = False
                        self.block(tag.space, f"{where} combines these channels with a tensor of shape "
                                              f"{list(other.shape)} that no prunable layer produces")
                        continue
                    for t in match:
                        self.union(tag.space, t.space, f"{where}")
                if ok and not any(r.dim == tag.dim and r.offset == tag.offset and self.find(r.space) ==
                                  self.find(tag.space) for r in result):
                    result.append(tag)
        self.tags[out] = result

    def size_query(self, op: _Op, x: _TensorRef) -> None:
        """x.shape / x.size(d): remember spaces whose channel count the model read."""
        dim = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else None)
        for tag in self.tags_of(x):
            if dim is None or (isinstance(dim, int) and dim % len(x.shape) == tag.dim):
                self.queried.add(self.find(tag.space))

    def pad(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        """F.pad: channels pass through unless the padding reaches their dimension."""
        x = tagged[0]
        tags = self.tags_of(x)
        out = op.outputs[0] if op.outputs else None
        padding = op.kwargs.get("pad", op.args[1] if len(op.args) > 1 else None)
        ndim = len(x.shape)
        # The padding list covers the last len(padding) // 2 dims, last dim first.
        padded_dims = set(range(ndim - len(padding) // 2, ndim)) if isinstance(padding, (list, tuple)) else None
        if out is None or padded_dims is None or len(tagged) != 1 or x is not _first_tensor(op.args):
            self.block_tags(tags, f"{where} cannot be mapped channel by channel")
            return
        keep = []
        for tag in tags:
            if tag.dim in padded_dims:
                self.block(tag.space, f"{where} pads the channel dimension")
            else:
                keep.append(tag)
        self.tags[out] = keep

    def reduction(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        x = tagged[0]
        tags = self.tags_of(x)
        out = op.outputs[0] if op.outputs else None
        dims = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else None)
        keepdim = op.kwargs.get("keepdim", op.args[2] if len(op.args) > 2 and isinstance(op.args[2], bool) else False)
        if dims is None or out is None or len(tagged) != 1:
            self.block_tags(tags, f"{where} reduces over every dimension")
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        ndim = len(x.shape)
        dims = [d % ndim for d in dims]
        new_tags = []
        for tag in tags:
            if tag.dim in dims:
                self.block(tag.space, f"{where} reduces over the channel dimension")
                continue
            shift = 0 if keepdim else sum(1 for d in dims if d < tag.dim)
            new_tags.append(_Tag(tag.space, tag.dim - shift, tag.offset, tag.block))
        self.tags[out] = new_tags

    def reshape(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        x = tagged[0]
        tags = self.tags_of(x)
        out = op.outputs[0] if op.outputs else None
        if out is None or len(tagged) != 1 or x is not _first_tensor(op.args):
            self.block_tags(tags, f"{where} cannot be mapped channel by channel")
            return
        in_shape, out_shape = x.shape, self.recorder.shapes[out]
        new_tags = []
        for tag in tags:
            mapped = _map_reshape(in_shape, out_shape, tag.dim)
            if mapped is None:
                self.block(tag.space, f"{where} reshapes {list(in_shape)} to {list(out_shape)}, which splits "
                                      "or mixes the channel dimension")
                continue
            new_dim, block = mapped
            sizes = _requested_sizes(op)
            if (sizes is not None and new_dim < len(sizes) and sizes[new_dim] != -1
                    and self.find(tag.space) not in self.queried):
                self.block(tag.space, f"{where} reshapes to the constant size {sizes[new_dim]} along these "
                                      "channels, which would not follow a pruned channel count; write -1 there "
                                      "(or use x.flatten(1)) to make the channels prunable")
                continue
            new_tags.append(_Tag(tag.space, new_dim, tag.offset * block, tag.block * block))
        self.tags[out] = new_tags

    def permute(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        x = tagged[0]
        tags = self.tags_of(x)
        out = op.outputs[0] if op.outputs else None
        ndim = len(x.shape)
        order = _permutation(op, ndim)
        if out is None or order is None or len(tagged) != 1:
            self.block_tags(tags, f"{where} cannot be mapped channel by channel")
            return
        self.tags[out] = [_Tag(t.space, order.index(t.dim), t.offset, t.block) for t in tags]

    def concat(self, op: _Op, where: str) -> None:
        tensors = op.args[0] if op.args else op.kwargs.get("tensors", ())
        dim = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else 0)
        out = op.outputs[0] if op.outputs else None
        parts = [t for t in tensors if isinstance(t, _TensorRef)]
        all_tags = [t for p in parts for t in self.tags_of(p)]
        if out is None or not parts:
            self.block_tags(all_tags, f"{where} cannot be mapped channel by channel")
            return
        dim = dim % len(parts[0].shape)
        new_tags: list[_Tag] = []
        position = 0
        for part in parts:
            for tag in self.tags_of(part):
                if tag.dim == dim:
                    new_tags.append(_Tag(tag.space, dim, position + tag.offset, tag.block))
                else:
                    self.block(tag.space, f"{where} concatenates along dim {dim}, not along these channels")
            position += part.shape[dim]
        self.tags[out] = new_tags


def _first_tensor(args: Any) -> _TensorRef | None:
    for ref in _tensors_in(args):
        return ref  # type: ignore[no-any-return]
    return None


def _requested_sizes(op: _Op) -> list[Any] | None:
    """The sizes a view/reshape call asked for (``x.view(b, -1)`` -> ``[b, -1]``); None for other reshapes."""
    if op.name not in ("view", "reshape"):
        return None
    shape = op.kwargs.get("shape", op.kwargs.get("size"))
    if shape is None:
        rest = list(op.args[1:])
        shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    if not all(isinstance(s, int) for s in shape):
        return None  # x.view(torch.float16) or symbolic sizes: nothing to check
    return list(shape)


def _map_reshape(in_shape: tuple[int, ...], out_shape: tuple[int, ...], dim: int) -> tuple[int, int] | None:
    """Where channel dim ``dim`` lands after a reshape, and how many positions each channel then spans.

    Works when the dims before the channel dim keep their total size and the channel dim either stays whole or
    merges with the dims right after it (flatten). Returns None for anything else (a split channel dim).
    """
    prefix = math.prod(in_shape[:dim])
    channels = in_shape[dim]
    candidates = []
    for new_dim in range(len(out_shape)):
        if math.prod(out_shape[:new_dim]) != prefix:
            continue
        size = out_shape[new_dim]
        if size % channels:
            continue
        block = size // channels
        merged = 1
        for end in range(dim + 1, len(in_shape) + 1):
            if merged == block:
                candidates.append((new_dim, block))
                break
            if end < len(in_shape):
                merged *= in_shape[end]
            if merged > block:
                break
    # Prefer the last match: leading size-1 dims (batch of one) are ambiguous, the channel dim is not.
    return candidates[-1] if candidates else None


def _permutation(op: _Op, ndim: int) -> list[int] | None:
    """The dim order a permute-like op produces (output dim i takes input dim order[i])."""
    name = op.name
    ints = [a for a in op.args[1:] if isinstance(a, int)]
    if name == "permute":
        dims = op.args[1:] if len(op.args) > 2 else (op.args[1] if len(op.args) > 1 else op.kwargs.get("dims"))
        if dims is None:
            return None
        return [d % ndim for d in dims]
    if name in {"transpose", "swapaxes", "swapdims"} and len(ints) == 2:
        order = list(range(ndim))
        a, b = ints[0] % ndim, ints[1] % ndim
        order[a], order[b] = order[b], order[a]
        return order
    if name == "t" and ndim == 2:
        return [1, 0]
    return None


def _geometry(name: str, module: Any, x: _TensorRef | None, out_shape: tuple[int, ...]) -> LayerGeometry:
    """The geometry of a Conv/Linear ``module`` called on ``x`` (typed Any: the attributes depend on the kind)."""
    in_shape = x.shape if x is not None else ()
    weight = module.weight
    act_dtype = x.dtype if x is not None else weight.dtype

    def per_sample(shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1, *shape[1:]) if shape else shape

    if isinstance(module, nn.Linear):
        return LayerGeometry(name, type(module).__name__, module.in_features, module.out_features, 1, (1,), (1,),
                             per_sample(in_shape), per_sample(out_shape), act_dtype, weight.dtype)
    return LayerGeometry(name, type(module).__name__, module.in_channels, module.out_channels, module.groups,
                         tuple(module.kernel_size), tuple(module.stride), per_sample(in_shape),
                         per_sample(out_shape), act_dtype, weight.dtype)


def _shared_weights(model: nn.Module, names: Mapping[nn.Module, str]) -> dict[str, str]:
    """Conv/Linear layers whose weight tensor also belongs to another module: name -> the other module(s)."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), [])
            if module_name not in owners[id(param)]:
                owners[id(param)].append(module_name)
    shared = {}
    for module, name in names.items():
        if isinstance(module, PRUNABLE_TYPES):
            others = [o for o in owners.get(id(module.weight), []) if o != name]
            if others:
                shared[name] = ", ".join(others)
    return shared


def trace_sample(data: Any, samples: int = 2) -> Any:
    """The first ``samples`` entries (along dim 0) of every tensor in ``data``: enough to trace shapes."""
    if isinstance(data, torch.Tensor):
        return data[:samples]
    if isinstance(data, (tuple, list)):
        return type(data)(trace_sample(d, samples) for d in data)
    if isinstance(data, dict):
        return {k: trace_sample(v, samples) for k, v in data.items()}
    return data


def build_channel_graph(model: nn.Module, data: Any) -> ChannelGraph:
    """Trace ``model`` on ``data`` (a tensor, or a tuple of the forward's arguments) and find its channel groups.

    Only the first two samples of the data are used. The model is run under ``torch.no_grad()`` in whatever mode
    it is in; the caller puts it in eval mode. Nothing of the model is changed.

    Raises:
        GraphError: when the forward pass raises, naming the error.
    """
    module_names: dict[nn.Module, str] = {}
    module_types: dict[str, str] = {}
    for name, module in model.named_modules():
        module_names.setdefault(module, name)
        module_types[name] = type(module).__name__
    leaf_names = {m: n for m, n in module_names.items() if isinstance(m, _LEAF_TYPES)}

    recorder = _Recorder(leaf_names)
    sample = trace_sample(data)
    for tensor in _tensors_in(sample):
        recorder.add_value(tensor)
    # Hooks with kwargs on the leaf modules only: a layer called as conv(input=x) is recorded too.
    handles = []
    for module in leaf_names:
        handles.append(module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(recorder.post_hook, with_kwargs=True, always_call=True))
    try:
        with torch.no_grad(), recorder:
            output = forward(model, sample)
    except Exception as exc:
        raise GraphError(f"the model raised while tracing it on the calibration data: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        for handle in handles:
            handle.remove()

    builder = _GroupBuilder(recorder, module_names, _shared_weights(model, module_names))
    builder.run()
    output_layers: list[str] = []
    for tensor in _tensors_in(output):
        value = recorder.value_of(tensor)
        for tag in builder.tags.get(value, []) if value is not None else []:
            builder.block(tag.space, "its channels are the model's output, whose shape must not change")
            producer = builder.spaces[tag.space].producer
            if producer not in output_layers:
                output_layers.append(producer)
    graph = _assemble(model, builder, output_layers, module_types)
    graph.output = output
    return graph


def _assemble(model: nn.Module, builder: _GroupBuilder, output_layers: list[str],
              module_types: dict[str, str]) -> ChannelGraph:
    """Turn the builder's spaces into numbered groups and describe every Conv/Linear layer."""
    group_of_root: dict[int, int] = {}
    groups: list[ChannelGroup] = []
    for space_id, space in enumerate(builder.spaces):
        root = builder.find(space_id)
        if root not in group_of_root:
            group_of_root[root] = len(groups)
            groups.append(ChannelGroup(len(groups), builder.spaces[root].channels, [],
                                       reasons=list(builder.spaces[root].reasons)))
        group = groups[group_of_root[root]]
        group.producers.append(space.producer)
        for use in space.followers:
            if use not in group.followers:
                group.followers.append(use)
        for use in space.consumers:
            if use not in group.consumers:
                group.consumers.append(use)

    layers: dict[str, LayerInfo] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES) or name in layers:
            continue
        entry = builder.layers.get(name)
        if entry is None:
            layers[name] = LayerInfo(name, type(module).__name__, None,
                                     reason="not called in the forward pass on the calibration data")
            continue
        out_group = group_of_root[builder.find(entry["out"])] if entry["out"] is not None else None
        in_groups = [(group_of_root[builder.find(s)], block) for s, block in entry["in"]]
        reason = entry["reason"]
        if reason is None and out_group is not None and not groups[out_group].prunable:
            reason = "; ".join(groups[out_group].reasons)
        layers[name] = LayerInfo(name, type(module).__name__, entry["geometry"], out_group, in_groups, reason)
    return ChannelGraph(layers, groups, output_layers, module_types)
