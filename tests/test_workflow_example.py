"""The README's workflow, as the runnable script examples/workflow.py: it must keep working."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_whole_workflow_example_runs_and_the_fine_tuned_model_is_accurate(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "examples" / "workflow.py"
    spec = importlib.util.spec_from_file_location("acps_workflow_example", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.main(tmp_path)
    assert accuracy > 0.9
    assert {p.name for p in tmp_path.iterdir()} >= {"search.cfg", "prune.cfg", "prune.cfg.selection", "prune.record",
                                                    "pruned_tuned.pth", "pruned.onnx"}
