"""What a search decided, written for people and for programs, and why each layer was or was not pruned.

A search writes two reports beside its channel-prune config: ``<output_cfg>.report.md`` (Markdown, for a
person) and ``<output_cfg>.report.json`` (for a program). Both come from one document built by
:func:`report_data`, so they never disagree. :func:`explain_text` describes a traced :class:`ChannelGraph`
before any search (``acps explain``), and :func:`left_alone_text` prints the layers a saved JSON report left
alone (``acps explain --report``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from acps_core._util.atomic import StrPath
from acps_core._util.reading import read_bytes
from acps_core._version import __version__
from acps_core.errors import ArgumentError, ConfigError
from acps_core.graph.model import ChannelGraph
from acps_core.methods.spec import split_method_spec
from acps_core.report.result import SearchResult

#: Version of the JSON document's layout; raised when a key changes meaning or disappears.
REPORT_FORMAT = 1
MARKDOWN_SUFFIX = ".report.md"
JSON_SUFFIX = ".report.json"
#: Layer statuses that mean the search never touched the layer's channels.
LEFT_ALONE_STATUSES = ("unprunable", "skip")

# A result's LayerReport carries a reason only for unprunable layers; these say why the others were not searched.
_STATUS_REASONS = {
    "skip": "skipped by the override config (override_prune_cfg): its output channels are never pruned",
    "override": "prune ratio fixed by the override config (override_prune_cfg); left out of the search",
}


def report_paths(output_cfg: StrPath) -> tuple[Path, Path]:
    """The Markdown and JSON reports that belong to a channel-prune config, in the config's folder.

    ``prune.cfg`` -> ``(prune.cfg.report.md, prune.cfg.report.json)``.
    """
    path = Path(os.fspath(output_cfg))
    return path.with_name(path.name + MARKDOWN_SUFFIX), path.with_name(path.name + JSON_SUFFIX)


def report_data(result: SearchResult, settings: Mapping[str, Any] | None = None, *,
                graph: ChannelGraph | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict: the document :func:`report_json` writes and :func:`report_markdown` shows.

    Keys, in this order: ``report_format``, ``acps_version``, ``output_cfg``, ``selection_file``, ``output_set``
    (the id the config and selection file carry too, saying they were written together), ``totals``
    (``cost_unit``, ``cost_before``, ``cost_after``; with ``graph`` also ``macs_before``, ``macs_after``,
    ``weights_before``, ``weights_after``; then ``target_ratio``, ``achieved_ratio``, ``target_reached`` and the
    counts ``layers``, ``layers_pruned``, ``layers_left_alone``),
    ``methods``, ``notes``, ``configuration`` (``settings`` or None), ``layers``: one entry per Conv/Linear
    layer with ``name``, ``kind``, ``group``, ``status``, ``channels_before``, ``channels_after``,
    ``prune_ratio``, ``cost_before``, ``cost_after``, ``sensitivity_kept`` (the share of its group's
    sensitivity kept; None if not scored) (with ``graph`` also ``macs_before``/``macs_after``) and
    ``reason`` (why the layer was not searched; None for searched layers), and ``path``: ``[cost share, lost
    sensitivity share]`` along the way to the decision (see :attr:`SearchResult.path`). A ratio that is not
    finite (a pruned cost of 0) is None, so the JSON stays strict.

    Args:
        result: what :func:`acps_core.auto_channel_prune_search` returned.
        settings: the configuration the search ran with (e.g. the search config's fields, the method names);
            paths become strings and other values that JSON cannot hold become their ``str()``.
        graph: the channel graph the search ran on. The result holds costs in the gain method's unit only; the
            graph's traced geometry adds multiply-accumulates and Conv/Linear weight counts before and after.

    Raises:
        ArgumentError: ``graph`` does not describe the model the result came from (a group the result keeps
            channels of is missing).
    """
    per_layer_macs: dict[str, tuple[float, float]] = {}
    geometry_totals: dict[str, Any] = {}
    if graph is not None:
        per_layer_macs, geometry_totals = _geometry_counts(result, graph)
    layers = []
    for layer in result.layers.values():
        entry: dict[str, Any] = {
            "name": layer.name,
            "kind": layer.kind,
            "group": layer.group,
            "status": layer.status,
            "channels_before": layer.total,
            "channels_after": layer.kept,
            "prune_ratio": layer.prune_ratio,
            "cost_before": layer.cost_before,
            "cost_after": layer.cost_after,
            "sensitivity_kept": layer.sensitivity_kept,
        }
        if graph is not None:
            entry["macs_before"], entry["macs_after"] = per_layer_macs.get(layer.name, (0.0, 0.0))
        entry["reason"] = layer.reason if layer.reason is not None else _STATUS_REASONS.get(layer.status)
        layers.append(entry)
    totals: dict[str, Any] = {
        "cost_unit": result.cost_unit,
        "cost_before": result.cost_before,
        "cost_after": result.cost_after,
        **geometry_totals,
        "target_ratio": result.compress_ratio,
        "achieved_ratio": _finite(result.achieved_ratio),
        "target_reached": result.target_reached,
        "prunable_share": result.prunable_share,
        "layers": len(layers),
        "layers_pruned": sum(1 for layer in result.layers.values() if layer.kept < layer.total),
        "layers_left_alone": sum(1 for layer in result.layers.values() if layer.status in LEFT_ALONE_STATUSES),
    }
    return {
        "report_format": REPORT_FORMAT,
        "acps_version": __version__,
        "output_cfg": os.fspath(result.output_cfg) if result.output_cfg is not None else None,
        "selection_file": os.fspath(result.selection_file) if result.selection_file is not None else None,
        "output_set": result.output_set,
        "totals": totals,
        "methods": dict(result.methods),
        "notes": list(result.notes),
        "configuration": _jsonable(dict(settings)) if settings is not None else None,
        "layers": layers,
        # (cost / cost before, share of the sensitivity given up) along the way to the decision
        "path": [[round(cost, 6), round(lost, 6)] for cost, lost in result.path],
    }


def _geometry_counts(result: SearchResult, graph: ChannelGraph
                     ) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """MACs per layer, and total MACs and Conv/Linear weight counts, before and after, from the traced geometry.

    Raises:
        ArgumentError: the result keeps channels of a group the graph does not have.
    """
    group_ids = {group.name: group.id for group in graph.groups}
    kept: dict[int, int] = {}
    for name, indices in result.kept_channels.items():
        if name not in group_ids:
            raise ArgumentError(f"the result keeps channels of group {name!r}, which the graph does not have; "
                                "pass the graph of the model the search ran on")
        kept[group_ids[name]] = len(indices)
    per_layer: dict[str, tuple[float, float]] = {}
    weights_before = weights_after = 0.0
    for name, info in graph.layers.items():
        geometry = info.geometry
        if geometry is None:
            continue  # never called on the calibration data: no traced shape, no cost
        cin, cout = graph.channel_counts(info, kept)
        before, after = geometry.macs() * info.calls, geometry.macs(cin, cout) * info.calls
        per_layer[name] = (before, after)
        # A filter is applied once per output position, so MACs per position are exactly the weight count.
        positions = geometry.output_positions
        if positions > 0:
            weights_before += before / positions
            weights_after += after / positions
    totals = {
        # With the matrix products outside the layers (attention products, ...), which pruning does not change:
        # the model's MACs as a FLOP counter sees them.
        "macs_before": sum(before for before, _ in per_layer.values()) + graph.other_macs,
        "macs_after": sum(after for _, after in per_layer.values()) + graph.other_macs,
        "weights_before": round(weights_before),
        "weights_after": round(weights_after),
    }
    return per_layer, totals


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    """``value`` with paths as strings, tuples as lists, non-finite floats as None and unknown objects as str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(item) for item in items]
    return str(value)


def report_json(result: SearchResult, settings: Mapping[str, Any] | None = None, *,
                graph: ChannelGraph | None = None) -> str:
    """The machine-readable report: :func:`report_data` as indented, strict JSON (no NaN or Infinity).

    Keys keep the order :func:`report_data` documents, so two reports of the same search are byte-identical.
    """
    return json.dumps(report_data(result, settings, graph=graph), indent=2, allow_nan=False) + "\n"


def report_markdown(result: SearchResult, settings: Mapping[str, Any] | None = None, *,
                    graph: ChannelGraph | None = None) -> str:
    """The human-readable report: a summary, the methods with their options, the configuration, a table of every
    layer and the layers left alone.

    Arguments as for :func:`report_data`.
    """
    return _markdown(report_data(result, settings, graph=graph))


def _markdown(data: Mapping[str, Any]) -> str:
    totals = data["totals"]
    unit = totals["cost_unit"]
    lines = ["# acps channel pruning report", ""]
    if data["output_cfg"] is not None:
        where = f"Channel-prune config `{Path(data['output_cfg']).name}`"
        if data["selection_file"] is not None:
            where += f"; the chosen channels are in `{Path(data['selection_file']).name}`"
        if data.get("output_set"):
            where += f" (output set `{data['output_set']}`)"
        lines += [where + ".", ""]

    achieved = totals["achieved_ratio"]
    achieved_text = f"{achieved:.3f}x" if achieved is not None else "unbounded (pruned cost 0)"
    verdict = "reached" if totals["target_reached"] else "**not reached**"
    summary = (f"Target compress ratio {totals['target_ratio']:g}x {verdict}: achieved {achieved_text}. "
               f"Cost {_si(totals['cost_before'])} -> {_si(totals['cost_after'])} {unit}")
    if "macs_before" in totals:
        summary += (f", MACs {_si(totals['macs_before'])} -> {_si(totals['macs_after'])}, Conv/Linear weights "
                    f"{_si(totals['weights_before'])} -> {_si(totals['weights_after'])}")
    summary += (f". {totals['layers_pruned']} of {totals['layers']} Conv/Linear layers lose channels; "
                f"{totals['layers_left_alone']} left alone.")
    if totals.get("prunable_share") is not None:
        summary += f" {totals['prunable_share']:.1%} of the cost is in layers acps can prune."
    # Reports of acps 0.1.0 also listed the cost unit among the methods; it is in the totals.
    methods = {kind: split_method_spec(spec) for kind, spec in data["methods"].items() if kind != "cost_unit"}
    if methods:
        summary += " Methods: " + ", ".join(f"{kind} {name}" for kind, (name, _) in methods.items()) + "."
    lines += [summary, ""]
    if data["notes"]:
        lines += ["Notes:", ""] + [f"- {note}" for note in data["notes"]] + [""]
    if methods:
        lines += ["## Methods", "", "| kind | method | options |", "|---|---|---|"]
        lines += [f"| {kind} | {_cell(name)} | {f'`{_cell(options)}`' if options else '-'} |"
                  for kind, (name, options) in methods.items()] + [""]

    if data["configuration"]:
        lines += ["## Configuration", "", "| setting | value |", "|---|---|"]
        lines += [f"| {_cell(key)} | {_cell(value if isinstance(value, str) else json.dumps(value))} |"
                  for key, value in data["configuration"].items()]
        lines.append("")

    lines += ["## Layers", "",
              f"| layer | type | group | kept/total | pruned | sensitivity kept | cost before -> after ({unit}) | "
              "status |", "|---|---|---|---:|---:|---:|---|---|"]
    for layer in data["layers"]:
        cost = f"{_si(layer['cost_before'])} -> {_si(layer['cost_after'])}"
        kept = layer.get("sensitivity_kept")
        lines.append(f"| {_cell(layer['name'])} | {_cell(layer['kind'])} | {_cell(layer['group'] or '-')} | "
                     f"{layer['channels_after']}/{layer['channels_before']} | {layer['prune_ratio']:.0%} | "
                     f"{'-' if kept is None else f'{kept:.1%}'} | {cost} | {layer['status']} |")
    if data.get("path"):
        lines += ["", "The figure `" + (Path(data["output_cfg"]).name + ".report.png" if data["output_cfg"] else
                                         "<output_cfg>.report.png")
                  + "` (written by `acps search`, or `acps_core.figure.write_figure(result)`) shows the kept "
                    "share per layer, the channels' sensitivity, and the path to the decision: the sensitivity "
                    "given up against the model's cost, cheapest cuts first "
                  + f"(from cost 1.0 to {data['path'][-1][0]:.3f}, giving up {data['path'][-1][1]:.1%})."]
    lines += ["", "## Layers left alone", ""]
    left_alone = _left_alone(data["layers"])
    if left_alone:
        lines += [f"- `{layer['name']}` ({layer['kind']}, {layer['status']}): {layer['reason'] or 'no reason given'}"
                  for layer in left_alone]
    else:
        lines.append("None: the search could change every Conv/Linear layer.")
    return "\n".join(lines) + "\n"


def _si(value: float) -> str:
    """A count with a metric prefix and three significant digits (``1.94G``), readable at a glance."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}"
    return f"{value:.3g}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: a bare ``|`` would start a new column."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _left_alone(layers: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [layer for layer in layers if layer.get("status") in LEFT_ALONE_STATUSES]


def render_reports(result: SearchResult, settings: Mapping[str, Any] | None = None, *,
                   graph: ChannelGraph | None = None) -> dict[Path, str]:
    """Both reports of a search, keyed by the path each belongs at beside ``result.output_cfg``.

    Hand the dict to :func:`acps_core._util.atomic.atomic_write_many` (with the config itself) to write all at once.

    Raises:
        ArgumentError: the result names no ``output_cfg``, or ``graph`` does not fit it (see :func:`report_data`).
    """
    if result.output_cfg is None:
        raise ArgumentError("the search result names no output_cfg, so there is no folder for its reports; "
                            "set result.output_cfg or call report_json/report_markdown")
    data = report_data(result, settings, graph=graph)
    markdown_path, json_path = report_paths(result.output_cfg)
    return {markdown_path: _markdown(data),
            json_path: json.dumps(data, indent=2, allow_nan=False) + "\n"}


def read_report(path: StrPath) -> dict[str, Any]:
    """Load a JSON report written by :func:`report_json`.

    Raises:
        ConfigError: the file is missing, not a regular file, too large, not JSON (with line and column), or not
            an acps report.
    """
    where = os.fspath(path)
    try:
        text = read_bytes(where, "report", "record").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not a text file, so not a JSON report: {exc}", path=where) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON ({exc.msg}); give the {JSON_SUFFIX} file a search wrote", path=where,
                          line=exc.lineno, column=exc.colno) from exc
    except RecursionError as exc:
        raise ConfigError(f"not a JSON report (nested too deeply); give the {JSON_SUFFIX} file a search wrote",
                          path=where) from exc
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list) or "report_format" not in data:
        raise ConfigError(f"JSON but not an acps report (no report_format and layers list); give the "
                          f"{JSON_SUFFIX} file a search wrote", path=where)
    if data["report_format"] != REPORT_FORMAT:
        raise ConfigError(f"report_format {data['report_format']!r}; this acps ({__version__}) reads format "
                          f"{REPORT_FORMAT}; read it with the acps version that wrote it", path=where)
    for index, layer in enumerate(data["layers"]):
        text_fields = ("name", "kind", "status")
        if not isinstance(layer, dict) or not all(isinstance(layer.get(key), str) for key in text_fields) \
                or not isinstance(layer.get("reason"), (str, type(None))):
            raise ConfigError(f"layers[{index}] is not a layer entry of an acps report (it needs the texts name, "
                              f"kind, status and reason); the report was edited or damaged: search again to write "
                              "it anew", path=where)
    return data


def left_alone_text(report: Mapping[str, Any]) -> str:
    """The layers a report says were left alone, one line each: name, type, status and the exact reason.

    Args:
        report: a report document, as :func:`report_data` builds or :func:`read_report` loads it.
    """
    left_alone = _left_alone(report.get("layers", []))
    total = len(report.get("layers", []))
    if not left_alone:
        return f"No layer was left alone: the search could change all {total} Conv/Linear layers.\n"
    width = max(len(str(layer["name"])) for layer in left_alone)
    lines = [f"{len(left_alone)} of {total} Conv/Linear layers were left alone:"]
    for layer in left_alone:
        lines.append(f"  {str(layer['name']).ljust(width)}  {layer['kind']}, {layer['status']}: "
                     f"{layer.get('reason') or 'no reason given'}")
    return "\n".join(lines) + "\n"


def explain_text(graph: ChannelGraph) -> str:
    """For ``acps explain``: every Conv/Linear layer, whether it can be pruned, its group, and why not.

    One line per layer (name, type, prunable or left alone, group, and for a layer left alone the exact
    reason), then a count of prunable layers and groups.
    """
    rows = [("layer", "type", "status", "group", "reason")]
    reasons = graph.explain()
    prunable = 0
    for name, layer in graph.layers.items():
        group = graph.group(layer.out_group) if layer.out_group is not None else None
        if layer.prunable and group is not None:
            prunable += 1
            # A depthwise conv is prunable only through its input's group: say so, or its group name misleads.
            note = "" if name in group.producers else f"its output channels follow its input (group {group.name})"
            rows.append((name, layer.kind, "prunable", group.name, note))
        else:
            rows.append((name, layer.kind, "left alone", group.name if group is not None else "-", reasons[name]))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines = [line.rstrip() for line in lines]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    prunable_groups = len(graph.prunable_groups)
    lines.append(f"{prunable} prunable of {len(graph.layers)} Conv/Linear layers; {prunable_groups} prunable "
                 f"channel groups of {len(graph.groups)}.")
    return "\n".join(lines) + "\n"
