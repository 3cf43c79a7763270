"""The interface that holds everything acps knows about one layer type, and the registry of layer types.

Every layer type acps prunes has one :class:`LayerAdapter`: the graph asks it how the layer's calls move channels
(:attr:`LayerAdapter.role`, :meth:`~LayerAdapter.geometry`, :meth:`~LayerAdapter.input_dim`), the sensitivity
methods where its channels sit in its parameters (:meth:`~LayerAdapter.output_parameters`,
:meth:`~LayerAdapter.input_parameters`), the prune step how to cut it (:meth:`~LayerAdapter.keep_outputs`,
:meth:`~LayerAdapter.keep_inputs`), and the repairs how to re-fit it. The built-in types are registered in
:mod:`acps_core.layers`; :func:`register_layer` adds a user's own type (a quantized conv, a LoRA-wrapped Linear),
which is then traced as one layer and pruned like a built-in one.

The design follows the per-type pruning functions of Torch-Pruning (Fang et al., "DepGraph: Towards Any
Structural Pruning", CVPR 2023), here with every rule of a type in one class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from typing import Any, ClassVar

import torch
from torch import nn

from acps_core.errors import ArgumentError
from acps_core.graph.model import LayerGeometry

#: Buffers a layer traced whole may hold (a norm's running statistics).
STATISTICS = frozenset({"running_mean", "running_var", "num_batches_tracked"})
#: Caches an adapter keeps for the length of one graph build (what a trial on a module's first call found, shared
#: by the model's other modules of its class): emptied when a build starts, so that another model's modules of
#: the same class, which may behave otherwise, are tried again.
BUILD_CACHES: list[dict[Any, Any]] = []
#: Tensors of fewer entries are always copied by :func:`select`: a view would save next to nothing, and finding
#: the runs of the index costs more than the copy.
VIEW_MIN_ENTRIES = 1 << 16


def select(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """The entries ``index`` (ascending, each once) of ``tensor`` along ``dim``.

    For a large tensor, one run of consecutive entries gives a view that shares ``tensor``'s memory (no copy: a
    trial pruning that is run once and dropped costs nothing); :func:`acps_core.prune.slicing.prune_channels`
    gives every such view memory of its own once all layers are cut. Other indices give a new tensor; along an
    inner dim the runs are copied whole, which is faster than gathering single entries.
    """
    count = index.numel()
    if tensor.numel() < VIEW_MIN_ENTRIES or count == 0:
        return tensor.index_select(dim, index.to(tensor.device))
    index = index.cpu()
    first = int(index[0])
    if int(index[-1]) - first + 1 == count:  # ascending, so one run
        return tensor.narrow(dim, first, count)
    if dim % tensor.dim():
        starts = (torch.nonzero(index.diff() != 1).flatten() + 1).tolist()  # where a new run starts
        if (len(starts) + 1) * 8 <= count:
            bounds, positions = [0, *starts, count], index.tolist()
            return torch.cat([tensor.narrow(dim, positions[a], b - a) for a, b in zip(bounds, bounds[1:])], dim)
    return tensor.index_select(dim, index.to(tensor.device))


def take(param: torch.Tensor | None, dim: int, index: torch.Tensor) -> nn.Parameter | None:
    """A parameter holding the entries ``index`` of ``param`` along ``dim`` (None stays None).

    It may share ``param``'s memory (see :func:`select`): never write into it in place; compute a new tensor.
    """
    if param is None:
        return None
    return nn.Parameter(select(param.detach(), dim, index), requires_grad=param.requires_grad)


def take_buffer(buffer: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """The entries ``index`` of a per-channel buffer (None stays None; it may share the buffer's memory)."""
    return None if buffer is None else select(buffer, 0, index)


class LayerAdapter:
    """What acps needs to know about one layer type. Subclass it for a type of your own and register it with
    :func:`register_layer`.

    A layer of role ``"layer"`` (Conv, Linear) reads channels along :meth:`input_dim` of its input and produces
    channels of its own along :meth:`output_dim` of its output; its output channels start a channel group, its
    input channels are where a group is consumed. A ``"follower"`` (a norm, a per-channel PReLU) keeps one
    parameter per channel of its input, which it passes on unchanged: it follows the group of its input. The role
    ``"attention"`` is ``nn.MultiheadAttention``'s, whose heads the graph maps with a rule of its own.

    Methods that take ``module`` get the module instance (the adapter itself holds no state).
    """

    #: ``"layer"``, ``"follower"`` or ``"attention"`` (see the class docs).
    role: ClassVar[str] = "layer"
    #: For a follower: once pruned, it computes on the kept channels something that zeroing the removed ones in
    #: the unpruned model does not (a LayerNorm normalises over the kept channels only: its mean and variance
    #: change). Such groups are pruned unless ``approximate_norms(False)`` is set (see :mod:`acps_core.layers.norm`).
    approximate: ClassVar[bool] = False

    # -- tracing ---------------------------------------------------------------------------------------------
    def traced_whole(self, module: nn.Module) -> bool:
        """Whether a call of ``module`` is traced as one operation. When it is not (a subclass with a forward of
        its own), its forward is traced function by function, and the layer is not pruned."""
        return True

    def kind(self, module: nn.Module) -> str:
        """The layer type shown in geometries and reports, e.g. ``"Conv2d"``."""
        return type(module).__name__

    def geometry(self, name: str, module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                 dtype: torch.dtype) -> LayerGeometry:
        """The layer's real geometry when called on an input of ``input_shape`` (per sample: batch 1) giving an
        output of ``output_shape``, activations of ``dtype`` (a ``"layer"`` must implement it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement geometry() for role {self.role!r}")

    def input_dim(self, module: nn.Module, ndim: int) -> int:
        """The dim of its (``ndim``-dimensional) input that holds the channels it reads (1 by default, as for
        a Conv; the last for a Linear)."""
        return 1

    def output_dim(self, module: nn.Module, ndim: int) -> int:
        """The dim of its output that holds the channels it produces (or, for a follower, passes on)."""
        return self.input_dim(module, ndim)

    # -- followers -------------------------------------------------------------------------------------------
    def follows(self, module: nn.Module) -> bool:
        """For a follower: whether it keeps one parameter per input channel (False: element-wise, e.g. a PReLU
        with one shared slope, which passes the channels on without any parameter to slice)."""
        return True

    def follow_unit(self, module: nn.Module) -> int:
        """For a follower: its channels go in whole units of this many (a GroupNorm's groups); 1 = singly."""
        return 1

    def mixed_dims(self, module: nn.Module, ndim: int) -> set[int]:
        """For a follower: dims other than :meth:`input_dim` whose channels it mixes (a LayerNorm over several
        dims), which can then not be pruned."""
        return set()

    def masked_output(self, module: nn.Module, removed: Set[int]) -> Callable[..., Any] | None:
        """For a follower whose kept outputs depend on the removed channels (a LayerNorm's statistics): a forward
        hook (``register_forward_hook(..., with_kwargs=True)``) that makes the module compute what it will compute
        once the ``removed`` positions are pruned. None (the default) when zeroing the removed channels is
        enough."""
        return None

    # -- parameters ------------------------------------------------------------------------------------------
    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int | tuple[int, ...]]]:
        """``(parameter, dim, part)`` triples: output channel ``c`` of the layer is entry ``part * C + c`` of the
        parameter along ``dim``, for ``C`` output channels (``part`` is 0 but for fused projections: the q, k and
        v rows of a packed attention projection are parts 0, 1 and 2). ``part`` may instead be a tuple with the
        output channel of each entry along ``dim`` (the rows of a fused projection laid out head by head). For a
        follower: its per-channel parameters. Parameters that are None are skipped by callers."""
        return [("weight", 0, 0), ("bias", 0, 0)]

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        """``(parameter, dim, groups)`` triples: input position ``p`` of the layer is entry ``p`` along ``dim``
        (with ``groups > 1``, the parameter holds ``groups`` blocks side by side, each read by its own rows)."""
        return [("weight", 1, 1)]

    def filter_rows(self, module: nn.Module) -> torch.Tensor:
        """The layer's filters, one row per output channel (``[out_channels, -1]``): what the filter-norm
        channel choice ranks."""
        name, dim, _ = self.output_parameters(module)[0]
        weight = getattr(module, name).detach()
        rows: torch.Tensor = weight.movedim(dim, 0).reshape(weight.shape[dim], -1)
        return rows

    # -- pruning ---------------------------------------------------------------------------------------------
    def out_size(self, module: nn.Module) -> int:
        """How many output channels (for a follower: channels) the module has now."""
        raise NotImplementedError(f"{type(self).__name__} must implement out_size()")

    def in_size(self, module: nn.Module) -> int:
        """How many input channel positions the module reads now."""
        raise NotImplementedError(f"{type(self).__name__} must implement in_size()")

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        """Keep only the output channels ``index`` (sorted positions), in place: parameters, buffers and the
        module's size attributes."""
        raise NotImplementedError(f"{type(self).__name__} must implement keep_outputs()")

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        """Keep only the input positions ``index`` (sorted), in place."""
        raise NotImplementedError(f"{type(self).__name__} must implement keep_inputs()")

    # -- the repairs -----------------------------------------------------------------------------------------
    def refittable(self, module: nn.Module) -> bool:
        """Whether the re-fit can solve for the weights that read the kept input channels (a layer that mixes
        its input channels linearly at each position). False by default."""
        return False

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as ``(positions, channels)``: what the re-fit fits on."""
        x = x.detach()
        dim = self.input_dim(module, x.dim())
        return x.movedim(dim, -1).reshape(-1, x.shape[dim])

    def fold_input_map(self, module: nn.Module, weight: torch.Tensor, input_map: torch.Tensor) -> torch.Tensor:
        """The weight ``weight`` (kept outputs, all original inputs) composed with ``input_map`` (original input
        channels x kept input channels): the weight that reads the kept channels."""
        raise NotImplementedError(f"{type(self).__name__} must implement fold_input_map() to be re-fitted")

    def confirm(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """For an adapter registered for a pattern of parts rather than a type (:func:`register_pattern`):
        whether the module computes what the adapter assumes, tried on its first traced call's arguments. A module
        it cannot confirm is traced function by function instead. True by default."""
        return True

    def unconfirmed(self, module: nn.Module, name: str) -> str:
        """Why acps left the channels inside a module that :meth:`confirm` refused, added to the reasons of its
        groups that could not be pruned otherwise."""
        return (f"{name} ({type(module).__name__}) has the parts {type(self).__name__} prunes, but its first call "
                "did not compute what that adapter assumes, so it was traced function by function")

    def child_pruned(self, module: nn.Module, child: str) -> None:
        """Called on a module after its child ``child`` was pruned (``nn.MultiheadAttention`` changes its forward
        once its out projection loses outputs). Nothing by default."""


_ADAPTERS: dict[type, LayerAdapter] = {}
# Layers recognised by their parts rather than their class (self-attention with a fused qkv Linear).
_PATTERNS: list[tuple[Callable[[nn.Module], bool], LayerAdapter]] = []


def register_pattern(matches: Callable[[nn.Module], bool], adapter: LayerAdapter) -> None:
    """Use ``adapter`` for modules of no registered type for which ``matches(module)`` is true; the adapter's
    :meth:`LayerAdapter.confirm` must hold on each such module's first traced call for it to be traced whole.

    Raises:
        ArgumentError: ``matches`` is not callable, or ``adapter`` is no ``LayerAdapter``.
    """
    if not callable(matches):
        raise ArgumentError(f"register_pattern needs a callable that takes a module, got {matches!r}")
    if not isinstance(adapter, LayerAdapter):
        raise ArgumentError(f"register_pattern needs a LayerAdapter instance, got {type(adapter).__name__}")
    _PATTERNS.append((matches, adapter))


def register_layer(module_type: type, adapter: LayerAdapter) -> None:
    """Make acps trace and prune ``module_type`` (and its subclasses, unless they have an adapter of their own)
    with ``adapter``.

    Args:
        module_type: a subclass of ``torch.nn.Module``.
        adapter: an instance of a :class:`LayerAdapter` subclass.

    Raises:
        ArgumentError: ``module_type`` is no ``nn.Module`` class, or ``adapter`` no ``LayerAdapter``, or its
            role is unknown.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ArgumentError(f"register_layer needs a torch.nn.Module class, got {module_type!r}")
    if not isinstance(adapter, LayerAdapter):
        raise ArgumentError(f"register_layer needs a LayerAdapter instance for {module_type.__name__}, got "
                            f"{type(adapter).__name__}")
    if adapter.role not in ("layer", "follower", "attention"):
        raise ArgumentError(f"{type(adapter).__name__}.role is {adapter.role!r}; it must be 'layer' or 'follower'")
    _ADAPTERS[module_type] = adapter


def unregister_layer(module_type: type) -> None:
    """Forget the adapter registered for ``module_type`` (no error if there is none)."""
    _ADAPTERS.pop(module_type, None)


def adapter_for(module: nn.Module | type) -> LayerAdapter | None:
    """The adapter of a module (or module class): the one registered for its class or the nearest base class, or
    for a module of no registered type, the first pattern it matches (see :func:`register_pattern`)."""
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        adapter = _ADAPTERS.get(base)
        if adapter is not None:
            return adapter
    if not isinstance(module, type):
        for matches, adapter in _PATTERNS:
            if matches(module):
                return adapter
    return None


def by_pattern(module: nn.Module) -> bool:
    """Whether the module's adapter comes from a pattern of parts rather than its type."""
    return not any(base in _ADAPTERS for base in type(module).__mro__) and any(
        matches(module) for matches, _ in _PATTERNS)


def whole_layer(module: nn.Module) -> LayerAdapter | None:
    """The adapter of a module that is traced as one operation (see :meth:`LayerAdapter.traced_whole`)."""
    adapter = adapter_for(module)
    return adapter if adapter is not None and adapter.traced_whole(module) else None


def plain_subclass(module: nn.Module, base_types: Sequence[type[nn.Module]], parameters: Set[str],
                   buffers: Set[str]) -> bool:
    """Whether ``module`` is one of ``base_types`` or a subclass that keeps their forward and adds no parameter,
    buffer or child module (a subclass with its own forward, e.g. a weight-standardised conv, is traced function
    by function instead)."""
    forwards = {cls.forward for cls in base_types}
    if type(module).forward not in forwards:
        return False
    return (set(module._parameters) <= parameters and set(module._buffers) <= buffers
            and not any(True for _ in module.children()))


def sizes(module: Any, **values: int) -> None:
    """Set the size attributes of a sliced module."""
    for key, value in values.items():
        setattr(module, key, value)
