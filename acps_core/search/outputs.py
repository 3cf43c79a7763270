"""What a search hands back and writes: the :class:`~acps_core.report.result.SearchResult`, and the channel-prune
config with its selection file, reports and figure, written as one set."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from torch import nn

from acps_core._version import __version__
from acps_core.config.prune_config import write_prune_config
from acps_core.config.selection import (
    OUTPUT_SET_LINE,
    build_selection,
    format_selection,
    one_line,
    selection_path,
    weights_fingerprint,
)
from acps_core.config.settings import AMCTRetrainConfig, SearchSettings
from acps_core.graph.model import ChannelGraph
from acps_core.report.documents import render_reports
from acps_core.report.figure import figure_path, render_figure
from acps_core.report.result import LayerReport, SearchResult
from acps_core.search.overrides import FixedGroups
from acps_core.search.problem import CostModel, Decision, GraphInfo, SearchRecord

logger = logging.getLogger(__name__)

#: The prune ratio the reference writes into the global ``prune_config`` (every layer it applies to is listed
#: elsewhere, so it never takes effect).
PLACEHOLDER_PRUNE_RATIO = 0.3


def build_result(graph: ChannelGraph, cost_model: CostModel, decision: Decision, fixed: FixedGroups,
                 settings: SearchSettings, out_path: Path) -> SearchResult:
    """The result of a search: every layer's decision and costs, the totals and the kept channels."""
    kept = decision.kept_counts()
    layers = {}
    for name, layer in graph.layers.items():
        if layer.geometry is None:
            layers[name] = LayerReport(name, layer.kind, 0, 0, None, "unprunable", layer.reason, 0.0, 0.0)
            continue
        _, cout = graph.channel_counts(layer, kept)
        group = graph.group(layer.out_group) if layer.out_group is not None else None
        status = fixed.statuses.get(group.id, "unprunable") if group is not None else "unprunable"
        reason = layer.reason if status == "unprunable" else None
        if status == "unprunable" and reason is None:
            reason = "its output channels come from no prunable layer"
        layers[name] = LayerReport(name, layer.kind, layer.geometry.out_channels, cout,
                                   group.name if group else None, status, reason,
                                   cost_model.layer_cost(layer, {}), cost_model.layer_cost(layer, kept))
    cost_after = cost_model.cost(kept)
    budget = cost_model.full_cost / settings.compress_ratio
    return SearchResult(
        layers=layers, cost_before=cost_model.full_cost, cost_after=cost_after,
        cost_unit=cost_model.estimator.unit, compress_ratio=settings.compress_ratio,
        target_reached=cost_after <= budget * (1 + 1e-9),
        kept_channels={graph.group(g).name: idx for g, idx in decision.keep.items()},
        output_cfg=out_path, selection_file=selection_path(out_path))


def target_note(result: SearchResult, graph_info: GraphInfo, records: list[SearchRecord],
                settings: SearchSettings, method: str) -> str:
    """Why a search missed its target: its method stopped early, or the constraints allow no more."""
    full_cost = graph_info.cost_model.full_cost
    smallest = graph_info.cost({r.group_id: r.allowed_kept[-1] for r in records})
    best_ratio = full_cost / smallest if smallest > 0 else float("inf")
    if smallest <= graph_info.budget * (1 + 1e-9):
        return (f"compress_ratio {settings.compress_ratio:g} was not reached: search method {method} stopped at "
                f"{result.achieved_ratio:.3f}x although the constraints allow up to {best_ratio:.3f}x")
    share = graph_info.cost_model.prunable_share
    if share < 1 - 1 / settings.compress_ratio:
        return (f"compress_ratio {settings.compress_ratio:g} cannot be reached: only {share:.1%} of the model's cost "
                f"is in layers acps can prune (the rest is in layers the report lists with their reasons, and in "
                f"computations no pruning changes), so even removing all of it would give "
                f"{1 / max(1 - share, 1e-12):.3f}x; the search got to {result.achieved_ratio:.3f}x")
    return (f"compress_ratio {settings.compress_ratio:g} cannot be reached: at most {best_ratio:.3f}x is possible "
            f"within max_prune_ratio {settings.max_prune_ratio:g}, ascend_optimized "
            f"{str(settings.ascend_optimized).lower()} and the layers that cannot be pruned ({share:.1%} of the "
            f"cost is in layers acps can prune; the search got to {result.achieved_ratio:.3f}x); raise "
            "max_prune_ratio or lower compress_ratio")


def searched_config(graph: ChannelGraph, result: SearchResult, override: AMCTRetrainConfig | None,
                    fixed: FixedGroups, settings: SearchSettings) -> AMCTRetrainConfig:
    """The channel-prune config the reference would write for the decision.

    The user's skip and override entries are copied through; every other Conv/Linear layer gets an entry of its
    own, so the placeholder global ratio applies to none, and the co-producers of a group the user overrode get
    the user's exact setting.
    """
    cfg = AMCTRetrainConfig()
    if override is not None:
        cfg.CopyFrom(override)
    named = {entry.layer_name for entry in cfg.override_layer_configs}
    skipped = set(cfg.skip_layers) | set(cfg.regular_prune_skip_layers)
    for name, layer in graph.layers.items():
        if name in named or name in skipped:
            continue
        report = result.layers[name]
        user_setting = fixed.settings.get(layer.out_group) if layer.out_group is not None else None
        if report.status == "override" and user_setting is not None and report.kept < report.total:
            ratio, aligned = user_setting
        elif report.status != "skip" and report.kept < report.total:
            ratio, aligned = 1.0 - report.kept / report.total, settings.ascend_optimized
        else:
            cfg.regular_prune_skip_layers.append(name)
            continue
        algo = cfg.override_layer_configs.add(layer_name=name).prune_config.filter_pruner
        algo.balanced_l2_norm_filter_prune.prune_ratio = ratio
        algo.balanced_l2_norm_filter_prune.ascend_optimized = aligned
    global_algo = cfg.prune_config.filter_pruner.balanced_l2_norm_filter_prune
    global_algo.prune_ratio = PLACEHOLDER_PRUNE_RATIO
    global_algo.ascend_optimized = settings.ascend_optimized
    return cfg


def write_outputs(out_path: Path, cfg: AMCTRetrainConfig, graph: ChannelGraph, decision: Decision,
                  result: SearchResult, settings: SearchSettings, model: nn.Module, figure: bool) -> None:
    """Write the channel-prune config with the selection file, the reports and (with ``figure``) the figure beside
    it, as one set: all old or all new."""
    selection = selection_path(out_path)
    header = (f"# Written by acps {__version__} auto_channel_prune_search: target {settings.compress_ratio:g}x, "
              f"achieved {result.achieved_ratio:.4f}x ({result.cost_unit}).\n"
              f"# The channels the search chose are in {one_line(selection.name)} beside this file.\n"
              f"{OUTPUT_SET_LINE}{result.output_set}\n")
    selection_text = format_selection(build_selection(graph, decision.keep), out_path.name, result.output_set,
                                      weights_fingerprint(model))
    used = {**settings.model_dump(), "methods": dict(result.methods), "method_options": dict(result.method_options)}
    extra: dict[str | os.PathLike[str], str | bytes | None] = {selection: selection_text}
    for path, text in render_reports(result, used, graph=graph).items():
        extra[path] = text
    # The figure of an earlier search would describe another decision: it is replaced, or removed.
    extra[figure_path(out_path)] = render_figure(result) if figure else None
    write_prune_config(out_path, cfg, extra=extra, header=header)
    logger.info("wrote %s and %s", out_path, selection)
    if not math.isfinite(result.achieved_ratio):
        logger.warning("the pruned model's cost is 0 %s", result.cost_unit)
