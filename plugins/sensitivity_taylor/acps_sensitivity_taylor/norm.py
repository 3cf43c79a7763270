"""Filter-norm sensitivity: the reference's channel choice (``BalancedL2NormFilterPruner``) as a search score.

Needs no labels and no gradient: a channel's score is the L2 norm of everything its group's producers compute
it from (their filter rows, for attention the q/k/v rows), summed over the producers. "Balanced": each group's
scores are divided by their mean, so that groups of different size and depth compare on relative norms and the
search spreads the cuts instead of emptying the layers whose weights happen to be small.
"""

from __future__ import annotations

import torch

from acps_core.plugin import ChannelGraph, MethodOptions, SearchRecord, SensitivityBase
from acps_sensitivity_taylor.options import Normalize


class BalancedL2NormSensitivity(SensitivityBase):
    """Channel importance = filter L2 norm over the group's producers, divided by the group's mean (label-free)."""

    class Options(MethodOptions):
        """:class:`BalancedL2NormSensitivity` takes no options."""

    def get_sensitivity(self, search_records: list[SearchRecord]) -> None:
        """Set ``record.sensitivity`` for every record (see the module docs)."""
        assert self.model is not None and self.graph is not None, "setup_initialization was not called"
        for record in search_records:
            norms = filter_norms(self.model, self.graph, record)
            mean = float(norms.mean())
            record.sensitivity = norms / mean if mean > 0 else norms


class GroupMagnitudeSensitivity(SensitivityBase):
    """Channel importance from every weight tied to the channel, divided by the group's median (label-free).

    For each parameter slice of the group (the producers' filter rows and biases, the norms' scales and shifts,
    the depthwise filters that follow, the consumers' input columns) the channel's sum of squares is taken; the
    channel's importance is their mean over the slices, divided by the group's median importance (``normalize=
    "mean"``: its mean, as Torch-Pruning's ``GroupMagnitudeImportance`` does). Unlike
    :class:`BalancedL2NormSensitivity`, which reads only the producers' filters, it sees a channel that a
    BatchNorm scales to almost nothing, or that the next layer barely reads. The median is not pulled up by a
    group's few very large channels, so a group whose typical channel is small is cut more; ``bench/quality.py``
    measured it ahead of the mean on MobileNetV2 and level on ResNet-20. With ``GlobalRankSearch`` it is acps's
    recommended configuration for a model used without fine-tuning (see docs/benchmarks/quality.md). ``normalize=
    "none"`` leaves the importances undivided.

    Raises:
        MethodOptionsError: ``normalize`` is not ``"none"``, ``"mean"`` or ``"median"`` (an ``ArgumentError``).
    """

    class Options(MethodOptions):
        """The options of :class:`GroupMagnitudeSensitivity`: what each group's importances are divided by."""

        normalize: Normalize = "median"

    def __init__(self, normalize: Normalize = "median") -> None:
        super().__init__()
        self.options = self.Options.checked(self, normalize=normalize)
        self.normalize = self.options.normalize

    def get_sensitivity(self, search_records: list[SearchRecord]) -> None:
        """Set ``record.sensitivity`` for every record (see the class docs)."""
        assert self.model is not None and self.graph is not None, "setup_initialization was not called"
        for record in search_records:
            parts = []
            for piece in self.graph.param_slices(self.graph.group(record.group_id)):
                param = getattr(self.model.get_submodule(piece.module), piece.param, None)
                if isinstance(param, torch.Tensor):
                    parts.append(piece.per_channel(param.detach().double().pow(2), record.channels).cpu())
            importance = torch.stack(parts).mean(dim=0) if parts else torch.ones(record.channels, dtype=torch.float64)
            if self.normalize == "none":
                record.sensitivity = importance
                continue
            scale = float(importance.median() if self.normalize == "median" else importance.mean())
            record.sensitivity = importance / scale if scale > 0 else importance


def filter_norms(model: torch.nn.Module, graph: ChannelGraph, record: SearchRecord) -> torch.Tensor:
    """Per channel of a group: the L2 norm of its producers' filter rows (and biases), float64 on the CPU."""
    squares = torch.zeros(record.channels, dtype=torch.float64)
    for piece in graph.param_slices(graph.group(record.group_id)):
        if piece.module not in record.producers:
            continue
        param = getattr(model.get_submodule(piece.module), piece.param, None)
        if isinstance(param, torch.Tensor):
            squares += piece.per_channel(param.detach().double().pow(2), record.channels).cpu()
    return squares.sqrt()
