"""The channel graph: which channels of a model must be pruned together, traced on real data.

The model runs once on (up to two samples of) the calibration data under a ``TorchFunctionMode``, which sees
every torch function the forward pass calls, whatever Python control flow produced it. Conv, ConvTranspose and
Linear layers (and the norms and activations with per-channel parameters that follow them) are recorded as
whole modules; everything else is recorded function by function. The output channels of each producer layer
form a *channel space*; the recorded operations carry each space forward through the model (element-wise ops,
norms, pools, flatten, concat, chunk, transposes, head splits and attention matmuls, depthwise convs) until it
reaches the layers that consume it. Operations that tie two spaces together (a residual add, a squeeze-and-
excitation gate, the query-key product of attention) merge them into one :class:`ChannelGroup`, decided as one
unit. Some uses constrain how a group may shrink: a GroupNorm or an attention head split makes channels go in
whole units (a norm group, a head), a grouped convolution or a ``chunk`` makes every block keep the same count,
a channel shuffle makes every block it interleaves keep the same channels.
Any use of a space this module cannot map exactly makes its group unprunable, with the reason and the source
line recorded, never a wrong prune.

The idea of a dependency graph over the traced operations, with coupled channels pruned as groups, comes from
Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (Torch-Pruning).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from acps_core._util import ACPS_DIR
from acps_core._util.data import forward
from acps_core._util.model_checks import explain_trace_failure
from acps_core.layers.attention import plain_multihead_attention

_TORCH_DIR = os.path.dirname(torch.__file__)
_ACPS_DIR = ACPS_DIR

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)
PRUNABLE_TYPES = CONV_TYPES + TRANSPOSED_CONV_TYPES + LINEAR_TYPES
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
                                           nn.InstanceNorm2d, nn.InstanceNorm3d)
#: Modules with parameters per channel of their input, which they follow one to one (a GroupNorm in whole
#: groups; a LayerNorm over the channels, whose statistics then cover the kept channels only).
FOLLOWER_TYPES: tuple[type[nn.Module], ...] = (*NORM_TYPES, nn.GroupNorm, nn.LayerNorm, nn.PReLU)
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
    "identity", "positive", "nan_to_num", "masked_fill",
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
# Functions that work along one dim (given as `dim`) and leave the others alone.
_ALONG_DIM = frozenset({"softmax", "log_softmax", "cumsum", "cumprod", "normalize"})
_RESHAPES = frozenset({"view", "reshape", "flatten", "unsqueeze", "squeeze", "view_as", "reshape_as"})
_PERMUTES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "t"})
_MATMULS = frozenset({"matmul", "bmm", "rmatmul"})


def _op_name(func: Any) -> str:
    """A torch function's plain name: ``__iadd__`` -> ``iadd``, ``add_`` -> ``add``, ``_max_pool2d`` ->
    ``max_pool2d``."""
    name = getattr(func, "__name__", repr(func))
    return name.strip("_")


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
    """The real geometry of one Conv/ConvTranspose/Linear layer, as traced on the calibration data.

    Shapes are per sample (batch dimension 1). ``kind`` is the torch layer type (``Conv2d``,
    ``Linear``; a subclass reports its torch base class).
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
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def transposed(self) -> bool:
        return self.kind.startswith("ConvTranspose")

    @property
    def output_positions(self) -> int:
        """How many times per sample the layer's filters are applied (output pixels, tokens for a Linear,
        input pixels for a transposed conv, which scatters each input pixel through its kernel)."""
        if self.kind == "Linear":
            return math.prod(self.output_shape[1:-1])
        if self.transposed:
            return math.prod(self.input_shape[2:])
        return math.prod(self.output_shape[2:])

    def macs(self, in_channels: int | None = None, out_channels: int | None = None) -> float:
        """Multiply-accumulates per sample at the given channel counts (the traced ones by default).

        For ``MultiheadAttention`` the input channels are its embed_dim and the output channels the width of its
        heads: the q/k/v projections and the two attention products (self-attention, as many keys as queries);
        its out projection is a Linear layer of its own.
        """
        cin = self.in_channels if in_channels is None else in_channels
        cout = self.out_channels if out_channels is None else out_channels
        if self.kind == "MultiheadAttention":
            tokens = self.input_shape[1]
            return float(tokens * (3 * cin * cout + 2 * tokens * cout))
        # Depthwise: one group per channel, so every output sees in_channels/groups inputs whatever the count.
        inputs_per_output = self.in_channels / self.groups if self.depthwise else cin / self.groups
        return float(self.output_positions * cout * inputs_per_output * math.prod(self.kernel_size))


@dataclass(frozen=True)
class ChannelUse:
    """A layer touched by a channel group: channel ``c`` of the group (for ``start <= c < stop``) is positions
    ``offset + (c - start) * step`` to ``offset + (c - start) * step + block - 1`` of the layer's channel
    dimension, where ``step`` is ``stride`` (after a channel shuffle, which interleaves channels) or else
    ``block``. ``stop`` None means the group's last channel. A bare model parameter used with the channels (a
    layer scale, a position embedding, a class token) is a follower of kind ``"Parameter"``, named by its
    qualified name, with its channels along ``dim``."""

    layer: str
    kind: str
    offset: int = 0
    block: int = 1
    start: int = 0
    stop: int | None = None
    dim: int = 0  # for a bare parameter (kind "Parameter"): the dim of the parameter holding the channels
    stride: int | None = None

    def span(self, channels: int) -> range:
        """The group channels this use covers."""
        return range(self.start, channels if self.stop is None else self.stop)

    def positions(self, removed: Iterable[int], channels: int) -> list[int]:
        """Positions of this layer's channel dimension that the group channels ``removed`` occupy."""
        span = self.span(channels)
        step = self.stride or self.block
        base = self.offset - span.start * step
        inside = [c for c in removed if span.start <= c < span.stop]
        if self.block == 1:
            return [base + c * step for c in inside]
        return [base + c * step + j for c in inside for j in range(self.block)]

    def end(self, channels: int) -> int:
        """One past the last position the use covers."""
        span = self.span(channels)
        return self.offset + (len(span) - 1) * (self.stride or self.block) + self.block if len(span) else self.offset


@dataclass
class ChannelGroup:
    """Channels that must be pruned together: the output channels of its producers, with every parameter tied
    to them (norms and depthwise convs that follow, the input channels of the layers that consume them).

    Attributes:
        unit: channels go in whole units of this many (a GroupNorm group, an attention head); 1 = singly.
        blocks: the channels form this many equal consecutive blocks, each of which must keep the same count
            (the groups of a grouped convolution, the parts of a ``chunk``); 1 = no such constraint.
        aligned: the channels form this many equal consecutive blocks that a channel shuffle interleaves, so
            each must keep the same channels (channel ``j`` of one block goes with channel ``j`` of every
            other); 1 = no such constraint.
    """

    id: int
    channels: int
    producers: list[str]
    followers: list[ChannelUse] = field(default_factory=list)
    consumers: list[ChannelUse] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    unit: int = 1
    blocks: int = 1
    aligned: int = 1

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def name(self) -> str:
        """The group's name: its first producer layer."""
        return self.producers[0]

    @property
    def atom(self) -> int:
        """The fewest channels one step of pruning can remove: one unit from every block."""
        return atom_size(self.unit, self.blocks, self.aligned)

    def atoms(self, scores: torch.Tensor) -> list[list[int]]:
        """The group's channels as removable atoms, least important first (see :func:`channel_atoms`)."""
        return channel_atoms(self.channels, self.unit, self.blocks, scores, self.aligned)

    def check_keep(self, keep: Sequence[int]) -> str | None:
        """Why a set of kept channels breaks the group's structure (see :func:`structure_violation`)."""
        return structure_violation(self.channels, self.unit, self.blocks, keep, self.aligned)


def atom_size(unit: int, blocks: int, aligned: int = 1) -> int:
    """How many channels one atom holds (see :func:`channel_atoms`)."""
    return unit * blocks * aligned // math.gcd(aligned, blocks)


def structure_problem(channels: int, unit: int, blocks: int, aligned: int = 1) -> str | None:
    """Why no atoms can be formed for these constraints (None when they can)."""
    if channels % aligned or (blocks % aligned and aligned % blocks):
        return (f"its {channels} channels cannot form {aligned} shuffled blocks together with {blocks} blocks of "
                "equal counts")
    per_block, remainder = divmod(channels // aligned, blocks // math.gcd(aligned, blocks))
    if remainder or per_block % unit:
        return (f"its {channels} channels cannot form {blocks} equal blocks of whole units of {unit} (from "
                "grouped convs, chunks, norm groups or heads)")
    return None


def channel_atoms(channels: int, unit: int, blocks: int, scores: Any, aligned: int = 1) -> list[list[int]]:
    """Channels grouped into the atoms pruning removes, least important first by their summed ``scores``.

    An atom is one whole unit from every block: the channels form ``blocks`` equal consecutive blocks, each made
    of units of ``unit`` consecutive channels; the r-th atom holds the r-th least important unit of each block.
    With ``aligned > 1`` the channels also form that many equal blocks that must keep the same channels: their
    scores are summed position by position, atoms are formed over one such block and repeated in every block.
    Ties keep channel order.
    """
    values = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if aligned > 1:
        per = channels // aligned
        folded = channel_atoms(per, unit, blocks // math.gcd(aligned, blocks), values.reshape(aligned, per).sum(0))
        return [sorted(b * per + j for b in range(aligned) for j in atom) for atom in folded]
    if unit == 1 and blocks == 1:
        return [[c] for c in torch.argsort(values, stable=True).tolist()]
    per_block = channels // blocks
    units_per_block = per_block // unit
    ranked = []
    for b in range(blocks):
        base = b * per_block
        unit_scores = values[base:base + per_block].reshape(units_per_block, unit).sum(dim=1)
        ranked.append([base + int(u) * unit for u in torch.argsort(unit_scores, stable=True).tolist()])
    return [sorted(ranked[b][r] + j for b in range(blocks) for j in range(unit)) for r in range(units_per_block)]


def structure_violation(channels: int, unit: int, blocks: int, keep: Sequence[int], aligned: int = 1) -> str | None:
    """Why keeping the channels ``keep`` breaks a group's units or blocks (None when it does not)."""
    if unit == blocks == aligned == 1:
        return None
    kept = set(keep)
    per = channels // aligned
    if aligned > 1 and any((c + per) % channels not in kept for c in kept):
        return (f"its {aligned} blocks of {per} channels are interleaved by a channel shuffle and must keep the same "
                "channels")
    per_block = channels // blocks
    counts = {sum(1 for c in range(b * per_block, (b + 1) * per_block) if c in kept) for b in range(blocks)}
    if len(counts) > 1:
        return f"its {blocks} blocks of {per_block} channels must keep equal counts"
    for first in range(0, channels, unit):
        inside = sum(1 for c in range(first, first + unit) if c in kept)
        if inside not in (0, unit):
            return f"its channels go in whole units of {unit}"
    return None


@dataclass
class LayerInfo:
    """One Conv/ConvTranspose/Linear layer of the model and how the graph sees it.

    ``in_uses`` lists, for every group feeding the layer's input channels, the group id and where its channels
    sit there.
    """

    name: str
    kind: str
    geometry: LayerGeometry | None
    out_group: int | None = None
    in_uses: list[tuple[int, ChannelUse]] = field(default_factory=list)
    reason: str | None = None

    @property
    def prunable(self) -> bool:
        return self.reason is None and self.out_group is not None

    @property
    def in_groups(self) -> list[int]:
        """Ids of the groups feeding the layer's input channels."""
        return [group_id for group_id, _ in self.in_uses]


@dataclass(frozen=True)
class ParamSlice:
    """Where a channel group sits inside one parameter: along ``dim`` of the parameter, which holds the layer's
    channel positions (for a grouped conv's input, ``groups`` blocks side by side, each read by its own
    filters), the group's channels are placed as ``use`` says."""

    module: str
    param: str
    dim: int
    use: ChannelUse
    groups: int = 1

    def per_channel(self, tensor: torch.Tensor, channels: int) -> torch.Tensor:
        """Sum ``tensor`` (shaped like the parameter) over everything but the group's channels: shape
        ``[channels]`` (zero for channels this use does not cover)."""
        if self.groups > 1:
            # (out, in/groups, ...) -> (groups, out/groups, in/groups, ...) -> per input position g*in/g + j
            per_group = tensor.reshape(self.groups, tensor.shape[0] // self.groups, tensor.shape[1], -1)
            position_sums = per_group.sum(dim=(1, 3)).reshape(-1)
        else:
            position_sums = tensor.movedim(self.dim, 0).reshape(tensor.shape[self.dim], -1).sum(dim=1)
        span = self.use.span(channels)
        if self.use.stride is None:
            covered = position_sums.narrow(0, self.use.offset, len(span) * self.use.block)
        else:  # interleaved by a channel shuffle
            index = torch.tensor(self.use.positions(span, channels), dtype=torch.long, device=tensor.device)
            covered = position_sums.index_select(0, index)
        out = torch.zeros(channels, dtype=tensor.dtype, device=tensor.device)
        out[span.start:span.stop] = covered.reshape(len(span), self.use.block).sum(dim=1)
        return out


class ChannelGraph:
    """Every Conv/ConvTranspose/Linear layer of a model and the channel groups found by tracing it.

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
        slices = []
        for name in group.producers:
            kind = self.module_type(name)
            if kind.endswith("MultiheadAttention"):  # q, k and v rows of the packed projection
                for part in range(3):
                    rows = ChannelUse(name, kind, offset=part * group.channels)
                    slices += [ParamSlice(name, "in_proj_weight", 0, rows), ParamSlice(name, "in_proj_bias", 0, rows)]
                continue
            out_dim = 1 if kind.startswith("ConvTranspose") else 0
            whole = ChannelUse(name, kind)
            slices += [ParamSlice(name, "weight", out_dim, whole), ParamSlice(name, "bias", 0, whole)]
        for use in group.followers:
            if use.kind == "Parameter":
                owner, _, attr = use.layer.rpartition(".")
                slices.append(ParamSlice(owner, attr, use.dim, use))
            else:
                slices += [ParamSlice(use.layer, p, 0, use) for p in ("weight", "bias")]
        for use in group.consumers:
            if use.kind == "MultiheadAttention":  # the packed q/k/v projection's columns
                slices.append(ParamSlice(use.layer, "in_proj_weight", 1, use))
                continue
            layer = self.layers.get(use.layer)
            groups = layer.geometry.groups if layer is not None and layer.geometry is not None else 1
            in_dim = 0 if use.kind.startswith("ConvTranspose") else 1
            slices.append(ParamSlice(use.layer, "weight", in_dim, use, groups if in_dim == 1 else 1))
        return slices

    def channel_counts(self, layer: LayerInfo, kept: Mapping[int, int]) -> tuple[int, int]:
        """A layer's (input, output) channel counts when group ``g`` keeps ``kept[g]`` channels.

        Groups missing from ``kept`` keep all their channels. A use covering part of a group loses its share
        (groups split by ``chunk`` keep equal counts per part).
        """
        geometry = layer.geometry
        assert geometry is not None
        cin = geometry.in_channels
        for group_id, use in layer.in_uses:
            channels = self.groups[group_id].channels
            removed = channels - kept.get(group_id, channels)
            cin -= removed * len(use.span(channels)) // channels * use.block
        if geometry.depthwise:
            return cin, cin  # its outputs are its inputs, filtered (several groups after a concat)
        cout = geometry.out_channels
        if layer.out_group is not None:
            cout = kept.get(layer.out_group, cout)
        return cin, cout

    def explain(self) -> dict[str, str]:
        """For every Conv/ConvTranspose/Linear layer: ``"prunable (group G)"`` or why it is left alone."""
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
    param: str | None = None  # the qualified name, when the tensor is one of the model's parameters


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

    def __init__(self, leaf_names: Mapping[nn.Module, str], param_names: Mapping[int, str]) -> None:
        super().__init__()
        self.leaf_names = leaf_names
        self.param_names = param_names
        self.ops: list[_Op] = []
        self.shapes: list[tuple[int, ...]] = []
        # Weak keys: activations are freed as in a plain forward pass, and a reused id() cannot alias a dead
        # tensor (holding every activation alive doubled the trace's time and memory).
        self._value_of: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._inside_leaf = 0
        self._paused = False
        self._pending: list[tuple[nn.Module, tuple[Any, ...], dict[str, Any], str]] = []

    def add_value(self, tensor: torch.Tensor) -> int:
        value = len(self.shapes)
        self.shapes.append(tuple(tensor.shape))
        self._value_of[tensor] = value
        return value

    def ref(self, tensor: torch.Tensor) -> _TensorRef:
        return _TensorRef(self._value_of.get(tensor), tuple(tensor.shape), tensor.dtype,
                          self.param_names.get(id(tensor)))

    def value_of(self, tensor: torch.Tensor) -> int | None:
        return self._value_of.get(tensor)

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
    """Channels ``start .. stop - 1`` of space ``space`` sit along ``dim`` of a value.

    Channel ``c`` occupies positions ``offset + (c - start) * block`` onwards, ``block`` of them (a flatten
    spreads a channel over its pixels), or ``offset + (c - start) * stride`` onwards when a channel shuffle
    interleaved them with others; or, when ``unit > 1`` (the channel dim was split, e.g. into heads), position
    ``offset + (c - start) // unit`` holds a whole unit of channels, whose remainder runs along another
    dimension of size ``unit``: ``rest`` when the tag knows which (right after the split, and through
    permutes), else None.
    """

    space: int
    dim: int
    offset: int
    block: int
    start: int
    stop: int
    unit: int = 1
    stride: int | None = None
    rest: int | None = None

    @property
    def length(self) -> int:
        """Positions it takes along ``dim``."""
        return (self.stop - self.start) * self.block // self.unit

    @property
    def contiguous(self) -> bool:
        """Its channels sit side by side (not interleaved by a shuffle)."""
        return self.stride is None

    def same_place(self, other: _Tag) -> bool:
        return (self.dim, self.offset, self.block, self.unit, self.start, self.stop, self.stride) == (
            other.dim, other.offset, other.block, other.unit, other.start, other.stop, other.stride)

    def moved(self, dim: int) -> _Tag:
        """The tag on another dim of a new value (where its unit's remainder went is no longer known)."""
        return replace(self, dim=dim, rest=None)


@dataclass
class _Space:
    producer: str
    channels: int
    followers: list[ChannelUse] = field(default_factory=list)
    consumers: list[ChannelUse] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    unit: int = 1
    blocks: int = 1
    aligned: int = 1


class _GroupBuilder:
    """Walks the recorded ops in order, carrying each producer's channels forward."""

    def __init__(self, recorder: _Recorder, shared_weights: Mapping[str, str]) -> None:
        self.recorder = recorder
        self.shared_weights = shared_weights
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.tags: dict[int, list[_Tag]] = {}
        self.layers: dict[str, dict[str, Any]] = {}  # per Conv/Linear: geometry, out space, input uses, reason
        self.touched: dict[str, list[int]] = {}  # per leaf module: the spaces its calls so far used
        self.queried: set[int] = set()  # spaces whose size the model read (x.shape, x.size())
        # Values that are a model parameter, or one expanded or cast: value -> (parameter name, leading dims added)
        self.param_origin: dict[int, tuple[str, int]] = {}
        # Bare parameters: where each op used one, and the uses acps could map (the others block its groups).
        self.param_ops: dict[str, list[_Op]] = {}
        self.param_mapped: dict[str, set[int]] = {}
        self.param_space: dict[str, tuple[int, ChannelUse]] = {}
        self._readers: dict[int, list[_Op]] | None = None

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
        kept, gone = self.spaces[ra], self.spaces[rb]
        kept.reasons += [r for r in gone.reasons if r not in kept.reasons]
        kept.unit = math.lcm(kept.unit, gone.unit)
        kept.blocks = math.lcm(kept.blocks, gone.blocks)
        kept.aligned = math.lcm(kept.aligned, gone.aligned)
        if rb in self.queried:
            self.queried.add(ra)

    def block(self, space: int, reason: str) -> None:
        reasons = self.spaces[self.find(space)].reasons
        if reason not in reasons:
            reasons.append(reason)

    def block_tags(self, tags: Iterable[_Tag], reason: str) -> None:
        for tag in tags:
            self.block(tag.space, reason)

    def require(self, space: int, unit: int = 1, blocks: int = 1, aligned: int = 1) -> None:
        """The space's channels must go in whole units of ``unit`` / keep equal counts in ``blocks`` blocks /
        keep the same channels in ``aligned`` blocks."""
        root = self.spaces[self.find(space)]
        root.unit = math.lcm(root.unit, unit)
        root.blocks = math.lcm(root.blocks, blocks)
        root.aligned = math.lcm(root.aligned, aligned)

    def new_space(self, producer: str, channels: int) -> int:
        self.spaces.append(_Space(producer, channels))
        self.parent.append(len(self.parent))
        return len(self.spaces) - 1

    def use(self, name: str, kind: str, tag: _Tag) -> ChannelUse:
        """How layer ``name`` sees the channels ``tag`` describes."""
        whole = tag.start == 0 and tag.stop == self.spaces[tag.space].channels
        return ChannelUse(name, kind, tag.offset, tag.block, tag.start, None if whole else tag.stop,
                          stride=tag.stride)

    def whole(self, space: int, dim: int) -> _Tag:
        return _Tag(space, dim, 0, 1, 0, self.spaces[space].channels)

    # -- walking ops ---------------------------------------------------------------------------------------------
    def tags_of(self, ref: Any) -> list[_Tag]:
        if isinstance(ref, _TensorRef) and ref.value is not None:
            return self.tags.get(ref.value, [])
        return []

    def set_tags(self, op: _Op, tags: list[_Tag], index: int = 0) -> None:
        if len(op.outputs) > index:
            self.tags[op.outputs[index]] = tags

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
        # A sliced parameter must not be used anywhere acps did not map (g.sum() would change with its slice).
        for name, (space, _) in self.param_space.items():
            for op in self.param_ops.get(name, []):
                if id(op) not in self.param_mapped.get(name, set()):
                    self.block(space, f"parameter {name} is sliced with these channels but also used by "
                                      f"'{op.name}' at {op.location}, which would change")
                    break

    # -- modules -------------------------------------------------------------------------------------------------
    def module_op(self, op: _Op) -> None:
        module = op.module
        assert module is not None
        name, kind = op.name, type(module).__name__
        x = _first_tensor((op.args, op.kwargs))
        in_tags = self.tags_of(x)
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
        shared = self.shared_weights.get(name)
        if shared:
            # Slicing its inputs (or, for a norm, its parameters) would unshare the weights.
            self.block_tags(in_tags, f"{name}'s parameters are shared with {shared}")
        if isinstance(module, nn.MultiheadAttention):
            self.attention_module(op, module, touched)
        elif isinstance(module, FOLLOWER_TYPES):
            self.follower_module(op, module, in_tags, x)
        else:
            self.layer_module(op, module, kind, in_tags, x, touched)

    def attention_module(self, op: _Op, module: nn.MultiheadAttention, touched: list[int]) -> None:
        """nn.MultiheadAttention, three layers in one module:

        - its packed q/k/v projection consumes the embed_dim channels of query, key and value, which share the
          projection's columns, so they must be the same channels (or channels pruned alike);
        - its heads form a group of their own: the q/k/v projection rows of each head and the out projection's
          matching inputs, pruned in whole heads;
        - its out projection produces the output channels, a space of its own (usually joined to the residual
          stream by the add that follows).
        """
        name = op.name
        where = f"nn.MultiheadAttention {name} at {op.location}"
        inputs = _attention_inputs(op)
        query = inputs[0]
        others = [r for r in _tensors_in((op.args, op.kwargs)) if all(r is not i for i in inputs)]
        self.block_tags([t for r in others for t in self.tags_of(r)],
                        f"{where} reads these channels as a mask, which acps does not map")
        if query is None or not op.outputs:
            self.block_tags([t for r in inputs for t in self.tags_of(r)], f"{where} could not be traced")
            return
        channel_dim = len(query.shape) - 1
        tokens = query.shape[1] if (module.batch_first and len(query.shape) == 3) else query.shape[0]
        width = module.num_heads * module.head_dim
        out_proj = module.out_proj
        geometry = LayerGeometry(name, "MultiheadAttention", query.shape[-1], width, 1, (1,), (1,),
                                 (1, tokens, query.shape[-1]), (1, tokens, width), query.dtype,
                                 module.in_proj_weight.dtype)
        entry = self.layers.setdefault(name, {"geometry": geometry, "spaces": [], "in": [], "out": None,
                                              "reason": None, "location": op.location})
        self.attention_inputs(op, name, inputs, channel_dim, entry, where)

        heads = self.new_space(name, width)
        touched.append(heads)
        entry["spaces"].append(heads)
        entry["out"] = heads
        self.require(heads, unit=module.head_dim)
        projection = f"{name}.out_proj"
        use = ChannelUse(projection, "Linear")
        self.spaces[heads].consumers.append(use)

        out_geometry = LayerGeometry(projection, "Linear", width, out_proj.out_features, 1, (1,),
                                     (1,), (1, tokens, width), (1, tokens, out_proj.out_features), query.dtype,
                                     out_proj.weight.dtype)
        out_entry = self.layers.setdefault(projection, {"geometry": out_geometry, "spaces": [], "in": [],
                                                        "out": None, "reason": entry["reason"],
                                                        "location": op.location})
        out_entry["in"].append((heads, use))
        space = self.new_space(projection, out_proj.out_features)
        touched.append(space)
        out_entry["spaces"].append(space)
        out_entry["out"] = space
        shared = "; ".join(f"{n}'s weights are shared with {self.shared_weights[n]}"
                           for n in (name, projection) if n in self.shared_weights)
        for made in (heads, space):
            if entry["reason"]:
                self.block(made, f"{name} is {entry['reason']}")
            if shared:
                self.block(made, shared)
        if shared:
            self.block_tags([t for r in inputs for t in self.tags_of(r)], shared)
        self.tags[op.outputs[0]] = [self.whole(space, channel_dim)]

    def attention_inputs(self, op: _Op, name: str, inputs: list[_TensorRef | None], channel_dim: int,
                         entry: dict[str, Any], where: str) -> None:
        """The embed_dim channels query, key and value bring to an nn.MultiheadAttention: one consumer use (the
        packed projection's columns) for the query's channels, with key and value tied to them."""
        query = inputs[0]
        assert query is not None
        query_tags = self.tags_of(query)
        mapped = []
        for tag in query_tags:
            if tag.dim != channel_dim:
                self.block(tag.space, f"{where} reads these channels along dim {tag.dim}, not its embed_dim")
            elif tag.unit != 1:
                self.block(tag.space, f"{where} reads these channels split in units")
            else:
                mapped.append(tag)
        for ref in inputs[1:]:
            if ref is None or ref.value == query.value:
                continue
            tags = self.tags_of(ref)
            ours, theirs = (sorted(found, key=lambda t: (t.offset, t.start)) for found in (query_tags, tags))
            if len(ours) == len(theirs) and all(a.same_place(b) for a, b in zip(ours, theirs)):
                for a, b in zip(ours, theirs):
                    self.union(a.space, b.space, f"{where} reads them as query and as key/value")
                continue
            reason = (f"{where} reads its query and its key/value from different channels, which its packed "
                      "projection must prune alike")
            self.block_tags(query_tags + tags, reason)
            mapped = []
        for tag in mapped:
            use = self.use(name, "MultiheadAttention", tag)
            self.spaces[tag.space].consumers.append(use)
            entry["in"].append((tag.space, use))

    def follower_module(self, op: _Op, module: nn.Module, in_tags: list[_Tag], x: _TensorRef | None) -> None:
        name, kind = op.name, type(module).__name__
        ndim = len(x.shape) if x is not None else 0
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            self.set_tags(op, in_tags)  # one shared slope: element-wise
            return
        if isinstance(module, nn.LayerNorm):
            normalized = range(ndim - len(module.normalized_shape), ndim)
            passing = [t for t in in_tags if t.dim not in normalized]
            inside = [t for t in in_tags if t.dim in normalized]
            if inside and len(module.normalized_shape) > 1:
                self.block_tags(inside, f"{name} (LayerNorm) at {op.location} normalises over several dims "
                                        "including these channels")
                inside = []
            self.set_tags(op, passing + self.follow(op, name, kind, inside, ndim - 1))
            return
        unit = 1
        if isinstance(module, nn.GroupNorm):
            unit = module.num_channels // module.num_groups
        followed = self.follow(op, name, kind, in_tags, 1, unit)
        self.set_tags(op, followed + [t for t in in_tags if t.dim != 1])

    def follow(self, op: _Op, name: str, kind: str, in_tags: list[_Tag], channel_dim: int,
               unit: int = 1) -> list[_Tag]:
        """A layer whose parameters follow its input channels one to one (norms, depthwise convs); with
        ``unit > 1`` (GroupNorm) the channels must go in whole norm groups. Returns the tags it passes on."""
        good = []
        for tag in in_tags:
            if tag.dim != channel_dim:
                continue
            if tag.block != 1 or tag.unit != 1:
                self.block(tag.space, f"{name} ({kind}) at {op.location} works along dim {channel_dim}, which "
                                      "does not hold these channels one to one")
                continue
            if unit > 1 and (tag.offset % unit or tag.length % unit or tag.start % unit or not tag.contiguous):
                self.block(tag.space, f"{name} ({kind}) at {op.location} has norm groups of {unit} channels that "
                                      "do not line up with these channels")
                continue
            if unit > 1:
                self.require(tag.space, unit=unit)
            self.spaces[tag.space].followers.append(self.use(name, kind, tag))
            good.append(tag)
        return good

    def layer_module(self, op: _Op, module: nn.Module, kind: str, in_tags: list[_Tag], x: _TensorRef | None,
                     touched: list[int]) -> None:
        name = op.name
        out_value = op.outputs[0] if op.outputs else None
        is_linear = isinstance(module, LINEAR_TYPES)
        out_shape = self.recorder.shapes[out_value] if out_value is not None else ()
        channel_dim = len(out_shape) - 1 if is_linear else 1
        geometry = _geometry(name, module, x, out_shape)
        entry = self.layers.setdefault(name, {"geometry": geometry, "spaces": [], "in": [], "out": None,
                                              "reason": None, "location": op.location})
        groups = geometry.groups
        in_dim = (len(x.shape) - 1) if (is_linear and x is not None) else 1
        if geometry.depthwise and not geometry.transposed:
            # Depthwise: output channel c is input channel c filtered; it follows the input's group(s).
            for tag in self.follow(op, name, kind, in_tags, 1):
                entry["in"].append((tag.space, self.use(name, kind, tag)))
                entry["out"] = entry["out"] if entry["out"] is not None else tag.space
            self.set_tags(op, [t for t in in_tags if t.dim == 1 and t.block == 1 and t.unit == 1])
            if not entry["in"]:
                entry["reason"] = entry["reason"] or (
                    "depthwise convolution whose input channels come from no prunable layer")
            return
        for tag in in_tags:
            if tag.dim != in_dim:
                self.block(tag.space, f"{name} ({kind}) at {op.location} reads these channels along dim "
                                      f"{tag.dim}, not its channel dim {in_dim}")
            elif tag.unit != 1:
                self.block(tag.space, f"{name} ({kind}) at {op.location} reads these channels split in units")
            elif groups > 1 and (geometry.transposed or not self.spread_over_groups(tag, geometry)):
                self.block(tag.space, f"grouped convolution {name} (groups={groups}) at {op.location} reads "
                                      "these channels together with others; acps keeps its groups only when "
                                      "one group of channels feeds it whole (or shuffled evenly over its groups)")
            else:
                if groups > 1:  # every conv group keeps the same input count
                    self.require(tag.space, blocks=self.spaces[tag.space].channels * groups // (tag.stop - tag.start))
                use = self.use(name, kind, tag)
                self.spaces[tag.space].consumers.append(use)
                entry["in"].append((tag.space, use))
        if out_value is None:
            return
        space = self.new_space(name, geometry.out_channels)
        touched.append(space)
        entry["spaces"].append(space)
        entry["out"] = space
        if entry["reason"]:
            self.block(space, f"{name} is {entry['reason']}")
        if groups > 1:
            if geometry.transposed:
                self.block(space, f"{name} is a grouped transposed convolution, which acps does not prune")
            else:
                self.require(space, blocks=groups)  # every conv group keeps the same output count
        shared = self.shared_weights.get(name)
        if shared:
            self.block(space, f"{name}'s weight is shared with {shared}")
            entry["reason"] = entry["reason"] or f"weight shared with {shared}"
        self.tags[out_value] = [self.whole(space, channel_dim)]

    def spread_over_groups(self, tag: _Tag, geometry: LayerGeometry) -> bool:
        """Whether a grouped conv's groups each read an equal, consecutive share of the tag's channels, in
        shares that tile the tag's space: then the space keeping equal counts in those shares keeps the conv's
        groups equal. True for one group of channels feeding the conv whole; after a channel shuffle, for each
        of its units spread evenly over the conv's groups."""
        channels, groups = tag.stop - tag.start, geometry.groups
        share, remainder = divmod(channels, groups)
        if tag.block != 1 or remainder or tag.start % share or self.spaces[tag.space].channels % share:
            return False
        per_group = geometry.in_channels // groups
        step = tag.stride or 1
        return all((tag.offset + k * step) // per_group == k // share for k in range(channels))

    # -- functions -----------------------------------------------------------------------------------------------
    def origin(self, ref: _TensorRef) -> tuple[str, int] | None:
        """The model parameter a tensor is (or was expanded or cast from), and how many leading dims it gained."""
        if ref.param is not None:
            return ref.param, 0
        return self.param_origin.get(ref.value) if ref.value is not None else None

    def param_use(self, op: _Op, tag: _Tag, ref: _TensorRef, ref_dim: int, where: str) -> bool:
        """Record a bare parameter that holds these channels along ``ref_dim`` of ``ref``; False if ``ref`` is
        not one, or holds them in a way acps cannot slice."""
        origin = self.origin(ref)
        if (origin is None or tag.block != 1 or tag.unit != 1 or not tag.contiguous
                or ref.shape[ref_dim] < tag.offset + tag.length):
            return False
        name, added = origin
        if ref_dim - added < 0:
            return False
        use = ChannelUse(name, "Parameter", tag.offset, 1, tag.start,
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

    def function_op(self, op: _Op) -> None:
        refs = [r for r in _tensors_in((op.args, op.kwargs))]
        for ref in refs:
            origin = self.origin(ref)
            if origin is not None:
                self.param_ops.setdefault(origin[0], []).append(op)
        self.check_sizes(op, refs)
        tagged = [r for r in refs if self.tags_of(r)]
        if not tagged:
            self.track_parameter(op, refs)
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
            tagged = [r for r in refs if self.tags_of(r)]
            if not tagged:
                return
        elementwise = name in _UNARY_ELEMENTWISE or name in _BINARY_ELEMENTWISE
        if elementwise and len(refs) == 1:
            if out is not None and self.recorder.shapes[out] == refs[0].shape:
                self.tags[out] = self.tags_of(refs[0])
            else:
                self.block_tags(all_tags, f"{where} changes the shape of the tensor")
        elif elementwise:
            # Several tensor operands (x + y, clamp(x, min=t), x ** t, where(m, x, y)): the channels of one
            # operand meet the same positions of the others.
            self.binary(op, refs, where)
        elif name == "pad":
            self.pad(op, tagged, where)
        elif name in _POOLS:
            self.pool(op, refs, tagged, where)
        elif name in _REDUCTIONS:
            self.reduction(op, tagged, where)
        elif name in _ALONG_DIM:
            self.along_dim(op, tagged, where)
        elif name in _RESHAPES:
            self.reshape(op, tagged, where)
        elif name in _PERMUTES:
            self.permute(op, tagged, where)
        elif name in ("expand", "expand_as", "broadcast_to"):
            self.expand(op, tagged, where)
        elif name in ("cat", "concat", "concatenate"):
            self.concat(op, where)
        elif name in ("channel_shuffle", "native_channel_shuffle"):
            self.channel_shuffle(op, tagged, where)
        elif name in ("chunk", "split", "tensor_split", "unbind", "split_with_sizes"):
            self.chunk(op, tagged, where)
        elif name == "getitem":
            self.getitem(op, tagged, where)
        elif name in _MATMULS:
            self.matmul(op, refs, where)
        elif name == "scaled_dot_product_attention":
            self.attention(op, refs, where)
        elif name == "multi_head_attention_forward":
            self.block_tags(all_tags, f"nn.MultiheadAttention at {op.location} uses these channels as its "
                                      "embed_dim, which acps does not prune yet (write attention with Linear "
                                      "projections and scaled_dot_product_attention to prune its heads)")
        else:
            self.block_tags(all_tags, f"{where} cannot be mapped channel by channel")

    def track_parameter(self, op: _Op, refs: list[_TensorRef]) -> None:
        """Follow a parameter through an expand or cast, so that a class token expanded to the batch and then
        concatenated with the tokens is still known to be the parameter."""
        if not refs or not op.outputs or op.name not in _UNARY_ELEMENTWISE | {"expand", "expand_as", "broadcast_to"}:
            return
        origin = self.origin(refs[0])
        if origin is not None:
            added = len(self.recorder.shapes[op.outputs[0]]) - len(refs[0].shape)
            self.param_origin[op.outputs[0]] = (origin[0], origin[1] + added)
            self.param_mapped.setdefault(origin[0], set()).add(id(op))

    def check_sizes(self, op: _Op, refs: list[_TensorRef]) -> None:
        """A view/reshape asking for a size equal to a channel count the model read (``B, N, C = x.shape``) of a
        group the reshaped tensor does not hold: after pruning that group the size would change while the
        tensor does not, so the group is left alone."""
        sizes = _requested_sizes(op)
        if not sizes or not self.queried or not refs:
            return
        held = {self.find(t.space) for t in self.tags_of(refs[0])}
        for root in {self.find(s) for s in self.queried}:
            if root not in held and self.spaces[root].channels in sizes:
                self.block(root, f"its channel count, read from a tensor's shape, sizes the reshape "
                                 f"'{op.name}' at {op.location} of a tensor that does not hold these channels")

    def binary(self, op: _Op, refs: list[_TensorRef], where: str) -> None:
        out = op.outputs[0] if op.outputs else None
        if out is None:
            self.block_tags([t for r in refs for t in self.tags_of(r)], f"{where} modifies a tensor in place")
            return
        ndim = len(self.recorder.shapes[out])
        # The channel dims each operand brings, aligned to the output (broadcasting aligns from the right).
        aligned = [(ref, [t.moved(t.dim + ndim - len(ref.shape)) for t in self.tags_of(ref)])
                   for ref in refs]
        result: list[_Tag] = []
        for index, (_, tags) in enumerate(aligned):
            for tag in tags:
                ok = True
                for other_index, (other, other_tags) in enumerate(aligned):
                    if other_index == index:
                        continue
                    other_dim = tag.dim - (ndim - len(other.shape))
                    if other_dim < 0 or other.shape[other_dim] == 1:
                        continue  # broadcast along the channels: a per-sample or scalar factor
                    match = [t for t in other_tags if t.same_place(tag)]
                    if not match and self.param_use(op, tag, other, other_dim, where):
                        continue  # x * layer_scale, x + pos_embed: the parameter is sliced with the channels
                    if not match:
                        ok = False
                        self.block(tag.space, f"{where} combines these channels with a tensor of shape "
                                              f"{list(other.shape)} that no prunable layer produces")
                        continue
                    for t in match:
                        self.union(tag.space, t.space, where)
                if ok and not any(r.same_place(tag) and self.find(r.space) == self.find(tag.space) for r in result):
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
        padding = op.kwargs.get("pad", op.args[1] if len(op.args) > 1 else None)
        ndim = len(x.shape)
        # The padding list covers the last len(padding) // 2 dims, last dim first.
        padded = set(range(ndim - len(padding) // 2, ndim)) if isinstance(padding, (list, tuple)) else None
        if not op.outputs or padded is None or len(tagged) != 1 or x is not _first_tensor(op.args):
            self.block_tags(tags, f"{where} cannot be mapped channel by channel")
            return
        self.block_tags([t for t in tags if t.dim in padded], f"{where} pads the channel dimension")
        self.set_tags(op, [t for t in tags if t.dim not in padded])

    def pool(self, op: _Op, refs: list[_TensorRef], tagged: list[_TensorRef], where: str) -> None:
        """Pools and resizes keep dims 0 and 1 (batch, channels) and work on the others."""
        x = refs[0]
        tags = self.tags_of(x)
        if len(tagged) != 1 or x is not tagged[0] or any(t.dim > 1 for t in tags) or not op.outputs:
            self.block_tags([t for r in tagged for t in self.tags_of(r)], f"{where} pools along the channels")
            return
        for index in range(len(op.outputs)):  # max_pool with indices returns two tensors shaped alike
            self.set_tags(op, tags, index)

    def reduction(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        x = tagged[0]
        tags = self.tags_of(x)
        dims = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else None)
        keepdim = op.kwargs.get("keepdim", op.args[2] if len(op.args) > 2 and isinstance(op.args[2], bool) else False)
        if dims is None or not op.outputs or len(tagged) != 1 or x is not _first_tensor(op.args):
            self.block_tags(tags, f"{where} reduces over every dimension")
            return
        ndim = len(x.shape)
        dims = [d % ndim for d in ([dims] if isinstance(dims, int) else list(dims))]
        self.block_tags([t for t in tags if t.dim in dims], f"{where} reduces over the channel dimension")
        self.set_tags(op, [t.moved(t.dim - (0 if keepdim else sum(1 for d in dims if d < t.dim)))
                           for t in tags if t.dim not in dims])

    def along_dim(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        """softmax(x, dim) and kin: fine unless they work along the channels."""
        x = tagged[0]
        tags = self.tags_of(x)
        dim = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else None)
        if not isinstance(dim, int) or len(tagged) != 1 or x is not _first_tensor(op.args):
            self.block_tags(tags, f"{where} cannot be mapped channel by channel")
            return
        dim %= len(x.shape)
        self.block_tags([t for t in tags if t.dim == dim], f"{where} works along the channel dimension")
        self.set_tags(op, [t for t in tags if t.dim != dim])

    def reshape(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        x = tagged[0]
        tags = self.tags_of(x)
        out = op.outputs[0] if op.outputs else None
        if out is None or len(tagged) != 1 or x is not _first_tensor(op.args):
            self.block_tags(tags, f"{where} cannot be mapped channel by channel")
            return
        in_shape, out_shape = x.shape, self.recorder.shapes[out]
        sizes = _requested_sizes(op)
        new_tags = []
        shuffled: list[tuple[_Tag, list[_Tag]]] = []
        for tag in tags:
            pieces = _map_shuffle(in_shape, out_shape, tag)
            mapped = _map_reshape(in_shape, out_shape, tag, sizes) if pieces is None else None
            if mapped is None and pieces is None:
                self.block(tag.space, f"{where} reshapes {list(in_shape)} to {list(out_shape)}, which splits "
                                      "or mixes these channels")
                continue
            new_dim = mapped.dim if mapped is not None else pieces[0].dim  # type: ignore[index]
            if (sizes is not None and new_dim < len(sizes) and sizes[new_dim] != -1
                    and self.find(tag.space) not in self.queried):
                self.block(tag.space, f"{where} reshapes to the constant size {sizes[new_dim]} along these "
                                      "channels, which would not follow a pruned channel count; write -1 there "
                                      "(or use x.flatten(1)) to make the channels prunable")
                continue
            if pieces is not None:
                shuffled.append((tag, pieces))
                continue
            assert mapped is not None
            if mapped.unit > 1 and not self.shuffle_split(op, mapped):
                self.require(tag.space, unit=mapped.unit)
            new_tags.append(mapped)
        if shuffled:
            new_tags += self.shuffle(shuffled, in_shape[shuffled[0][0].dim], where)
        self.tags[out] = new_tags

    def channel_shuffle(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        """``F.channel_shuffle(x, groups)`` (``nn.ChannelShuffle``): the view/transpose/view of :meth:`shuffle`
        in one function, along dim 1."""
        x = tagged[0]
        tags = self.tags_of(x)
        groups = op.kwargs.get("groups", op.args[1] if len(op.args) > 1 else None)
        if not op.outputs or len(tagged) != 1 or x is not op.args[0] or not isinstance(groups, int):
            self.block_tags(tags, f"{where} cannot be mapped channel by channel")
            return
        unit = x.shape[1] // groups
        shuffled = []
        for tag in tags:
            if tag.dim != 1:
                continue
            if tag.block != 1 or tag.unit != 1 or not tag.contiguous or tag.offset % unit or tag.length % unit:
                self.block(tag.space, f"{where} is a channel shuffle that splits these channels unevenly")
                continue
            pieces = [_Tag(tag.space, 1, tag.offset // unit + k, 1, first, first + unit, stride=groups)
                      for k, first in enumerate(range(tag.start, tag.stop, unit))]
            shuffled.append((replace(tag, unit=unit), pieces))
        passing = [t for t in tags if t.dim != 1]
        self.set_tags(op, passing + (self.shuffle(shuffled, groups, where) if shuffled else []))

    def readers(self, value: int) -> list[_Op]:
        """The recorded ops that read a traced value."""
        if self._readers is None:
            self._readers = {}
            for op in self.recorder.ops:
                for ref in _tensors_in((op.args, op.kwargs)):
                    if ref.value is not None:
                        self._readers.setdefault(ref.value, []).append(op)
        return self._readers.get(value, [])

    def shuffle_split(self, op: _Op, tag: _Tag) -> bool:
        """Whether the split of a channel dim into units (``x.view(b, g, c // g, h, w)``) is the first step of
        a channel shuffle: its only reader (besides shape queries) swaps the units' dim with their remainder's,
        and the only reader of that (through ``contiguous``) reshapes them back into one dim. Then the units
        need not go whole: the shuffle keeps the same channels of every unit instead (see :meth:`shuffle`)."""
        value = op.outputs[0]
        for _ in range(4):
            readers = [r for r in self.readers(value) if r.name != _SIZE_QUERY]
            if len(readers) != 1 or not readers[0].outputs:
                return False
            reader = readers[0]
            if reader.name in _PERMUTES:
                order = _permutation(reader, len(self.recorder.shapes[value]))
                if order is None or tag.rest is None or order.index(tag.dim) != order.index(tag.rest) + 1:
                    return False
                tag = replace(tag, dim=order.index(tag.dim), rest=order.index(tag.rest))
            elif reader.name in ("contiguous", "clone"):
                pass
            elif reader.name in ("view", "reshape", "flatten"):
                shape = self.recorder.shapes[value]
                return _map_shuffle(shape, self.recorder.shapes[reader.outputs[0]], tag) is not None
            else:
                return False
            value = reader.outputs[0]
        return False

    def shuffle(self, shuffled: list[tuple[_Tag, list[_Tag]]], units: int, where: str) -> list[_Tag]:
        """A channel shuffle: the units of a split channel dim (``units`` of them, each ``unit`` channels wide)
        are merged back behind their remainder, which interleaves them: channel ``j`` of every unit ends up
        next to channel ``j`` of the others. Pruned, the units must keep the same channels for the interleaving
        to stay in order, so every space taking part keeps the same channels in each of its units (``aligned``)
        and spaces sharing the shuffle are one group. Returns the tags of the shuffled channels."""
        originals = [tag for tag, _ in shuffled]
        unit = originals[0].unit
        per_space: dict[int, int] = {}
        for tag in originals:
            per_space[tag.space] = per_space.get(tag.space, 0) + tag.stop - tag.start
        if any(t.unit != unit for t in originals) or sum(t.stop - t.start for t in originals) != units * unit:
            self.block_tags(originals, f"{where} is a channel shuffle that interleaves these channels with channels "
                                       "no prunable layer produces")
            return []
        if any(count != self.spaces[space].channels for space, count in per_space.items()):
            self.block_tags(originals, f"{where} is a channel shuffle of only part of these channels")
            return []
        for space, count in per_space.items():
            self.require(space, aligned=count // unit)
        for tag in originals[1:]:
            self.union(originals[0].space, tag.space, f"{where} (a channel shuffle) interleaves them")
        return [piece for _, pieces in shuffled for piece in pieces]

    def permute(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        x = tagged[0]
        tags = self.tags_of(x)
        order = _permutation(op, len(x.shape))
        if not op.outputs or order is None or len(tagged) != 1:
            self.block_tags(tags, f"{where} cannot be mapped channel by channel")
            return
        self.set_tags(op, [replace(t, dim=order.index(t.dim), rest=None if t.rest is None else order.index(t.rest))
                           for t in tags])

    def expand(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        x = tagged[0]
        tags = self.tags_of(x)
        out = op.outputs[0] if op.outputs else None
        if out is None or x is not _first_tensor(op.args):
            self.block_tags(tags, f"{where} cannot be mapped channel by channel")
            return
        shift = len(self.recorder.shapes[out]) - len(x.shape)
        self.tags[out] = [t.moved(t.dim + shift) for t in tags]

    def concat(self, op: _Op, where: str) -> None:
        tensors = op.args[0] if op.args else op.kwargs.get("tensors", ())
        dim = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else 0)
        parts = [t for t in tensors if isinstance(t, _TensorRef)]
        all_tags = [t for p in parts for t in self.tags_of(p)]
        if not op.outputs or not parts or not isinstance(dim, int):
            self.block_tags(all_tags, f"{where} cannot be mapped channel by channel")
            return
        dim %= len(parts[0].shape)
        new_tags: list[_Tag] = []
        position = 0
        for part in parts:
            new_tags += [replace(t, offset=position + t.offset) for t in self.tags_of(part) if t.dim == dim]
            position += part.shape[dim]
        # Along another dim, every part must hold the same channels at the same places (they are coupled).
        others = [t for t in all_tags if t.dim != dim]
        for tag in others:
            for part in parts:
                match = [t for t in self.tags_of(part) if t.same_place(tag)]
                if not match and not self.param_use(op, tag, part, tag.dim, where):
                    self.block(tag.space, f"{where} joins these channels with a tensor that does not hold them")
                for t in match:
                    self.union(tag.space, t.space, where)
        seen: list[_Tag] = []
        for tag in others:
            if not any(s.same_place(tag) for s in seen):
                seen.append(tag)
        self.set_tags(op, new_tags + seen)

    def chunk(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        """chunk/split: along another dim the channels pass to every part; along the channels, only an even
        ``chunk`` of one whole group is mapped (its parts then keep equal counts)."""
        x = tagged[0]
        tags = self.tags_of(x)
        dim = op.kwargs.get("dim", op.args[2] if len(op.args) > 2 else (0 if op.name != "unbind" else None))
        if op.name == "unbind":
            dim = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else 0)
        if len(tagged) != 1 or x is not _first_tensor(op.args) or not isinstance(dim, int):
            self.block_tags(tags, f"{where} cannot be mapped channel by channel")
            return
        dim %= len(x.shape)
        across = [t for t in tags if t.dim == dim]
        passing = [t for t in tags if t.dim != dim]
        parts = len(op.outputs)
        if across:
            tag = across[0]
            size = x.shape[dim]
            even = op.name == "chunk" and size % parts == 0 and all(
                self.recorder.shapes[v][dim] == size // parts for v in op.outputs)
            if (len(across) != 1 or not even or tag.offset or tag.block != 1 or tag.unit != 1 or not tag.contiguous
                    or tag.length != size or tag.start or tag.stop != self.spaces[tag.space].channels):
                self.block_tags(across, f"{where} splits these channels in a way acps does not map (only an even "
                                        "chunk of one whole group of channels is)")
                across = []
            else:
                self.require(tag.space, blocks=parts)
        for index, value in enumerate(op.outputs):
            shift = -1 if op.name == "unbind" else 0
            out_tags = [t.moved(t.dim + (shift if t.dim > dim else 0)) for t in passing]
            if across:
                part = across[0].stop // parts
                out_tags.append(replace(across[0], start=index * part, stop=(index + 1) * part))
            self.tags[value] = out_tags

    def getitem(self, op: _Op, tagged: list[_TensorRef], where: str) -> None:
        """x[...] with slices, ints, None and Ellipsis: channels pass when their dim is taken whole."""
        x = tagged[0]
        tags = self.tags_of(x)
        index = op.args[1] if len(op.args) > 1 else None
        mapping = _index_dims(index, len(x.shape), x.shape)
        if mapping is None or x is not op.args[0] or len(tagged) != 1 or not op.outputs:
            self.block_tags(tags, f"{where} indexes the tensor in a way acps does not map")
            return
        kept = [t for t in tags if mapping.get(t.dim) is not None]
        self.block_tags([t for t in tags if mapping.get(t.dim) is None], f"{where} selects some of these channels")
        self.set_tags(op, [t.moved(mapping[t.dim]) for t in kept])  # type: ignore[arg-type]

    def matmul(self, op: _Op, refs: list[_TensorRef], where: str) -> None:
        """a @ b: batch dims broadcast (channels there meet their counterparts), rows of ``a`` and columns of
        ``b`` pass to the output; a channel dim that is summed over cannot be mapped."""
        out = op.outputs[0] if op.outputs else None
        if out is None or len(refs) != 2 or len(refs[0].shape) < 2 or len(refs[1].shape) < 2:
            self.block_tags([t for r in refs for t in self.tags_of(r)], f"{where} cannot be mapped")
            return
        a, b = refs
        ndim = len(self.recorder.shapes[out])
        result: list[_Tag] = []
        batch_tags: list[tuple[int, _Tag]] = []
        for which, ref in enumerate((a, b)):
            rank = len(ref.shape)
            for tag in self.tags_of(ref):
                out_dim = tag.dim + ndim - rank
                contracted = rank - 1 if which == 0 else rank - 2
                if tag.dim == contracted:
                    self.block(tag.space, f"{where} sums over these channels")
                elif tag.dim >= rank - 2:
                    result.append(tag.moved(ndim - 2 if which == 0 else ndim - 1))
                else:
                    batch_tags.append((which, tag.moved(out_dim)))
        for which, tag in batch_tags:
            other = refs[1 - which]
            other_dim = tag.dim - (ndim - len(other.shape))
            if other_dim < 0 or other.shape[other_dim] == 1:
                result.append(tag)
                continue
            match = [t for w, t in batch_tags if w != which and t.same_place(tag)]
            if not match:
                self.block(tag.space, f"{where} pairs these channels with a tensor that does not hold them")
                continue
            for t in match:
                self.union(tag.space, t.space, where)
            if not any(r.same_place(tag) for r in result):
                result.append(tag)
        self.tags[out] = result

    def attention(self, op: _Op, refs: list[_TensorRef], where: str) -> None:
        """scaled_dot_product_attention(q, k, v): heads and batch dims pair q, k and v; v's last dim passes to
        the output; q's and k's last dim is summed over."""
        out = op.outputs[0] if op.outputs else None
        q, k, v = [*refs, None, None, None][:3]
        if out is None or q is None or k is None or v is None:
            self.block_tags([t for r in refs for t in self.tags_of(r)], f"{where} cannot be mapped")
            return
        result: list[_Tag] = []
        rank = len(q.shape)
        for ref in (q, k, v):
            for tag in self.tags_of(ref):
                if tag.dim == rank - 1 and ref is v:
                    result.append(tag)
                elif tag.dim >= rank - 2:
                    self.block(tag.space, f"{where} mixes these channels across tokens or sums over them")
                else:
                    for other in (q, k, v):
                        if other is ref or other.shape[tag.dim] == 1:
                            continue
                        match = [t for t in self.tags_of(other) if t.same_place(tag)]
                        if not match:
                            self.block(tag.space, f"{where} pairs these channels with a tensor that does not "
                                                  "hold them")
                        for t in match:
                            self.union(tag.space, t.space, where)
                    if not any(r.same_place(tag) for r in result):
                        result.append(tag)
        for ref in refs[3:]:  # an attention mask broadcast over heads is fine; one that is not, is not
            for tag in self.tags_of(ref):
                self.block(tag.space, f"{where} uses these channels as an attention mask")
        self.tags[out] = result


def _attention_inputs(op: _Op) -> list[_TensorRef | None]:
    """The query, key and value an nn.MultiheadAttention call was given (positionally or by name)."""
    found: list[_TensorRef | None] = []
    for position, key in enumerate(("query", "key", "value")):
        ref = op.args[position] if len(op.args) > position else op.kwargs.get(key)
        found.append(ref if isinstance(ref, _TensorRef) else None)
    return found


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


def _map_reshape(in_shape: tuple[int, ...], out_shape: tuple[int, ...], tag: _Tag,
                 sizes: list[Any] | None = None) -> _Tag | None:
    """Where a tag lands after a reshape; None when the reshape mixes its channels with something else.

    The dims before the tag's dim must keep their total size. Then the tag's dim either stays whole or merges
    with the dims right after it (flatten: each channel spreads over more positions), or splits into a dim of
    units followed by dims that hold each unit's remainder (heads: ``(B, T, C) -> (B, T, H, C // H)``).
    ``sizes`` are the sizes the call asked for, when it gave them (``view``/``reshape``).
    """
    dim = tag.dim
    prefix = math.prod(in_shape[:dim])
    size = in_shape[dim]
    after = [math.prod(in_shape[dim + 1:end]) for end in range(dim + 1, len(in_shape) + 1)]
    candidates: list[_Tag] = []
    for new_dim in range(len(out_shape)):
        if math.prod(out_shape[:new_dim]) != prefix:
            continue
        new_size = out_shape[new_dim]
        if new_size % size == 0 and new_size // size in after:
            merged = new_size // size  # the product of the dims merged into the tag's dim
            if tag.unit == 1:
                stride = None if tag.stride is None else tag.stride * merged
                # view(B, G, C // G) with G == C, a number written in the call: units of one channel, their
                # remainder next (a shuffle whose pruned count must stay G). A -1 or an unsqueeze is no such thing.
                written = sizes is not None and new_dim < len(sizes) and sizes[new_dim] != -1
                known = (new_dim + 1 if written and merged == 1 and tag.block == 1 and new_dim + 1 < len(out_shape)
                         and out_shape[new_dim + 1] == 1 else None)
                candidates.append(replace(tag, dim=new_dim, offset=tag.offset * merged, block=tag.block * merged,
                                          stride=stride, rest=known))
            elif merged % tag.unit == 0 and tag.start % tag.unit == 0:
                candidates.append(replace(tag, dim=new_dim, offset=tag.offset * merged, block=merged // tag.unit,
                                          unit=1, rest=None))
        elif size % new_size == 0 and tag.unit == 1 and tag.block == 1 and tag.contiguous:
            unit = size // new_size
            rest = [math.prod(out_shape[new_dim + 1:end]) for end in range(new_dim + 1, len(out_shape) + 1)]
            if unit in rest and tag.offset % unit == 0 and tag.start % unit == 0 and tag.length % unit == 0:
                known = new_dim + 1 if new_dim + 1 < len(out_shape) and out_shape[new_dim + 1] == unit else None
                candidates.append(replace(tag, dim=new_dim, offset=tag.offset // unit, unit=unit, rest=known))
    # Prefer the last match: leading size-1 dims (batch of one) are ambiguous, the channel dim is not.
    return candidates[-1] if candidates else None


def _map_shuffle(in_shape: tuple[int, ...], out_shape: tuple[int, ...], tag: _Tag) -> list[_Tag] | None:
    """Where the channels of a unit tag land when a reshape merges its dim back *behind* the remainder of its
    units (the last step of a channel shuffle: ``(B, C) -> (B, G, C/G) -> transpose -> (B, C/G, G) -> (B, C)``):
    channel ``j`` of unit ``k`` goes to position ``j * G + offset + k``. One strided tag per unit; None when the
    reshape is not that. (Units of one channel, ``G == C``, make the shuffle the identity, but a pruned count
    could no longer be split in ``G``: the same mapping keeps every channel of the space.)"""
    rest, dim = tag.rest, tag.dim
    if rest is None or rest != dim - 1 or in_shape[rest] != tag.unit or tag.block != 1:
        return None
    prefix = math.prod(in_shape[:rest])
    groups = in_shape[dim]
    after = [math.prod(in_shape[dim + 1:end]) for end in range(dim + 1, len(in_shape) + 1)]
    for new_dim in reversed(range(len(out_shape))):
        merged, remainder = divmod(out_shape[new_dim], tag.unit * groups)
        if math.prod(out_shape[:new_dim]) != prefix or remainder or merged not in after:
            continue
        return [_Tag(tag.space, new_dim, (tag.offset + k) * merged, merged, first, first + tag.unit,
                     stride=groups * merged)
                for k, first in enumerate(range(tag.start, tag.stop, tag.unit))]
    return None


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
    if name == "movedim" and len(ints) == 2:
        order = list(range(ndim))
        source = order.pop(ints[0] % ndim)
        order.insert(ints[1] % ndim, source)
        return order
    if name == "t" and ndim == 2:
        return [1, 0]
    return None


def _index_dims(index: Any, ndim: int, shape: tuple[int, ...]) -> dict[int, int | None] | None:
    """For ``x[index]``: each input dim -> its output dim when taken whole, None when indexed or sliced;
    None overall for advanced (tensor or list) indexing."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (list, _TensorRef, torch.Tensor)) for i in items):
        return None
    if any(i is Ellipsis for i in items):
        at = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at:at + 1] = [slice(None)] * (ndim - used)
    mapping: dict[int, int | None] = {}
    dim = out = 0
    for item in items:
        if item is None:
            out += 1
        elif isinstance(item, slice):
            whole = dim < ndim and item.indices(shape[dim]) == (0, shape[dim], 1)
            mapping[dim] = out if whole else None
            dim += 1
            out += 1
        elif isinstance(item, int):
            mapping[dim] = None
            dim += 1
        else:
            return None
    for rest in range(dim, ndim):
        mapping[rest] = out
        out += 1
    return mapping


def _geometry(name: str, module: Any, x: _TensorRef | None, out_shape: tuple[int, ...]) -> LayerGeometry:
    """The geometry of a layer ``module`` called on ``x`` (typed Any: the attributes depend on the kind)."""
    in_shape = x.shape if x is not None else ()
    weight = module.weight
    act_dtype = x.dtype if x is not None else weight.dtype

    def per_sample(shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1, *shape[1:]) if shape else shape

    if isinstance(module, nn.Linear):
        return LayerGeometry(name, "Linear", module.in_features, module.out_features, 1, (1,), (1,),
                             per_sample(in_shape), per_sample(out_shape), act_dtype, weight.dtype)
    return LayerGeometry(name, _torch_kind(module), module.in_channels, module.out_channels, module.groups,
                         tuple(module.kernel_size), tuple(module.stride), per_sample(in_shape),
                         per_sample(out_shape), act_dtype, weight.dtype)


def _torch_kind(module: nn.Module) -> str:
    """The torch class a layer is (``Conv2d`` for a subclass of it): what its geometry's ``kind`` says, so cost
    models see the layer type, not the user's class name."""
    return next((cls.__name__ for cls in type(module).__mro__ if cls in PRUNABLE_TYPES), type(module).__name__)


_LEAF_FORWARDS = {cls.forward for cls in _LEAF_TYPES}
_LEAF_PARAMETERS = {"weight", "bias"}
_LEAF_BUFFERS = {"running_mean", "running_var", "num_batches_tracked"}


def _plain_leaf(module: nn.Module) -> bool:
    """A Conv/Linear/norm module acps can treat as a whole: one of torch's own classes or a subclass that keeps
    their forward and adds no parameters or buffers (a subclass with its own forward, e.g. a weight-standardised
    conv, a channels-first LayerNorm or a LoRA Linear, is traced function by function instead); or an
    ``nn.MultiheadAttention`` with packed projections."""
    if plain_multihead_attention(module):
        return True
    if not isinstance(module, _LEAF_TYPES) or type(module).forward not in _LEAF_FORWARDS:
        return False
    return (set(module._parameters) <= _LEAF_PARAMETERS and set(module._buffers) <= _LEAF_BUFFERS
            and not any(True for _ in module.children()))


def _shared_weights(model: nn.Module, names: Mapping[nn.Module, str]) -> dict[str, str]:
    """Layers and norms whose parameters also belong to another module: name -> the other module(s)."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), [])
            if module_name not in owners[id(param)]:
                owners[id(param)].append(module_name)
    shared = {}
    for module, name in names.items():
        if isinstance(module, (*_LEAF_TYPES, nn.MultiheadAttention)):
            others = sorted({o for p in module.parameters(recurse=False) for o in owners.get(id(p), []) if o != name})
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
        DataError: when it raises on data whose dtype is not the parameters' and runs once the data is converted
            (integer, bool or complex images; see :func:`~acps_core.model_checks.explain_trace_failure`).
    """
    module_names: dict[nn.Module, str] = {}
    module_types: dict[str, str] = {}
    for name, module in model.named_modules():
        module_names.setdefault(module, name)
        module_types[name] = type(module).__name__
    leaf_names = {m: n for m, n in module_names.items() if _plain_leaf(m)}

    param_names = {id(p): n for n, p in model.named_parameters()}
    recorder = _Recorder(leaf_names, param_names)
    sample = trace_sample(data)
    for tensor in _tensors_in(sample):
        recorder.add_value(tensor)
    # Hooks with kwargs on the leaf modules only: a layer called as conv(input=x) is recorded too.
    handles = []
    for module in leaf_names:
        handles.append(module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(recorder.post_hook, with_kwargs=True, always_call=True))
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

    builder = _GroupBuilder(recorder, _shared_weights(model, module_names))
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
            top = builder.spaces[root]
            reasons = list(top.reasons)
            problem = structure_problem(top.channels, top.unit, top.blocks, top.aligned)
            if problem:
                reasons.append(problem)
            group_of_root[root] = len(groups)
            groups.append(ChannelGroup(len(groups), top.channels, [], reasons=reasons, unit=top.unit,
                                       blocks=top.blocks, aligned=top.aligned))
        group = groups[group_of_root[root]]
        group.producers.append(space.producer)
        for use in space.followers:
            if use not in group.followers:
                group.followers.append(use)
        for use in space.consumers:
            if use not in group.consumers:
                group.consumers.append(use)

    layers: dict[str, LayerInfo] = {}
    attention = {name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}
    for name, module in model.named_modules():
        if not (isinstance(module, PRUNABLE_TYPES) or isinstance(module, nn.MultiheadAttention)) or name in layers:
            continue
        entry = builder.layers.get(name)
        owner = name.rpartition(".")[0]
        if entry is None and owner in attention and name.endswith("out_proj"):
            layers[name] = LayerInfo(name, type(module).__name__, None,
                                     reason=f"the out projection of nn.MultiheadAttention {owner}, which acps "
                                            f"could not trace as a whole (see {owner})")
            continue
        if entry is None:
            reason = ("not called in the forward pass on the calibration data" if _plain_leaf(module) else
                      f"a {type(module).__name__} with its own forward or extra parameters, which acps does not "
                      "prune (its inputs are left alone too)")
            layers[name] = LayerInfo(name, type(module).__name__, None, reason=reason)
            continue
        out_group = group_of_root[builder.find(entry["out"])] if entry["out"] is not None else None
        in_uses = [(group_of_root[builder.find(space)], use) for space, use in entry["in"]]
        reason = entry["reason"]
        if reason is None and out_group is not None and not groups[out_group].prunable:
            reason = "; ".join(groups[out_group].reasons)
        layers[name] = LayerInfo(name, type(module).__name__, entry["geometry"], out_group, in_uses, reason)
    return ChannelGraph(layers, groups, output_layers, module_types)
