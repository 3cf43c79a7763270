"""The public call: ``auto_channel_prune_search``.

Data flows one way: config file -> settings; model + data -> channel graph; graph -> sensitivity (plugin) and
cost (gain plugin) -> search (plugin) -> decision -> channel-prune config and selection file.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acps_core import __version__
from acps_core._util.data import (
    check_calibration,
    is_reference_form,
    label_kind,
    model_device,
    primary_output,
    tensors_in,
    to_device,
)
from acps_core._util.distributed import Communicator, using
from acps_core._util.model_checks import check_weights, explain_in_place_failure
from acps_core._util.paths import check_paths
from acps_core._util.progress import stage
from acps_core._util.state import preserved_model_state
from acps_core._util.wrappers import unwrap, unwrapped_note
from acps_core.config.prune_config import load_override_config, validate_override_targets, write_prune_config
from acps_core.config.search_config import load_search_config
from acps_core.config.selection import (
    OUTPUT_SET_LINE,
    build_selection,
    format_selection,
    new_output_set,
    one_line,
    selection_path,
    weights_fingerprint,
)
from acps_core.config.settings import SearchSettings, resolve_layer
from acps_core.errors import ArgumentError, ConfigError, DataError, GraphError, PluginError, SearchError
from acps_core.graph.build import build_channel_graph
from acps_core.graph.model import ChannelGraph
from acps_core.graph.trace import trace_sample
from acps_core.graph.verify import verify_groups
from acps_core.methods.bases import GainEstimatorBase, SearchChannelBase, SensitivityBase
from acps_core.methods.registry import resolve_method
from acps_core.proto import retrain_config_pb2
from acps_core.prune.keep import largest_norm_channels
from acps_core.report.documents import render_reports, report_paths
from acps_core.report.figure import available as figure_available
from acps_core.report.figure import figure_path, render_figure
from acps_core.report.result import LayerReport, SearchResult
from acps_core.search.problem import (
    CostModel,
    Decision,
    GraphInfo,
    PruneSearchConfig,
    SearchRecord,
    allowed_kept_counts,
    kept_from_ratio,
    masks_to_decision,
)

logger = logging.getLogger(__name__)

#: The prune ratio the reference writes into the global ``prune_config`` (every layer it applies to is listed
#: elsewhere, so it never takes effect).
PLACEHOLDER_PRUNE_RATIO = 0.3


class PruneTargetWarning(UserWarning):
    """The compress ratio asked for cannot be reached within the constraints."""


def auto_channel_prune_search(model: nn.Module, config: str | Path, input_data: Any, output_cfg: str | Path,
                              sensitivity: str | SensitivityBase = "TaylorLossSensitivity",
                              search_alg: str | SearchChannelBase = "GreedySearch", *,
                              gain: str | GainEstimatorBase = "BitComplexity",
                              distributed: bool | None = None, figure: bool = False) -> SearchResult:
    """Search how many channels each layer keeps and write the decision as a channel-prune config.

    A drop-in replacement for AMCT's ``auto_channel_prune_search``: same arguments, same config files.

    Args:
        model: the trained ``torch.nn.Module``. It is left exactly as found (parameters, modes,
            ``requires_grad``, ``.grad``, hooks). A model wrapped in ``nn.DataParallel``,
            ``DistributedDataParallel`` or ``torch.compile`` is searched through the module inside, so the
            config names that module's layers.
        config: path of the search config (protobuf text format of ``AutoChannelPruneConfig``).
        input_data: ``[data, label]``: calibration inputs (a tensor, or a tuple of the forward's arguments) and
            labels, batch first, split into ``test_iteration`` passes along the batch; or any iterable of
            ``(data, label)`` batches (a DataLoader), of which the first ``test_iteration`` are the passes.
            Labels shaped like the output use the reference's L1 loss; integer class indices use cross-entropy.
        output_cfg: path of the channel-prune config to write. The chosen channels go beside it, in
            ``<output_cfg>.selection``, and a report of every layer's decision (or why it was left alone) in
            ``<output_cfg>.report.md`` and ``<output_cfg>.report.json`` (beside the path as given, also when it
            is a symbolic link). These files are written as one set: all old or all new, whatever happens
            (see the README's reliability section). None of them may be an input of the call.
        sensitivity: a method name (``acps plugins`` lists them) or a ``SensitivityBase`` instance.
        search_alg: a method name or a ``SearchChannelBase`` instance.
        gain: the cost model, a method name or a ``GainEstimatorBase`` instance. ``"BitComplexity"`` (the
            reference's cost) by default.
        distributed: with ``torch.distributed`` initialised, every rank must make this call with its shard of
            the calibration data (the default, ``None``); ``False`` runs a single-process search even inside a
            process group, for a call that only one rank makes (``if rank == 0: ...``).
        figure: also write the report's figure, ``<output_cfg>.report.png``, in the same set (needs matplotlib:
            ``pip install 'acps-core[report]'``). Without it, a figure an earlier search left there is removed,
            so that every file beside the config describes the same search.

    Returns:
        A :class:`~acps_core.result.SearchResult` describing the decision.

    Raises:
        ConfigError: the search config or its override file is invalid (file:line:column).
        DataError: ``input_data`` does not fit the model.
        GraphError: the model cannot be traced, or has no prunable layer.
        PluginError: a method name is unknown, or a plugin misbehaved.
        OutputPathError: ``output_cfg`` or a file beside it cannot be written, is one of the inputs (the
            search config, the override file), or another process keeps its folder locked.
        ArgumentError: an argument has the wrong type.
    """
    with using(Communicator(enabled=distributed is not False)) as comm:
        return _search(comm, model, config, input_data, output_cfg, sensitivity, search_alg, gain, figure)


def _search(comm: Communicator, model: Any, config: Any, input_data: Any, output_cfg: Any, sensitivity: Any,
            search_alg: Any, gain: Any, figure: bool) -> SearchResult:
    """The search itself (see :func:`auto_channel_prune_search`), every step agreed between the ranks."""
    checked = comm.run("checking the arguments", lambda: _check_arguments(
        model, config, input_data, output_cfg, sensitivity, search_alg, gain, figure, comm))
    (model, wrappers, settings, out_path, sensitivity_method, search_method, gain_method, override, calibration,
     device) = checked
    # The first batch's inputs trace the graph and its labels are checked against the output. Every rank traces
    # rank 0's first samples, as one process would trace the first samples of the union of the shards.
    data, label = calibration if is_reference_form(calibration) else calibration[0]
    sample = to_device(comm.broadcast(to_device(trace_sample(data), torch.device("cpu"))), device)
    traced = tensors_in(sample)[0].shape[0] if tensors_in(sample) and tensors_in(sample)[0].dim() else 0

    # acps's own methods never write to a parameter: with only them running, the parameters are checked, not
    # copied (a copy costs as much memory as the model); anyone else's code gets the full copy.
    own = all(_acps_own(method) for method in (sensitivity_method, search_method, gain_method))
    timings: dict[str, float] = {}
    loss_notes: list[str] = []  # how the default loss reads an output that is not one tensor
    started = time.perf_counter()
    with preserved_model_state(model, copy_parameters=not own) as state:
        model.eval()

        def prepare() -> tuple[Any, ...]:
            check_weights(model)  # a NaN weight would surface as a NaN loss, blaming the data
            # The first forward passes (tracing, the trial prunings) run watched: a forward pass that writes to the
            # model's own weights is named, and undone on the way out.
            with state.watching():
                graph = build_channel_graph(model, sample)
                verify_groups(model, graph, sample)
            state.check_parameters()
            if isinstance(graph.output, torch.Tensor) and (
                    graph.output.dim() == 0 or graph.output.shape[0] != traced):
                raise DataError(f"the model's output (shape {list(graph.output.shape)} on {traced} samples) has "
                                "no batch dimension first; acps needs a model whose output is batch-first, like "
                                "its input")
            scored, where = primary_output(graph.output)
            if scored is not None and sensitivity_method.uses_default_loss and sensitivity_method.loss_func is None:
                # The trace ran on two samples; compare against the output the whole batch would give.
                if scored.dim() == 0 or scored.shape[0] != traced:
                    raise DataError(f"the model's output ({where or 'a tensor'}, shape {list(scored.shape)} on "
                                    f"{traced} samples) has no batch dimension first; pass "
                                    "sensitivity=TaylorLossSensitivity(loss_func=...) with a loss that takes the "
                                    "model's output and the labels")
                label_kind(scored[:1].expand(label.shape[0], *scored.shape[1:]), label)
                if where is not None:
                    loss_notes.append(f"the model returns a {type(graph.output).__name__}; the default loss "
                                      f"compared {where} (shape {list(scored.shape[1:])} per sample) with the "
                                      "labels (pass loss_func to choose otherwise)")
            fixed, statuses, overrides = _fixed_groups(graph, override, settings)
            records = _search_records(graph, fixed, settings)
            if not records:
                _raise_empty_search_space(graph, override, settings)
            gain_method.model_device = device
            cost_model = CostModel(graph, gain_method, model, trace_sample(sample, 1))
            return graph, fixed, statuses, overrides, records, cost_model

        with stage("tracing the model and checking its channel groups"):
            graph, fixed, statuses, overrides, records, cost_model = comm.run("tracing the model", prepare)
        timings["tracing"] = time.perf_counter() - started
        budget = cost_model.full_cost / settings.compress_ratio
        graph_info = GraphInfo(graph, cost_model, fixed, budget)
        started = time.perf_counter()
        comm.run("scoring the channels", lambda: _score(sensitivity_method, model, graph, calibration, settings,
                                                       records))
        timings["scoring"] = time.perf_counter() - started
        averaged = _same_scores_everywhere(comm, records)
        for record in records:
            full = {**fixed}
            record.gain = torch.full((record.channels,),
                                     graph_info.saving(full, record.group_id, record.channels - 1))
        prune_config = PruneSearchConfig(settings.compress_ratio, settings.ascend_optimized,
                                         settings.max_prune_ratio)
        method_name = _method_name(search_alg)

        def search() -> Decision:
            try:
                masks = search_method.channel_prune_search(graph_info, records, prune_config)
            except (PluginError, SearchError):
                raise
            except Exception as exc:
                raise PluginError(f"search method {method_name} raised {type(exc).__name__}: {exc}") from exc
            return masks_to_decision(masks, records, method_name)

        started = time.perf_counter()
        with stage(f"searching ({method_name})"):
            decision = comm.run("searching", search)
        timings["searching"] = time.perf_counter() - started
        decision.keep = comm.broadcast(decision.keep)  # rank 0's decision, on every rank

    for group_id, count in fixed.items():
        if count < graph.group(group_id).channels and group_id not in decision.keep:
            decision.keep[group_id] = largest_norm_channels(model, graph.group(group_id), count)
    result = _result(graph, cost_model, decision, statuses, settings, out_path)
    _sensitivity_story(result, graph, graph_info, records, decision)
    result.methods = {"sensitivity": _method_name(sensitivity), "search": method_name, "gain": _method_name(gain),
                      "cost_unit": gain_method.unit}  # type: ignore[union-attr]
    result.notes = ([unwrapped_note(wrappers)] if wrappers else []) + loss_notes + list(
        getattr(sensitivity_method, "notes", []))
    if averaged:
        result.notes.append(f"the {comm.size} ranks gave different scores with {_method_name(sensitivity)}, "
                            "which does not combine them across ranks; their average was used")
    if not result.target_reached:
        smallest = graph_info.cost({r.group_id: r.allowed_kept[-1] for r in records})
        best_ratio = cost_model.full_cost / smallest if smallest > 0 else float("inf")
        if smallest <= budget * (1 + 1e-9):
            message = (f"compress_ratio {settings.compress_ratio:g} was not reached: search method {method_name} "
                       f"stopped at {result.achieved_ratio:.3f}x although the constraints allow up to "
                       f"{best_ratio:.3f}x")
        else:
            message = (f"compress_ratio {settings.compress_ratio:g} cannot be reached: at most {best_ratio:.3f}x "
                       f"is possible within max_prune_ratio {settings.max_prune_ratio:g}, ascend_optimized "
                       f"{str(settings.ascend_optimized).lower()} and the layers that cannot be pruned (the search "
                       f"got to {result.achieved_ratio:.3f}x); raise max_prune_ratio or lower compress_ratio")
        result.notes.append(message)
    result.output_set = new_output_set()
    # Every rank returns rank 0's result (a cost model that measures, like MeasuredLatency, differs by rank).
    result = comm.broadcast(result)
    if not result.target_reached:
        warnings.warn(result.notes[-1], PruneTargetWarning, stacklevel=3)
    # Only rank 0 writes; every rank learns whether that worked before returning the same result.
    started = time.perf_counter()
    with stage("writing the outputs"):
        comm.run("writing the outputs", lambda: _write(out_path, graph, decision, result, override, overrides,
                                                        settings, model, figure) if comm.rank == 0 else None)
    result.timings = {**timings, "writing": time.perf_counter() - started}
    return result


def _sensitivity_story(result: SearchResult, graph: ChannelGraph, graph_info: GraphInfo,
                       records: list[SearchRecord], decision: Decision) -> None:
    """Fill in what the report tells about the sensitivities: each layer's kept share, each channel's score over
    its group's mean, and the path to the decision (see :attr:`SearchResult.path`)."""
    del graph  # the records and the decision say everything needed
    kept_counts = decision.kept_counts()
    total = sum(float(torch.as_tensor(r.sensitivity).sum()) for r in records) or 1.0
    chains: dict[int, list[int]] = {}  # group -> the counts it passes through, largest first
    by_id = {r.group_id: r for r in records}
    for record in records:
        scores = torch.as_tensor(record.sensitivity, dtype=torch.float64)
        kept = set(decision.keep.get(record.group_id, range(record.channels)))
        group_total = float(scores.sum())
        share = float(scores[sorted(kept)].sum()) / group_total if group_total > 0 else 1.0
        for producer in record.producers:
            result.layers[producer].sensitivity_kept = share
        mean = float(scores.mean()) or 1.0
        result.scores[record.name] = [(float(v) / mean, c in kept) for c, v in enumerate(scores.tolist())]
        final = kept_counts.get(record.group_id, record.channels)
        counts = [c for c in record.allowed_kept if final <= c <= record.channels]
        if len(counts) > 1:  # at most 8 steps a group: the path is a picture, not the search itself
            stride = max(1, (len(counts) - 1) // 8)
            chains[record.group_id] = sorted(set(counts[::stride]) | {counts[-1]}, reverse=True)
    state, lost = dict(graph_info.fixed_kept), 0.0
    full_cost = graph_info.cost_model.full_cost
    result.path = [(1.0, 0.0)]
    position = {g: 0 for g in chains}
    while True:
        best: tuple[float, int] | None = None
        for group_id, chain in chains.items():
            if position[group_id] + 1 >= len(chain):
                continue
            upper, lower = chain[position[group_id]], chain[position[group_id] + 1]
            record = by_id[group_id]
            saved = graph_info.saving(state, group_id, lower)
            density = (record.lost(lower) - record.lost(upper)) / saved if saved > 0 else math.inf
            if best is None or density < best[0]:
                best = (density, group_id)
        if best is None:
            break
        group_id = best[1]
        chain, record = chains[group_id], by_id[group_id]
        upper, lower = chain[position[group_id]], chain[position[group_id] + 1]
        position[group_id] += 1
        state[group_id] = lower
        lost += record.lost(lower) - record.lost(upper)
        result.path.append((graph_info.cost(state) / full_cost, lost / total))


_OWN_PACKAGES = ("acps_core", "acps_sensitivity_taylor", "acps_search_greedy", "acps_search_knapsack",
                 "acps_gain_ascend")


def _acps_own(method: Any) -> bool:
    """Whether ``method`` is one of acps's own classes (not a subclass defined elsewhere)."""
    return type(method).__module__.split(".")[0] in _OWN_PACKAGES


def _check_arguments(model: Any, config: Any, input_data: Any, output_cfg: Any, sensitivity: Any,
                     search_alg: Any, gain: Any, figure: Any, comm: Communicator) -> tuple[Any, ...]:
    """Check the call's arguments; returns (the model without its wrappers, the wrappers' names, settings, output
    path as given (absolute), the three methods, the override config, the calibration data on the model's
    device, the model's device)."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, wrappers = unwrap(model)
    if not isinstance(figure, bool):
        raise ArgumentError(f"figure must be True or False, got {figure!r}")
    if figure and not figure_available():
        raise ArgumentError("figure=True needs matplotlib: pip install 'acps-core[report]' (or leave figure out)")
    if isinstance(model, (torch.jit.ScriptModule,)):
        raise ArgumentError("model is a TorchScript module; pass the original nn.Module (scripted and traced "
                            "modules cannot be pruned)")
    for parameter, value in (("config", config), ("output_cfg", output_cfg)):
        if not isinstance(value, (str, Path)):
            raise ArgumentError(f"{parameter} must be a file path (str or pathlib.Path), got {type(value).__name__}")
    settings = load_search_config(config)
    # Side files go beside the path as given: for a symbolic link, beside the link (where they are read again).
    out_path = Path(output_cfg).absolute()
    if comm.rank == 0:  # only rank 0 writes
        inputs = [("config", config), ("override_prune_cfg in the search config", settings.override_prune_cfg)]
        check_paths(reads=inputs, writes=_output_roles(out_path, figure))
    sensitivity_method = resolve_method("sensitivity", sensitivity, "sensitivity")
    search_method = resolve_method("search", search_alg, "search_alg")
    gain_method = resolve_method("gain", gain, "gain")
    override = load_override_config(settings.override_prune_cfg) if settings.override_prune_cfg else None
    device = model_device(model)
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    calibration = check_calibration(input_data, settings.test_iteration, device,
                                    floating.pop() if len(floating) == 1 else None)
    return (model, wrappers, settings, out_path, sensitivity_method, search_method, gain_method, override,
            calibration, device)


def _output_roles(out_path: Path, figure: bool) -> list[tuple[str, Path]]:
    """Every file a search writes (or, for the figure without ``figure``, removes), with the role named in
    errors."""
    markdown, json_report = report_paths(out_path)
    return [("output_cfg", out_path), ("output_cfg's selection file", selection_path(out_path)),
            ("output_cfg's Markdown report", markdown), ("output_cfg's JSON report", json_report),
            ("output_cfg's figure" if figure else "output_cfg's figure (removed, as figure=False)",
             figure_path(out_path))]


def _same_scores_everywhere(comm: Communicator, records: list[SearchRecord]) -> bool:
    """Make every rank's scores the same: methods that combine their statistics across ranks (every built-in
    method does) give identical scores; others (a plugin's own) are averaged. Returns whether any had to be
    averaged."""
    if not comm.distributed:
        return False
    averaged = False
    for record in records:
        scores = torch.as_tensor(record.sensitivity, dtype=torch.float64)
        if not comm.same_everywhere(scores):
            record.sensitivity = comm.sum(scores) / comm.size
            averaged = True
    return averaged


def _method_name(value: Any) -> str:
    return value if isinstance(value, str) else type(value).__name__


def _fixed_groups(graph: ChannelGraph, override: Any, settings: SearchSettings
                  ) -> tuple[dict[int, int], dict[int, str], dict[int, tuple[float, bool]]]:
    """Kept counts of the groups the search must not change, each group's status, and the user's
    ``(prune_ratio, ascend_optimized)`` for the groups an override fixes.

    Unprunable groups keep everything. A group with a skipped producer (or skipped depthwise follower) keeps
    everything; a group whose producers the user overrode keeps what the override says.
    """
    fixed: dict[int, int] = {}
    statuses: dict[int, str] = {}
    user_settings: dict[int, tuple[float, bool]] = {}
    if override is not None:
        layers = {name: (info.kind, _override_blocker(graph, name)) for name, info in graph.layers.items()}
        validate_override_targets(override, str(settings.override_prune_cfg), layers)
    for group in graph.groups:
        if not group.prunable:
            fixed[group.id], statuses[group.id] = group.channels, "unprunable"
            continue
        if override is None:
            statuses[group.id] = "searched"
            continue
        members = group.producers + [u.layer for u in group.followers if u.layer in graph.layers]
        decisions = {name: resolve_layer(override, name, graph.module_type(name)) for name in members}
        if any(d.source == "skip" for d in decisions.values()):
            fixed[group.id], statuses[group.id] = group.channels, "skip"
            continue
        overrides = {name: d for name, d in decisions.items() if d.source in ("override_layer", "override_type")}
        if not overrides:
            statuses[group.id] = "searched"
            continue
        given = {name: (d.prune_ratio or 0.0, settings.ascend_optimized if d.ascend_optimized is None
                        else d.ascend_optimized) for name, d in overrides.items()}
        counts = {name: kept_from_ratio(group.channels, *setting, group.atom) for name, setting in given.items()}
        if len(set(counts.values())) > 1:
            raise ConfigError(f"layers {', '.join(overrides)} share their output channels (they are pruned as "
                              f"one group) but their overrides keep different counts ({counts}); give them the "
                              "same prune_ratio and ascend_optimized", path=str(settings.override_prune_cfg))
        fixed[group.id] = next(iter(counts.values()))
        user_settings[group.id] = next(iter(given.values()))
        statuses[group.id] = "override"
    return fixed, statuses, user_settings


def _override_blocker(graph: ChannelGraph, name: str) -> str | None:
    """Why an override entry cannot set this layer's own prune ratio (None when it can)."""
    layer = graph.layers[name]
    if layer.reason is not None:
        return layer.reason
    if layer.out_group is None:
        return "not a producer of prunable channels"
    group = graph.group(layer.out_group)
    if name not in group.producers:
        return f"its output channels follow its input (group {group.name}); set the override on {group.name}"
    return None


def _search_records(graph: ChannelGraph, fixed: dict[int, int], settings: SearchSettings) -> list[SearchRecord]:
    records = []
    for group in graph.groups:
        if group.id in fixed:
            continue
        allowed = allowed_kept_counts(group.channels, settings.ascend_optimized, settings.max_prune_ratio,
                                      group.atom)
        if len(allowed) < 2:
            continue  # nothing to choose: too few channels for one step
        records.append(SearchRecord(
            group_id=group.id, name=group.name, producers=list(group.producers),
            followers=[u.layer for u in group.followers], consumers=[u.layer for u in group.consumers],
            channels=group.channels, allowed_kept=allowed, unit=group.unit, blocks=group.blocks,
            aligned=group.aligned))
    return records


def _raise_empty_search_space(graph: ChannelGraph, override: Any, settings: SearchSettings) -> None:
    prunable = graph.prunable_groups
    if not prunable:
        reasons = "; ".join(f"{name}: {why}" for name, why in list(graph.explain().items())[:8])
        raise GraphError("the model has no prunable channel group, so there is nothing to search: " + reasons)
    if override is not None:
        raise ConfigError("the search space is empty: every prunable layer is skipped or overridden by "
                          f"override_prune_cfg {settings.override_prune_cfg}; leave some layers to the search",
                          path=str(settings.source) if settings.source else None)
    step = 16 if settings.ascend_optimized else 1
    raise ConfigError(f"the search space is empty: with ascend_optimized {str(settings.ascend_optimized).lower()} "
                      f"and max_prune_ratio {settings.max_prune_ratio:g} no prunable group can lose a step of "
                      f"{step} channels (groups: "
                      + ", ".join(f"{g.name} ({g.channels} channels)" for g in prunable[:8])
                      + "); set ascend_optimized: false or raise max_prune_ratio",
                      path=str(settings.source) if settings.source else None)


def _score(method: SensitivityBase, model: nn.Module, graph: ChannelGraph, input_data: list[Any],
           settings: SearchSettings, records: list[SearchRecord]) -> None:
    """Run the sensitivity method and check what it attached to each record."""
    name = type(method).__name__
    try:
        method.setup_initialization((model, graph), input_data, settings.test_iteration,
                                    output_nodes=graph.output_layers)
        returned = method.get_sensitivity(records)
    except (PluginError, SearchError) as exc:
        raise exc
    except Exception as exc:
        from acps_core.errors import AcpsError

        if isinstance(exc, AcpsError):
            raise
        # An in-place operation in the model's forward pass fails in the method's backward pass: the model's
        # fault when a plain forward and backward pass on the first samples fails the same way.
        data = input_data[0] if is_reference_form(input_data) else input_data[0][0]
        in_place = explain_in_place_failure(model, trace_sample(data), exc)
        if in_place is not None:
            raise in_place from exc
        raise PluginError(f"sensitivity method {name} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(returned, dict):
        for record in records:
            if record.name in returned:
                record.sensitivity = returned[record.name]
    for record in records:
        scores = record.sensitivity
        if scores is None:
            raise PluginError(f"sensitivity method {name} set no score for group {record.name}; get_sensitivity "
                              "must set record.sensitivity on every record")
        scores = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
        if scores.numel() != record.channels:
            raise PluginError(f"sensitivity method {name} gave {scores.numel()} scores for group {record.name}, "
                              f"which has {record.channels} channels")
        if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
            raise PluginError(f"sensitivity method {name} gave NaN, infinite or negative scores for group "
                              f"{record.name}; scores must be finite and >= 0")
        record.sensitivity = scores


def _result(graph: ChannelGraph, cost_model: CostModel, decision: Decision, statuses: dict[int, str],
            settings: SearchSettings, out_path: Path) -> SearchResult:
    kept = decision.kept_counts()
    layers = {}
    for name, layer in graph.layers.items():
        if layer.geometry is None:
            module_kind = layer.kind
            layers[name] = LayerReport(name, module_kind, 0, 0, None, "unprunable", layer.reason, 0.0, 0.0)
            continue
        total = layer.geometry.out_channels
        _, cout = graph.channel_counts(layer, kept)
        group = graph.group(layer.out_group) if layer.out_group is not None else None
        status = statuses.get(layer.out_group, "unprunable") if layer.out_group is not None else "unprunable"
        reason = layer.reason if status == "unprunable" else None
        if status == "unprunable" and reason is None:
            reason = "its output channels come from no prunable layer"
        layers[name] = LayerReport(name, layer.kind, total, cout, group.name if group else None, status, reason,
                                   cost_model.layer_cost(layer, {}), cost_model.layer_cost(layer, kept))
    cost_after = cost_model.cost(kept)
    budget = cost_model.full_cost / settings.compress_ratio
    return SearchResult(
        layers=layers, cost_before=cost_model.full_cost, cost_after=cost_after,
        cost_unit=cost_model.estimator.unit, compress_ratio=settings.compress_ratio,
        target_reached=cost_after <= budget * (1 + 1e-9),
        kept_channels={graph.group(g).name: idx for g, idx in decision.keep.items()},
        output_cfg=out_path, selection_file=selection_path(out_path))


def _write(out_path: Path, graph: ChannelGraph, decision: Decision, result: SearchResult, override: Any,
           overrides: dict[int, tuple[float, bool]], settings: SearchSettings, model: nn.Module,
           figure: bool) -> None:
    """Write the channel-prune config the reference would write, with the selection file, the reports and (with
    ``figure``) the figure beside it, as one set."""
    cfg = retrain_config_pb2.AMCTRetrainConfig()
    if override is not None:
        cfg.CopyFrom(override)  # the user's skip and override entries are copied through
    named = {entry.layer_name for entry in cfg.override_layer_configs}
    skipped = set(cfg.skip_layers) | set(cfg.regular_prune_skip_layers)
    # Every Conv/Linear layer the user did not name gets an entry of its own, so the placeholder global ratio
    # below applies to none, and the co-producers of a group the user overrode get the user's exact setting.
    for name, layer in graph.layers.items():
        if name in named or name in skipped:
            continue
        report = result.layers[name]
        user_setting = overrides.get(layer.out_group) if layer.out_group is not None else None
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

    selection = selection_path(out_path)
    header = (f"# Written by acps {__version__} auto_channel_prune_search: target {settings.compress_ratio:g}x, "
              f"achieved {result.achieved_ratio:.4f}x ({result.cost_unit}).\n"
              f"# The channels the search chose are in {one_line(selection.name)} beside this file.\n"
              f"{OUTPUT_SET_LINE}{result.output_set}\n")
    selection_text = format_selection(build_selection(graph, decision.keep), out_path.name, result.output_set,
                                      weights_fingerprint(model))
    used = {**settings.model_dump(), "methods": dict(result.methods)}
    reports = render_reports(result, used, graph=graph)
    extra: dict[str | os.PathLike[str], str | bytes | None] = {selection: selection_text}
    for path, text in reports.items():
        extra[path] = text
    # The figure of an earlier search would describe another decision: it is replaced, or removed.
    extra[figure_path(out_path)] = render_figure(result) if figure else None

    write_prune_config(out_path, cfg, extra=extra, header=header)
    logger.info("wrote %s and %s", out_path, selection)
    if not math.isfinite(result.achieved_ratio):
        logger.warning("the pruned model's cost is 0 %s", result.cost_unit)
