"""The acps command line: demo, plugins, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from acps_core.cli import EXIT_BAD_INPUT, EXIT_OK, main
from acps_core.proto import retrain_config_pb2


def test_plugins_lists_the_three_built_in_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == EXIT_OK
    out = capsys.readouterr().out
    for kind, name, dist in [("sensitivity", "TaylorLossSensitivity", "acps-sensitivity-taylor"),
                             ("search", "GreedySearch", "acps-search-greedy"),
                             ("gain", "BitComplexity", "acps-gain-ascend")]:
        line = next(line for line in out.splitlines() if name in line)
        assert kind in line and dist in line


@pytest.mark.slow
def test_demo_trains_searches_and_writes_its_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "achieved ratio" in out and "NOT reached" not in out
    cfg = text_format.Parse((tmp_path / "demo_prune.cfg").read_text(), retrain_config_pb2.AMCTRetrainConfig())
    assert cfg.override_layer_configs
    assert (tmp_path / "demo_prune.cfg.selection").is_file()
    assert (tmp_path / "demo_search.cfg").is_file()


def test_bad_input_exits_2_with_one_readable_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("acps: error:") and "missing" in err[0]
    assert "--debug" in err[1]
