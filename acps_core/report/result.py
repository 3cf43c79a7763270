"""What a search returns: per-layer decisions, cost before and after, and the ratio achieved."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LayerReport:
    """The decision for one Conv/Linear layer.

    Attributes:
        name: the layer's name in ``model.named_modules()``.
        kind: its class name.
        total: output channels before pruning.
        kept: output channels after pruning.
        group: name of the channel group its output channels belong to (None if not in any).
        status: ``"searched"`` (decided by the search), ``"override"`` (fixed by the user's override config),
            ``"skip"`` (skipped by the user), or ``"unprunable"``.
        reason: why the layer was left alone, for ``"unprunable"`` layers.
        cost_before: the layer's cost in the unpruned model.
        cost_after: its cost after pruning.
        sensitivity_kept: the share of its group's sensitivity the kept channels hold (1.0 when nothing was
            removed; None for layers the search did not score).
    """

    name: str
    kind: str
    total: int
    kept: int
    group: str | None
    status: str
    reason: str | None
    cost_before: float
    cost_after: float
    sensitivity_kept: float | None = None

    @property
    def prune_ratio(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


@dataclass
class SearchResult:
    """The outcome of :func:`acps_core.auto_channel_prune_search`. The config file is the product; this object
    describes it for the caller, who may ignore it.

    Attributes:
        layers: every Conv/Linear layer, by name.
        cost_before: model cost before pruning, in ``cost_unit``.
        cost_after: model cost after pruning.
        compress_ratio: the target (cost before / cost after) from the config.
        target_reached: whether ``cost_after <= cost_before / compress_ratio``.
        kept_channels: for each group that loses channels (by group name), the indices it keeps.
        methods: the sensitivity, search and gain methods used, by kind, each as the spec that selects it again
            with the same options (``"GroupTaylorSensitivity(seed=0, normalize='mean', terms='dense')"``; the bare
            name for a method without options, see :func:`acps_core.methods.options.describe_method`).
        notes: remarks the methods made (fallbacks taken, targets missed).
        output_cfg: the channel-prune config written.
        selection_file: the file beside it holding the chosen channels.
        path: the way to the decision, cheapest cuts first: ``(cost / cost before, lost sensitivity share)``
            after each step, from ``(1, 0)`` to the decision (the accuracy proxy against the cost).
        scores: per searched group (by name), each channel's sensitivity over the group's mean and whether it
            was kept, for the report's figure.
        timings: seconds the stages took: ``tracing`` (checks, tracing, the execution check, the cost model),
            ``scoring``, ``searching``, ``writing``.
        output_set: the id written into the config, its selection file and the reports, which says they were
            written together (``# acps output set: ...``).
        prunable_share: the share of the cost before in layers that touch a prunable channel group (what pruning
            can act on; the rest is in layers left alone and in computations pruning does not change).
        method_options: the options of each method, by kind, as JSON-ready dicts (``{}`` for a method that takes
            none; None where they are not known: an object of a class that declares no Options model).
    """

    layers: dict[str, LayerReport]
    cost_before: float
    cost_after: float
    cost_unit: str
    compress_ratio: float
    target_reached: bool
    kept_channels: dict[str, list[int]] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    output_cfg: Path | None = None
    selection_file: Path | None = None
    path: list[tuple[float, float]] = field(default_factory=list)
    scores: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    output_set: str | None = None
    method_options: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    prunable_share: float | None = None

    @property
    def achieved_ratio(self) -> float:
        """Cost before / cost after."""
        return self.cost_before / self.cost_after if self.cost_after > 0 else float("inf")

    def summary(self) -> str:
        """A plain-text table of the per-layer decisions and the totals."""
        rows = [("layer", "type", "kept/total", "pruned", "status")]
        for layer in self.layers.values():
            status = layer.status if layer.reason is None else f"{layer.status}: {layer.reason}"
            rows.append((layer.name, layer.kind, f"{layer.kept}/{layer.total}", f"{layer.prune_ratio:.0%}", status))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append("")
        lines.append(f"cost before: {self.cost_before:.4g} {self.cost_unit}   after: {self.cost_after:.4g} "
                     f"{self.cost_unit}   achieved ratio: {self.achieved_ratio:.3f}x (target "
                     f"{self.compress_ratio:g}x{'' if self.target_reached else ', NOT reached'})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
