"""The three kinds of method a plugin provides, as base classes.

The method names and argument shapes follow the reference (AMCT's ``SensitivityBase`` and
``SearchChannelBase``), so a class written for the reference keeps working; acps adds
:class:`GainEstimatorBase`, for which the reference has no extension point. A subclass that misses a required
method fails when it is instantiated, with an error naming the method to add or rename.

A method class may declare its options as a nested ``Options`` model (see :mod:`acps_core.methods.options`):
acps then checks the options of ``Name(option=value, ...)`` before building it, and the report records them.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from acps_core.errors import PluginError

if TYPE_CHECKING:
    from acps_core.graph.model import ChannelGraph, LayerGeometry
    from acps_core.search.problem import GraphInfo, PruneSearchConfig, SearchRecord


class MethodDefinitionError(PluginError, TypeError):
    """A method class does not implement what its base class requires."""


def _check_required_methods(cls: type, base: type) -> None:
    """Raise MethodDefinitionError when ``cls`` leaves an abstract method of ``base`` unimplemented."""
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if not missing:
        return
    defined = [name for name in vars(cls) if not name.startswith("__") and callable(vars(cls)[name])]
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, defined, n=1, cutoff=0.6)
        signature = getattr(base, name).__doc__.strip().splitlines()[0] if getattr(base, name).__doc__ else ""
        hint = f"rename {close[0]}() to {name}()" if close else f"add {name}()"
        hints.append(f"{hint} ({signature})" if signature else hint)
    raise MethodDefinitionError(
        f"{cls.__module__}.{cls.__qualname__} subclasses {base.__name__} but does not implement "
        f"{', '.join(m + '()' for m in missing)}: " + "; ".join(hints) + "."
    )


class SensitivityBase(ABC):
    """Scores how much the model's loss depends on each output channel of each prunable channel group.

    A subclass implements :meth:`get_sensitivity`; it may override :meth:`setup_initialization` to prepare
    (calling ``super().setup_initialization(...)`` first). acps calls ``setup_initialization`` once, then
    ``get_sensitivity`` once, with the model in eval mode; it restores the model's modes, ``requires_grad``
    flags and ``.grad`` tensors afterwards, so a method may call ``backward()``. A method must not change
    parameter values.

    Args:
        loss_func: ``loss_func(output, label) -> scalar tensor``. ``None`` selects the reference's rule
            (L1 between output and label; see the method's own docs for how it treats class labels).
    """

    #: True for methods that fall back to :func:`acps_core._util.data.default_loss` when ``loss_func`` is None: the
    #: core then checks that the labels fit the model output before any heavy work.
    uses_default_loss: bool = False

    def __new__(cls, *args: Any, **kwargs: Any) -> SensitivityBase:
        _check_required_methods(cls, SensitivityBase)
        return super().__new__(cls)

    def __init__(self, loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.loss_func = loss_func
        #: Remarks a method wants the user to read (e.g. a fallback it took); copied into the search result.
        self.notes: list[str] = []
        self.model: torch.nn.Module | None = None
        self.graph: ChannelGraph | None = None
        self.input_data: Sequence[Any] = ()
        self.test_iteration = 1
        self.output_nodes: Sequence[str] | None = None

    def setup_initialization(self, graph_tuple: tuple[torch.nn.Module, ChannelGraph], input_data: Sequence[Any],
                             test_iteration: int, output_nodes: Sequence[str] | None = None) -> None:
        """setup_initialization(graph_tuple, input_data, test_iteration, output_nodes=None): store the inputs.

        Args:
            graph_tuple: ``(model, graph)``: the user's model and its :class:`~acps_core.graph.model.ChannelGraph`.
            input_data: ``[data, label]`` on the model's device, as the user passed them; or, when the user
                passed an iterable of batches (a DataLoader), the list of the ``test_iteration`` batches used.
            test_iteration: number of calibration passes; :meth:`calibration_batches` splits the data into them.
            output_nodes: names of the model's output layers (never pruned).
        """
        self.model, self.graph = graph_tuple
        self.notes = []  # an instance reused for a second search starts without the first one's remarks
        self.input_data = input_data
        self.test_iteration = test_iteration
        self.output_nodes = output_nodes

    def calibration_batches(self) -> list[tuple[Any, torch.Tensor]]:
        """The ``(data, label)`` pairs of the calibration passes: ``[data, label]`` split into ``test_iteration``
        parts along the batch dimension (dim 0), or the batches of an iterable input (a DataLoader)."""
        from acps_core._util.data import split_calibration_data

        return split_calibration_data(self.input_data, self.test_iteration)

    @abstractmethod
    def get_sensitivity(self, search_records: list[SearchRecord]) -> Any:
        """get_sensitivity(search_records): set ``record.sensitivity`` for every record.

        ``record.sensitivity`` must be a 1-D tensor (or list) of ``record.channels`` finite, non-negative scores;
        a higher score means the channel matters more. Returning ``{record.name: scores}`` instead of setting the
        attribute is accepted too.
        """


class SearchChannelBase(ABC):
    """Decides which channels of each prunable group to keep, under the cost budget.

    A subclass implements :meth:`channel_prune_search`. The problem it solves: choose, for each record (one
    channel group), a kept count from ``record.allowed_kept`` and which channels to keep, so that
    ``graph_info.cost(kept)`` (the model's cost with the groups the search may not change at their fixed counts)
    is at most ``graph_info.budget`` while the kept sensitivity is as large as possible.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SearchChannelBase:
        _check_required_methods(cls, SearchChannelBase)
        return super().__new__(cls)

    @abstractmethod
    def channel_prune_search(self, graph_info: GraphInfo, search_records: list[SearchRecord],
                             prune_config: PruneSearchConfig) -> dict[str, list[int]]:
        """channel_prune_search(graph_info, search_records, prune_config) -> {layer_name: [0 or 1] * ori_cout}

        Args:
            graph_info: ``{layer_name: {"cin", "cout", "ori_cout", "bitops"}}`` as in the reference, plus
                ``cost(kept)`` and ``saving(kept, group_id, new_count)`` (the exact model cost for any kept counts,
                the fixed groups included), ``budget`` (the most ``cost(kept)`` may be), ``full_cost`` and
                ``cost_model``.
            search_records: one :class:`~acps_core.search.problem.SearchRecord` per searchable group, with
                ``sensitivity`` and ``gain`` filled in.
            prune_config: ``(compress_ratio, ascend_optimized, max_prune_ratio)``.

        Returns:
            For each producer layer of a group that loses channels, a keep mask (1 = keep) over its original output
            channels. Producers of one group must get the same mask; layers left out keep every channel.
        """


class GainEstimatorBase(ABC):
    """Estimates the cost (the thing the compress ratio divides) of a layer at given channel counts.

    A subclass implements :meth:`layer_cost`. acps sums it over every Conv/Linear layer of the model to get the
    model's cost for any choice of kept channels, so what a channel saves is derived from it exactly, including
    staircase effects (cost flat until a hardware boundary).
    """

    #: Short description of the unit of the cost, shown in reports (e.g. "bit-ops", "ms").
    unit: str = "cost"
    #: The device the model's parameters are on; acps sets it before :meth:`prepare` (an estimator that
    #: measures layers on the device reads it).
    model_device: torch.device = torch.device("cpu")

    def __new__(cls, *args: Any, **kwargs: Any) -> GainEstimatorBase:
        _check_required_methods(cls, GainEstimatorBase)
        return super().__new__(cls)

    def prepare(self, layers: Sequence[LayerGeometry]) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Called once with every layer before any :meth:`layer_cost` call (e.g. to build a lookup table)."""

    def observe_model(self, model: torch.nn.Module, sample: Any) -> None:  # noqa: B027 - optional hook
        """Called once after :meth:`prepare` with the model (in eval mode; it must not be changed) and a
        calibration sample it can run, e.g. to measure what the per-layer costs leave out."""

    def measure_speedup(self, model: torch.nn.Module, pruned: torch.nn.Module, sample: Any) -> float | None:
        """Optional: how much faster ``pruned`` (the model with the search's choice cut out, in eval mode) runs
        ``sample`` than ``model`` does, as measured on the hardware this estimator models; None (the default)
        when it does not measure. An estimator that measures lets the search aim by what it measures: it cuts
        its choice out, times it, and searches again at a corrected aim until the measured speed-up is the target
        (see :mod:`acps_core.search.aiming`)."""
        return None

    def fixed_cost(self) -> float:
        """Cost of everything outside the Conv/Linear layers, which pruning is taken not to change (added to the
        model's cost before and after; 0 by default)."""
        return 0.0

    def computation_cost(self, macs: float, dtype: torch.dtype) -> float:
        """Cost of the matrix products outside the Conv/Linear layers, which pruning does not change: attention
        products, convs whose weight the forward pass computes (weight standardisation), einsums. ``macs`` is
        their multiply-accumulates per sample, ``dtype`` the model's activation dtype. 0 by default (an
        estimator that measures the whole model, like ``MeasuredLatency``, has them in :meth:`fixed_cost`)."""
        return 0.0

    @abstractmethod
    def layer_cost(self, layer: LayerGeometry, in_channels: int, out_channels: int) -> float:
        """layer_cost(layer, in_channels, out_channels) -> float: the layer's cost at these channel counts.

        Must be finite, non-negative, and not decrease when a channel count grows.
        """


#: The base class every method of a kind must subclass, by kind, in the order the pipeline uses them.
METHOD_BASES: dict[str, type] = {
    "sensitivity": SensitivityBase,
    "search": SearchChannelBase,
    "gain": GainEstimatorBase,
}

#: The method kinds, in pipeline order (the registry lists methods in this order).
KINDS: tuple[str, ...] = tuple(METHOD_BASES)

#: The keyword argument of the public call through which users select a method of each kind.
PARAMETER_BY_KIND: dict[str, str] = {"sensitivity": "sensitivity", "search": "search_alg", "gain": "gain"}


def kind_base(kind: str) -> type:
    """The base class of a method kind.

    Raises:
        PluginError: ``kind`` is not one of :data:`KINDS`.
    """
    try:
        return METHOD_BASES[kind]
    except KeyError:
        raise PluginError(f"unknown method kind {kind!r}; the kinds are {', '.join(KINDS)}") from None
