"""What the channel graph reports: layers, their geometry, the channel groups and where each group's channels
sit in every layer and parameter.

:func:`~acps_core.graph.build.build_channel_graph` builds a :class:`ChannelGraph`; the search, the sensitivity
methods, the cost models and the prune step read it. A :class:`ChannelGroup` is a set of channels that must be
pruned together; a :class:`ChannelUse` says where a group's channels sit in one layer; a :class:`ParamSlice` where
they sit in one parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: One layer's parameter slots: ``(parameter, dim, part)`` for its output channels (channel ``c`` is entry
#: ``part * channels + c`` along ``dim``: a fused q/k/v projection has three parts; or ``part`` is a tuple
#: giving the channel of each entry along ``dim``, for heads laid out otherwise) and ``(parameter, dim, groups)``
#: for its input positions.
OutputSlot = tuple[str, int, "int | tuple[int, ...]"]
InputSlot = tuple[str, int, int]


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
    #: For attention: how many independent sequences of ``input_shape[1]`` tokens it attends over per sample (the
    #: patches of a MobileViT block); 1 otherwise.
    rows: int = 1
    #: For attention: its query/key width over its value width, and its key/value heads over its query heads.
    key_share: float = 1.0
    kv_share: float = 1.0
    #: For attention: multiply-accumulates of its attention products per query token and value channel, as
    #: measured on its first call; 0 = as many keys as queries, ``(key_share + 1) * tokens``.
    attended: float = 0.0

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
        if self.kind in ("Linear", "Embedding"):
            return math.prod(self.output_shape[1:-1])
        if self.transposed:
            return math.prod(self.input_shape[2:])
        return math.prod(self.output_shape[2:])

    @property
    def projection_rows(self) -> float:
        """For attention: rows of its q, k and v projections per output channel (3 for multi-head attention)."""
        return self.key_share + self.kv_share * (self.key_share + 1)

    def macs(self, in_channels: int | None = None, out_channels: int | None = None) -> float:
        """Multiply-accumulates per sample at the given channel counts (the traced ones by default).

        For ``MultiheadAttention`` the input channels are its embed_dim and the output channels the width of its
        heads' values: the q/k/v projections (:attr:`projection_rows`) and the two attention products (as
        measured, :attr:`attended`, or else self-attention with as many keys as queries); its out projection is a
        Linear layer of its own. An embedding is a lookup: none.
        """
        cin = self.in_channels if in_channels is None else in_channels
        cout = self.out_channels if out_channels is None else out_channels
        if self.kind == "MultiheadAttention":
            tokens = self.input_shape[1]
            products = (self.attended or (self.key_share + 1) * tokens) * cout
            return float(self.rows * tokens * (self.projection_rows * cin * cout + products))
        if self.kind == "Embedding":
            return 0.0
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
    unit_scores = values.reshape(blocks, units_per_block, unit).sum(dim=2)
    # first[b, r]: the first channel of block b's r-th least important unit; atom r is those units of every block.
    first = torch.argsort(unit_scores, dim=1, stable=True) * unit + torch.arange(blocks)[:, None] * per_block
    atoms = first.T[:, :, None] + torch.arange(unit)
    return atoms.reshape(units_per_block, blocks * unit).sort(dim=1).values.tolist()


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
    """One Conv/ConvTranspose/Linear layer of the model and how the graph sees it. ``in_uses``: for every group
    feeding its input channels, the group id and where its channels sit there; its output channels are its
    group's, ``out_repeat`` times over (GhostNet's conv shortcut); the forward calls it ``calls`` times."""

    name: str
    kind: str
    geometry: LayerGeometry | None
    out_group: int | None = None
    in_uses: list[tuple[int, ChannelUse]] = field(default_factory=list)
    reason: str | None = None
    out_repeat: int = 1
    calls: int = 1

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
    #: The group channel of each entry along ``dim``, when not laid out as ``use`` says (q/k/v rows head by head).
    channel_of: tuple[int, ...] | None = None

    def per_channel(self, tensor: torch.Tensor, channels: int) -> torch.Tensor:
        """Sum ``tensor`` (shaped like the parameter) over everything but the group's channels: shape
        ``[channels]`` (zero for channels this use does not cover)."""
        if self.groups > 1:
            # (out, in/groups, ...) -> (groups, out/groups, in/groups, ...) -> per input position g*in/g + j
            per_group = tensor.reshape(self.groups, tensor.shape[0] // self.groups, tensor.shape[1], -1)
            position_sums = per_group.sum(dim=(1, 3)).reshape(-1)
        else:
            position_sums = tensor.movedim(self.dim, 0).reshape(tensor.shape[self.dim], -1).sum(dim=1)
        if self.channel_of is not None:
            index = torch.tensor(self.channel_of, dtype=torch.long, device=tensor.device)
            return position_sums.new_zeros(channels).index_add_(0, index, position_sums)
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
    """Every Conv/ConvTranspose/Linear layer of a model (and every other registered layer type) and the channel
    groups found by tracing it.

    Build it with :func:`~acps_core.graph.build.build_channel_graph`.
    """

    def __init__(self, layers: dict[str, LayerInfo], groups: list[ChannelGroup], output_layers: list[str],
                 module_types: dict[str, str], output: Any = None,
                 slots: Mapping[str, tuple[list[OutputSlot], list[InputSlot]]] | None = None) -> None:
        #: The model's output on the traced samples (the first two of the calibration data).
        self.output = output
        self.layers = layers
        self.groups = groups
        self.output_layers = output_layers
        self._module_types = module_types
        #: Per traced layer or follower: where its output (or per-channel) and input channels sit in its
        #: parameters, as its layer adapter says.
        self.slots = dict(slots or {})
        #: Multiply-accumulates per sample of the traced computations no layer accounts for (attention matmuls,
        #: convs with a computed weight, ...): a cost that pruning does not change.
        self.other_macs = 0.0
        #: Weights (qualified names) of norms called as a function whose statistics run over the channels (a
        #: ``layer_norm`` over a channels-first map) -> the function; masking recomputes them over kept channels.
        self.norms_over_channels: dict[str, str] = {}

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
            for param, dim, part in self.slots.get(name, ([], []))[0]:
                owner, attr = _child(name, param)
                rows = part if isinstance(part, tuple) else None  # (then laid out head by head)
                offset = 0 if isinstance(part, tuple) else part * group.channels
                slices.append(ParamSlice(owner, attr, dim, ChannelUse(name, kind, offset=offset), channel_of=rows))
        for use in group.followers:
            if use.kind == "Buffer":
                continue  # a statistic, not a weight
            if use.kind == "Parameter":
                owner, _, attr = use.layer.rpartition(".")
                slices.append(ParamSlice(owner, attr, use.dim, use))
            else:
                slices += [ParamSlice(use.layer, param, dim, use)
                           for param, dim, _ in self.slots.get(use.layer, ([], []))[0]]
        for use in group.consumers:
            slices += [ParamSlice(*_child(use.layer, param), dim, use, groups)
                       for param, dim, groups in self.slots.get(use.layer, ([], []))[1]]
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
        if layer.out_group is not None and layer.out_group in kept:
            cout = kept[layer.out_group] * layer.out_repeat
        return cin, cout

    def explain(self) -> dict[str, str]:
        """For every Conv/ConvTranspose/Linear layer: ``"prunable (group G)"`` or why it is left alone."""
        return {name: f"prunable (group {self.groups[layer.out_group].name})"  # type: ignore[index]
                if layer.prunable else (layer.reason or "not prunable") for name, layer in self.layers.items()}


def _child(module: str, param: str) -> tuple[str, str]:
    """A parameter slot named through a child (``qkv.weight`` of an attention module) as (that child, its name)."""
    path, _, attr = param.rpartition(".")
    return (f"{module}.{path}" if path else module), attr
