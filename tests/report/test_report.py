"""The search reports: JSON numbers that match the result, Markdown that names every layer and reason."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.errors import AcpsError, ArgumentError, ConfigError
from acps_core.graph.build import build_channel_graph
from acps_core.report.documents import (
    explain_text,
    left_alone_text,
    read_report,
    render_reports,
    report_data,
    report_json,
    report_markdown,
    report_paths,
)
from tests.support.cli_models import small_cnn

SETTINGS = {"compress_ratio": 1.5, "ascend_optimized": False, "max_prune_ratio": 1.0, "test_iteration": 1,
            "override_prune_cfg": Path("/configs/override.cfg"), "sensitivity": "TaylorLossSensitivity"}


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, list[torch.Tensor], acps.SearchResult]:
    """A real search of the small CNN: conv1 skipped by the user, conv2 searched, the head (the output) and a
    layer the forward pass never calls left alone by the graph."""
    folder = tmp_path_factory.mktemp("search")
    model = small_cnn()
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)]
    (folder / "override.cfg").write_text('skip_layers: "conv1"\n')
    (folder / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n"
                                       "override_prune_cfg: 'override.cfg'\n")
    result = acps.auto_channel_prune_search(model, str(folder / "search.cfg"), data, str(folder / "prune.cfg"))
    return model, data, result


@pytest.fixture(scope="module")
def result(searched: tuple[nn.Module, list[torch.Tensor], acps.SearchResult]) -> acps.SearchResult:
    return searched[2]


def test_the_search_covers_every_status_the_report_shows(result: acps.SearchResult) -> None:
    statuses = {name: layer.status for name, layer in result.layers.items()}
    assert statuses == {"conv1": "skip", "conv2": "searched", "head": "unprunable", "unused": "unprunable"}
    assert result.layers["conv2"].kept < result.layers["conv2"].total


def test_report_paths_sit_beside_the_config(tmp_path: Path) -> None:
    assert report_paths(tmp_path / "prune.cfg") == (tmp_path / "prune.cfg.report.md",
                                                    tmp_path / "prune.cfg.report.json")
    assert report_paths("prune.cfg") == (Path("prune.cfg.report.md"), Path("prune.cfg.report.json"))


def test_json_parses_and_every_number_matches_the_result(result: acps.SearchResult) -> None:
    report = json.loads(report_json(result, SETTINGS))
    totals = report["totals"]
    assert totals["cost_before"] == result.cost_before and totals["cost_after"] == result.cost_after
    assert totals["cost_unit"] == result.cost_unit == "bit-ops"
    assert totals["target_ratio"] == result.compress_ratio == 1.5
    assert totals["achieved_ratio"] == pytest.approx(result.achieved_ratio)
    assert totals["target_reached"] is result.target_reached
    assert (totals["layers"], totals["layers_pruned"], totals["layers_left_alone"]) == (4, 1, 3)
    assert report["methods"] == result.methods and report["notes"] == result.notes
    assert report["output_cfg"] == str(result.output_cfg)
    assert report["selection_file"] == str(result.selection_file)
    assert [entry["name"] for entry in report["layers"]] == list(result.layers)
    for entry in report["layers"]:
        layer = result.layers[entry["name"]]
        assert (entry["kind"], entry["group"], entry["status"]) == (layer.kind, layer.group, layer.status)
        assert (entry["channels_before"], entry["channels_after"]) == (layer.total, layer.kept)
        assert entry["prune_ratio"] == pytest.approx(layer.prune_ratio)
        assert (entry["cost_before"], entry["cost_after"]) == (layer.cost_before, layer.cost_after)


def test_json_gives_why_each_layer_was_not_searched(result: acps.SearchResult) -> None:
    reasons = {entry["name"]: entry["reason"] for entry in json.loads(report_json(result))["layers"]}
    assert reasons["conv2"] is None
    assert "override" in reasons["conv1"] and "skip" in reasons["conv1"]
    assert reasons["head"] == result.layers["head"].reason and "output" in reasons["head"]
    assert reasons["unused"] == result.layers["unused"].reason and "not called" in reasons["unused"]


def test_json_holds_the_configuration_used_as_plain_json(result: acps.SearchResult) -> None:
    report = json.loads(report_json(result, SETTINGS))
    assert report["configuration"] == {**SETTINGS, "override_prune_cfg": "/configs/override.cfg"}
    assert json.loads(report_json(result))["configuration"] is None


def test_json_is_byte_identical_for_the_same_result(result: acps.SearchResult) -> None:
    assert report_json(result, SETTINGS) == report_json(result, dict(SETTINGS))
    assert list(json.loads(report_json(result))) == ["report_format", "acps_version", "output_cfg", "selection_file",
                                                     "output_set", "totals", "methods", "notes", "configuration",
                                                     "layers", "path"]


def test_json_stays_strict_when_the_pruned_cost_is_zero(result: acps.SearchResult) -> None:
    text = report_json(dataclasses.replace(result, cost_after=0.0), {"limit": float("inf")})
    report = json.loads(text)
    assert report["totals"]["achieved_ratio"] is None and report["configuration"] == {"limit": None}
    assert "Infinity" not in text and "NaN" not in text


def test_graph_adds_macs_and_weights_that_match_the_pruned_model(
        tmp_path: Path, searched: tuple[nn.Module, list[torch.Tensor], acps.SearchResult]) -> None:
    model, data, result = searched
    graph = build_channel_graph(model.eval(), data[0])
    totals = json.loads(report_json(result, graph=graph))["totals"]
    assert "macs_before" not in json.loads(report_json(result))["totals"]

    def called_weights(net: nn.Module) -> int:
        return sum(module.weight.numel() for name, module in net.named_modules()
                   if isinstance(module, (nn.Conv2d, nn.Linear)) and name != "unused")

    def macs(net: nn.Module) -> float:
        return sum(layer.geometry.macs() for layer in build_channel_graph(net.eval(), data[0]).layers.values()
                   if layer.geometry is not None)

    pruned = acps.create_prune_retrain_model(model, data[0][:1], str(result.output_cfg), str(tmp_path / "record"))
    assert totals["weights_before"] == called_weights(model)
    assert totals["weights_after"] == called_weights(pruned) < totals["weights_before"]
    assert totals["macs_before"] == pytest.approx(macs(model))
    assert totals["macs_after"] == pytest.approx(macs(pruned))


def test_graph_of_another_model_is_refused(result: acps.SearchResult) -> None:
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    graph = build_channel_graph(other.eval(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ArgumentError, match="conv2"):
        report_json(result, graph=graph)


def test_markdown_shows_every_layer_in_the_table(result: acps.SearchResult) -> None:
    text = report_markdown(result, SETTINGS)
    table = text.split("## Layers\n", 1)[1].split("## Layers left alone", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    assert [row.split("|")[1].strip() for row in rows] == list(result.layers)
    conv2 = next(row for row in rows if row.startswith("| conv2 "))
    layer = result.layers["conv2"]
    assert f"{layer.kept}/{layer.total}" in conv2 and f"{layer.prune_ratio:.0%}" in conv2 and "searched" in conv2


def test_markdown_gives_the_exact_reason_of_every_layer_left_alone(result: acps.SearchResult) -> None:
    section = report_markdown(result).split("## Layers left alone\n", 1)[1]
    for name in ("head", "unused"):
        assert f"- `{name}` ({result.layers[name].kind}, unprunable): {result.layers[name].reason}" in section
    assert "- `conv1` (Conv2d, skip): skipped by the override config" in section
    assert "conv2" not in section


def test_markdown_summary_states_target_cost_methods_and_notes(result: acps.SearchResult) -> None:
    noted = dataclasses.replace(result, notes=["labels looked random; used the label-free criterion"])
    summary = report_markdown(noted, SETTINGS).split("## ", 1)[0]
    assert "Target compress ratio 1.5x reached" in summary
    assert f"achieved {result.achieved_ratio:.3f}x" in summary and "bit-ops" in summary
    assert "sensitivity TaylorLossSensitivity" in summary and "search GreedySearch" in summary
    assert "- labels looked random; used the label-free criterion" in summary
    missed = report_markdown(dataclasses.replace(result, target_reached=False))
    assert "**not reached**" in missed


def test_markdown_configuration_lists_every_setting(result: acps.SearchResult) -> None:
    section = report_markdown(result, SETTINGS).split("## Configuration\n", 1)[1].split("## ", 1)[0]
    assert "| override_prune_cfg | /configs/override.cfg |" in section
    assert "| ascend_optimized | false |" in section and "| compress_ratio | 1.5 |" in section


def test_render_reports_gives_both_texts_at_their_paths(result: acps.SearchResult) -> None:
    reports = render_reports(result, SETTINGS)
    markdown_path, json_path = report_paths(result.output_cfg)  # type: ignore[arg-type]
    assert list(reports) == [markdown_path, json_path]
    assert reports[markdown_path] == report_markdown(result, SETTINGS)
    assert reports[json_path] == report_json(result, SETTINGS)
    with pytest.raises(ArgumentError, match="output_cfg"):
        render_reports(dataclasses.replace(result, output_cfg=None))


def test_explain_reads_a_written_json_report_back(tmp_path: Path, result: acps.SearchResult) -> None:
    moved = dataclasses.replace(result, output_cfg=tmp_path / "prune.cfg")
    for path, text in render_reports(moved, SETTINGS).items():
        path.write_text(text)
    markdown_path, json_path = report_paths(tmp_path / "prune.cfg")
    assert markdown_path.read_text() == report_markdown(moved, SETTINGS)
    assert read_report(json_path) == report_data(moved, SETTINGS)
    text = left_alone_text(read_report(json_path))
    assert text.startswith("3 of 4 Conv/Linear layers were left alone")
    for name in ("head", "unused"):
        assert result.layers[name].reason in text  # type: ignore[operator]


def test_left_alone_text_says_so_when_nothing_was_left_alone() -> None:
    report = {"layers": [{"name": "conv", "kind": "Conv2d", "status": "searched", "reason": None}]}
    assert left_alone_text(report).startswith("No layer was left alone")


@pytest.mark.parametrize(("content", "message"), [
    ('{"layers": [', r"report\.json:1:\d+: not valid JSON"),
    ('{"totals": {}}', "not an acps report"),
    ('{"report_format": 99, "layers": []}', "report_format 99"),
])
def test_read_report_refuses_what_is_not_a_report(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "report.json"
    path.write_text(content)
    with pytest.raises(AcpsError, match=message):
        read_report(path)
    with pytest.raises(ConfigError, match=r"missing\.json: report does not exist; check the path"):
        read_report(tmp_path / "missing.json")


def test_explain_text_has_one_line_per_layer_and_a_count(
        searched: tuple[nn.Module, list[torch.Tensor], acps.SearchResult]) -> None:
    model, data, _ = searched
    graph = build_channel_graph(model.eval(), data[0])
    lines = explain_text(graph).splitlines()
    by_layer = {line.split()[0]: line for line in lines[2:] if line.strip() and not line[0].isdigit()}
    assert set(by_layer) == set(graph.layers)
    assert "prunable" in by_layer["conv1"] and "left alone" not in by_layer["conv1"]
    assert by_layer["head"].endswith(graph.explain()["head"])
    assert by_layer["unused"].endswith("not called in the forward pass on the calibration data")
    assert lines[-1] == "2 prunable of 4 Conv/Linear layers; 2 prunable channel groups of 3."
