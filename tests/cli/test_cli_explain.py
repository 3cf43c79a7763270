"""``acps explain``: every Conv/Linear layer with its status, group and reason; model and data loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from acps_core.cli.loading import load_model, load_tensor
from acps_core.cli.main import EXIT_BAD_INPUT, EXIT_OK, main
from acps_core.errors import ArgumentError, DataError
from tests.support.cli_models import SmallCNN, small_cnn

SPEC = "tests.support.cli_models:small_cnn"


def explain(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["explain", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def layer_lines(out: str) -> dict[str, str]:
    """The explain table's rows, by layer name."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows[line.split()[0]] = line
    return rows


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("acps: error:") and "--debug" in lines[1]
    return lines[0]


def test_lists_every_layer_with_its_status_group_and_reason(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = explain(capsys, "--model", SPEC, "--input-shape", "1,3,8,8")
    assert code == EXIT_OK, err
    rows = layer_lines(out)
    assert set(rows) == {"conv1", "conv2", "head", "unused"}
    assert rows["conv1"].split()[1:4] == ["Conv2d", "prunable", "conv1"]
    assert rows["conv2"].split()[1:4] == ["Conv2d", "prunable", "conv2"]
    assert "left alone" in rows["head"]
    assert rows["head"].endswith("its channels are the model's output, whose shape must not change")
    assert rows["unused"].endswith("not called in the forward pass on the calibration data")
    assert "2 prunable of 4 Conv/Linear layers; 2 prunable channel groups of 3." in out


def test_traces_with_a_data_file_instead_of_a_random_input(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(torch.randn(4, 3, 8, 8), tmp_path / "data.pt")
    code, out, err = explain(capsys, "--model", SPEC, "--data", str(tmp_path / "data.pt"))
    assert code == EXIT_OK, err
    assert "shape [4, 3, 8, 8]" in out and set(layer_lines(out)) == {"conv1", "conv2", "head", "unused"}


@pytest.mark.parametrize(("spec", "expected"), [
    ("tests.no_such_module:small_cnn", "no module named 'tests.no_such_module'"),
    ("tests.support.cli_models:missing", "has no attribute 'missing'"),
    ("tests.support.cli_models:needs_arguments", "with no arguments raised TypeError"),
    ("tests.support.cli_models:not_a_model", "returned a str, not a torch.nn.Module"),
    ("tests.support.cli_models:SmallCNN.forward", "with no arguments raised TypeError"),
    ("just_a_name", "neither an existing file nor of the form package.module:factory"),
])
def test_a_bad_model_spec_exits_2_with_one_readable_line(capsys: pytest.CaptureFixture[str], spec: str,
                                                         expected: str) -> None:
    code, _, err = explain(capsys, "--model", spec, "--input-shape", "1,3,8,8")
    assert code == EXIT_BAD_INPUT
    line = one_error_line(err)
    assert spec in line and expected in line


@pytest.mark.parametrize("shape", ["1,3,x,8", "1,0,8,8", ""])
def test_a_bad_input_shape_exits_2(capsys: pytest.CaptureFixture[str], shape: str) -> None:
    code, _, err = explain(capsys, "--model", SPEC, "--input-shape", shape)
    assert code == EXIT_BAD_INPUT
    assert "--input-shape" in one_error_line(err)


def test_without_an_input_shape_or_data_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = explain(capsys, "--model", SPEC)
    assert code == EXIT_BAD_INPUT
    assert "--input-shape" in one_error_line(err)


def test_an_input_the_model_cannot_take_exits_2_naming_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = explain(capsys, "--model", SPEC, "--input-shape", "1,5,8,8")
    assert code == EXIT_BAD_INPUT
    assert "tracing" in one_error_line(err)


def test_a_pickled_model_needs_allow_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(small_cnn(), tmp_path / "model.pt")
    code, _, err = explain(capsys, "--model", str(tmp_path / "model.pt"), "--input-shape", "1,3,8,8")
    assert code == EXIT_BAD_INPUT
    line = one_error_line(err)
    assert "--allow-pickle" in line and "runs any code" in line


def test_a_pickled_model_loads_with_allow_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(small_cnn(), tmp_path / "model.pt")
    code, out, err = explain(capsys, "--model", str(tmp_path / "model.pt"), "--allow-pickle",
                             "--input-shape", "1,3,8,8")
    assert code == EXIT_OK, err
    assert layer_lines(out)["conv2"].split()[2] == "prunable"


def test_a_state_dict_file_is_refused_with_a_hint(tmp_path: Path) -> None:
    torch.save(small_cnn().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ArgumentError, match="state dict"):
        load_model(str(tmp_path / "weights.pt"), allow_pickle=True)


def test_a_missing_model_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="does not exist"):
        load_model(str(tmp_path / "absent.pt"), allow_pickle=True)


def test_load_model_builds_the_factory_model() -> None:
    assert isinstance(load_model(SPEC), SmallCNN)


def test_load_tensor_refuses_objects_non_tensors_and_foreign_files(tmp_path: Path) -> None:
    torch.save({"data": SmallCNN()}, tmp_path / "objects.pt")
    with pytest.raises(DataError, match="objects other than tensors"):
        load_tensor(tmp_path / "objects.pt")
    torch.save({"data": torch.zeros(2)}, tmp_path / "dict.pt")
    with pytest.raises(DataError, match="holds a dict, not a tensor"):
        load_tensor(tmp_path / "dict.pt")
    (tmp_path / "text.pt").write_text("not a tensor")
    with pytest.raises(DataError, match=r"not a file torch\.save wrote"):
        load_tensor(tmp_path / "text.pt")
    with pytest.raises(DataError, match="does not exist"):
        load_tensor(tmp_path / "absent.pt")


def test_data_file_that_disagrees_with_the_input_shape_exits_2(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(torch.randn(4, 3, 8, 8), tmp_path / "data.pt")
    code, _, err = explain(capsys, "--model", SPEC, "--data", str(tmp_path / "data.pt"), "--input-shape", "1,3,8,8")
    assert code == EXIT_BAD_INPUT
    assert "[4, 3, 8, 8]" in one_error_line(err)


def test_report_prints_the_layers_left_alone_with_their_reasons(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    report = {"report_format": 1, "layers": [
        {"name": "features.0", "kind": "Conv2d", "status": "searched", "reason": None},
        {"name": "classifier", "kind": "Linear", "status": "unprunable",
         "reason": "its channels are the model's output, whose shape must not change"},
        {"name": "features.3", "kind": "Conv2d", "status": "skip", "reason": "skipped by the override config"},
    ]}
    (tmp_path / "prune.cfg.report.json").write_text(json.dumps(report))
    code, out, err = explain(capsys, "--report", str(tmp_path / "prune.cfg.report.json"))
    assert code == EXIT_OK, err
    assert out.splitlines()[0] == "2 of 3 Conv/Linear layers were left alone:"
    assert "classifier  Linear, unprunable: its channels are the model's output, whose shape must not change" in out
    assert "features.3  Conv2d, skip: skipped by the override config" in out
    assert "features.0" not in out


def test_report_with_model_options_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = explain(capsys, "--report", str(tmp_path / "r.json"), "--input-shape", "1,3,8,8")
    assert code == EXIT_BAD_INPUT
    assert "--input-shape" in one_error_line(err)


def test_report_that_is_not_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.json").write_text("{")
    code, _, err = explain(capsys, "--report", str(tmp_path / "r.json"))
    assert code == EXIT_BAD_INPUT
    assert "not valid JSON" in one_error_line(err)


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--report", "--input-shape", "--data", "--allow-pickle", "package.module:factory",
                   "Exit codes"):
        assert option in out
