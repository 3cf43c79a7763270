"""The public call, ``auto_channel_prune_search``: from a model, a config and calibration data to a written
channel-prune config.

Data flows one way: config file -> settings (:mod:`~acps_core.search.arguments`); model + data -> channel graph
(:mod:`acps_core.graph`); graph -> sensitivity (:mod:`~acps_core.search.scoring`) and cost (the gain method) ->
search -> decision -> the channel-prune config, its selection file and reports (:mod:`~acps_core.search.outputs`).
Every step runs on every rank of a distributed search and is agreed between them.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acps_core._util.data import is_reference_form, label_kind, primary_output, to_device
from acps_core._util.distributed import Communicator, using
from acps_core._util.model_checks import check_weights
from acps_core._util.progress import stage
from acps_core._util.state import preserved_model_state
from acps_core._util.tensors import tensors_in
from acps_core._util.wrappers import unwrapped_note
from acps_core.config.selection import new_output_set
from acps_core.errors import AcpsError, DataError, PluginError
from acps_core.graph.build import build_channel_graph
from acps_core.graph.masking import approximated_groups
from acps_core.graph.trace import trace_sample
from acps_core.graph.verify import verify_groups
from acps_core.methods.bases import GainEstimatorBase, SearchChannelBase, SensitivityBase
from acps_core.methods.options import describe_method
from acps_core.prune.keep import largest_norm_channels
from acps_core.prune.model_config import config_roles, fit_hidden_to_heads
from acps_core.report.result import SearchResult
from acps_core.report.story import sensitivity_story
from acps_core.search.aiming import TOLERANCE, Aimed, aim_by_measurement
from acps_core.search.arguments import Call, check_arguments, is_acps_own
from acps_core.search.outputs import (
    PLACEHOLDER_PRUNE_RATIO,
    build_result,
    searched_config,
    target_note,
    write_outputs,
)
from acps_core.search.overrides import empty_search_space, fixed_groups, search_records
from acps_core.search.problem import CostModel, Decision, GraphInfo, PruneSearchConfig, masks_to_decision
from acps_core.search.scoring import same_scores_everywhere, score
from acps_core.search.ties import Ties, repeated_blocks, tie_records, untie_decision

logger = logging.getLogger(__name__)

__all__ = ["PLACEHOLDER_PRUNE_RATIO", "PruneTargetWarning", "auto_channel_prune_search"]


class PruneTargetWarning(UserWarning):
    """The compress ratio asked for cannot be reached within the constraints."""


def auto_channel_prune_search(model: nn.Module, config: str | Path, input_data: Any, output_cfg: str | Path,
                              sensitivity: str | SensitivityBase = "TaylorLossSensitivity",
                              search_alg: str | SearchChannelBase = "GreedySearch", *,
                              gain: str | GainEstimatorBase = "BitComplexity",
                              distributed: bool | None = None, figure: bool = False,
                              uniform_widths: bool = False) -> SearchResult:
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
            (see docs/reliability.md). None of them may be an input of the call.
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
        uniform_widths: keep the widths of repeated blocks uniform: groups that play the same part in every block
            of a stack (``model.layers.3.mlp.gate_proj`` and ``model.layers.7.mlp.gate_proj``: the same name but
            for the block index, the same channels) keep the same count, each its own best channels. A Hugging
            Face model searched this way can be saved with ``save_pretrained`` (its config holds one width for
            all layers). See :mod:`acps_core.search.ties`.

    Returns:
        A :class:`~acps_core.report.result.SearchResult` describing the decision.

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
        return _search(comm, model, config, input_data, output_cfg, sensitivity, search_alg, gain, figure,
                       uniform_widths)


def _search(comm: Communicator, model: Any, config: Any, input_data: Any, output_cfg: Any, sensitivity: Any,
            search_alg: Any, gain: Any, figure: bool, uniform_widths: bool) -> SearchResult:
    """The search itself (see :func:`auto_channel_prune_search`), every step agreed between the ranks."""
    call = comm.run("checking the arguments", lambda: check_arguments(
        model, config, input_data, output_cfg, sensitivity, search_alg, gain, (figure, uniform_widths), comm))
    model, settings = call.model, call.settings
    # The first batch's inputs trace the graph and its labels are checked against the output. Every rank traces
    # rank 0's first samples, as one process would trace the first samples of the union of the shards.
    data, label = call.calibration if is_reference_form(call.calibration) else call.calibration[0]
    sample = to_device(comm.broadcast(to_device(trace_sample(data), torch.device("cpu"))), call.device)
    traced = tensors_in(sample)[0].shape[0] if tensors_in(sample) and tensors_in(sample)[0].dim() else 0

    # acps's own methods never write to a parameter: with only them running, the parameters are checked, not
    # copied (a copy costs as much memory as the model); anyone else's code gets the full copy.
    own = all(is_acps_own(method) for method in (call.sensitivity, call.search, call.gain))
    timings: dict[str, float] = {}
    loss_notes: list[str] = []  # how the default loss reads an output that is not one tensor
    search_name = describe_method(call.search).name
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
            loss_notes.extend(_check_output(graph.output, traced, label, call))
            fixed = fixed_groups(graph, call.override, settings)
            records = search_records(graph, fixed, settings)
            if not records:
                raise empty_search_space(graph, call.override, settings)
            call.gain.model_device = call.device
            cost_model = CostModel(graph, call.gain, model, trace_sample(sample, 1))
            return graph, fixed, records, cost_model

        with stage("tracing the model and checking its channel groups"):
            graph, fixed, records, cost_model = comm.run("tracing the model", prepare)
        timings["tracing"] = time.perf_counter() - started
        budget = cost_model.full_cost / settings.compress_ratio
        started = time.perf_counter()
        comm.run("scoring the channels", lambda: score(call.sensitivity, model, graph, call.calibration,
                                                      settings.test_iteration, records))
        timings["scoring"] = time.perf_counter() - started
        averaged = same_scores_everywhere(comm, records)
        # What the search method sees: with uniform widths, one record for each set of tied groups.
        searched, ties = (tie_records(records, repeated_blocks(model), config_roles(model, graph))
                          if call.uniform_widths else (records, Ties()))
        graph_info = GraphInfo(graph, cost_model, fixed.kept, budget, ties)
        for record in searched:
            record.gain = torch.full((record.channels,), graph_info.saving({}, record.group_id, record.channels - 1))
        prune_config = PruneSearchConfig(settings.compress_ratio, settings.ascend_optimized,
                                         settings.max_prune_ratio)

        def search() -> Decision:
            try:
                masks = call.search.channel_prune_search(graph_info, searched, prune_config)
            except AcpsError:
                raise
            except Exception as exc:
                raise PluginError(f"search method {search_name} raised {type(exc).__name__}: {exc}") from exc
            return untie_decision(masks_to_decision(masks, searched, search_name), ties, records)

        def completed(choice: Decision) -> dict[int, list[int]]:
            """The choice with the groups the search did not decide (overrides, skips) filled in."""
            filled = {group_id: largest_norm_channels(model, graph.group(group_id), count)
                      for group_id, count in fixed.kept.items()
                      if count < graph.group(group_id).channels and group_id not in choice.keep}
            return {**filled, **choice.keep}

        def aimed_search() -> tuple[Decision, Aimed | None]:
            first = search()

            def search_at(ratio: float) -> Decision:
                graph_info.budget = cost_model.full_cost / ratio
                return search()

            try:
                aimed = aim_by_measurement(
                    model, graph, trace_sample(sample, 1), call.gain, settings.compress_ratio, first, completed,
                    lambda choice: cost_model.full_cost / cost_model.cost(
                        {**fixed.kept, **choice.kept_counts()}), search_at)
            finally:
                graph_info.budget = budget
            return (first, None) if aimed is None else (aimed.decision, aimed)

        started = time.perf_counter()
        with stage(f"searching ({search_name})"):
            decision, aimed = comm.run("searching", aimed_search)
        timings["searching"] = time.perf_counter() - started
        decision.keep = comm.broadcast(completed(decision))  # rank 0's decision, on every rank
    # With every group's count known (the overridden ones too), the hidden width fits the heads kept.
    fitted = fit_hidden_to_heads(model, graph, records, decision.keep) if ties.sets else None
    result = build_result(graph, cost_model, decision, fixed, settings, call.out_path)
    result.prunable_share = cost_model.prunable_share
    aimed = comm.broadcast(aimed)
    if aimed is not None:  # the totals say what was measured, the note what was predicted
        result.cost_after = result.cost_before / aimed.measured
        result.target_reached = aimed.measured >= settings.compress_ratio * (1 - TOLERANCE)
    sensitivity_story(result, GraphInfo(graph, cost_model, fixed.kept, budget), records, decision)
    used_methods = [describe_method(method) for method in (call.sensitivity, call.search, call.gain)]
    result.methods = {record.kind: record.spec for record in used_methods}
    result.method_options = {record.kind: record.options for record in used_methods}
    result.notes = ([unwrapped_note(call.wrappers)] if call.wrappers else []) + loss_notes + list(
        getattr(call.sensitivity, "notes", []))
    approximate = [g.name for g in approximated_groups(model, graph) if g.id in decision.keep]
    if approximate:
        result.notes.append(
            f"{len(approximate)} pruned groups are normalised by a LayerNorm (or F.layer_norm / F.rms_norm) over "
            "their channels, which pruned normalises over the kept channels only: an approximation of removing "
            "them, which calibration_data's re-fit repairs (acps_core.layers.approximate_norms(False) leaves such "
            "groups alone): " + ", ".join(approximate[:6]) + (" ..." if len(approximate) > 6 else ""))
    if ties.sets:
        result.notes.extend([ties.describe()] + ([f"uniform_widths: {fitted}"] if fitted else []))
    if averaged:
        result.notes.append(f"the {comm.size} ranks gave different scores with {used_methods[0].name}, "
                            "which does not combine them across ranks; their average was used")
    if aimed is not None:
        result.notes.append(aimed.note(settings.compress_ratio))
    if not result.target_reached:
        result.notes.append(target_note(result, graph_info, searched, settings, search_name))
    result.output_set = new_output_set()
    # Every rank returns rank 0's result (a cost model that measures, like MeasuredLatency, differs by rank).
    result = comm.broadcast(result)
    if not result.target_reached:
        warnings.warn(result.notes[-1], PruneTargetWarning, stacklevel=3)
    # Only rank 0 writes; every rank learns whether that worked before returning the same result.
    started = time.perf_counter()
    cfg = searched_config(graph, result, call.override, fixed, settings)
    with stage("writing the outputs"):
        comm.run("writing the outputs", lambda: write_outputs(call.out_path, cfg, graph, decision, result, settings,
                                                               model, figure) if comm.rank == 0 else None)
    result.timings = {**timings, "writing": time.perf_counter() - started}
    return result


def _check_output(output: Any, traced: int, label: Any, call: Call) -> list[str]:
    """Check that the model's output is batch-first and that the default loss can compare it with the labels;
    returns a note on which part of the output the default loss reads, when it is not one tensor.

    Raises:
        DataError: the output has no batch dimension first, or the labels do not fit it.
    """
    if isinstance(output, torch.Tensor) and (output.dim() == 0 or output.shape[0] != traced):
        raise DataError(f"the model's output (shape {list(output.shape)} on {traced} samples) has no batch "
                        "dimension first; acps needs a model whose output is batch-first, like its input")
    scored, where = primary_output(output)
    method = call.sensitivity
    if scored is None or not method.uses_default_loss or method.loss_func is not None:
        return []
    # The trace ran on two samples; compare against the output the whole batch would give.
    if scored.dim() == 0 or scored.shape[0] != traced:
        raise DataError(f"the model's output ({where or 'a tensor'}, shape {list(scored.shape)} on {traced} "
                        "samples) has no batch dimension first; pass sensitivity=TaylorLossSensitivity(loss_func="
                        "...) with a loss that takes the model's output and the labels")
    label_kind(scored[:1].expand(label.shape[0], *scored.shape[1:]), label)
    if where is None:
        return []
    return [f"the model returns a {type(output).__name__}; the default loss compared {where} (shape "
            f"{list(scored.shape[1:])} per sample) with the labels (pass loss_func to choose otherwise)"]
