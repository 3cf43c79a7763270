"""Distributed scoring: gloo processes on this machine reach the decision one process reaches on the union of
their shards; only rank 0 writes; a failing rank makes every rank raise instead of hanging."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests import distributed_worker as worker


def run_ranks(world: int, method: str, sizes: list[int], fail: str = "") -> tuple[Path, list[dict]]:
    folder = Path(tempfile.mkdtemp())
    mp.spawn(worker.run, args=(world, str(folder / "init"), str(folder), method, sizes, fail), nprocs=world,
             join=True)
    return folder, [torch.load(folder / f"outcome{rank}.pt", weights_only=False) for rank in range(world)]


def union(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The passes one process sees: pass p is every rank's p-th half, in rank order (test_iteration 2)."""
    shards = [worker.shard(rank, size) for rank, size in enumerate(sizes)]
    passes = []
    for part in range(2):
        xs, ys = [], []
        for x, y in shards:
            bounds = [round(i * len(y) / 2) for i in range(3)]
            xs.append(x[bounds[part]:bounds[part + 1]])
            ys.append(y[bounds[part]:bounds[part + 1]])
        passes.append((torch.cat(xs), torch.cat(ys)))
    return passes


@pytest.mark.slow
@pytest.mark.parametrize(("world", "method", "sizes"), [(2, "taylor", [8, 6]), (3, "fisher", [6, 6, 4]),
                                                      (2, "grouptaylor", [7, 9])])
def test_every_rank_reaches_the_single_process_decision_on_the_union(world, method, sizes) -> None:
    folder, outcomes = run_ranks(world, method, sizes)
    assert all("error" not in o for o in outcomes), [o.get("trace") for o in outcomes]
    single = Path(tempfile.mkdtemp())
    expected = worker.search(single, union(sizes), method)
    for rank, outcome in enumerate(outcomes):
        assert outcome["kept"] == expected["kept"], rank
        assert outcome["cost_after"] == pytest.approx(expected["cost_after"])
        for group, scores in expected["scores"].items():
            torch.testing.assert_close(outcome["scores"][group], scores, rtol=1e-9, atol=1e-12)
        assert not outcome["notes"]
    # Only rank 0 wrote the config, its selection and the reports
    assert outcomes[0]["files"] == ["prune.cfg", "prune.cfg.report.json", "prune.cfg.report.md",
                                    "prune.cfg.selection"]
    assert all(o["files"] == [] for o in outcomes[1:])
    assert (folder / "rank0" / "prune.cfg").read_text() == (single / "prune.cfg").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "fail", "step"), [("taylor", "data", "calibration pass 1"),
                                                      ("taylor", "plugin", "scoring the channels"),
                                                      ("outchange", "data", "label-free pass 1")])
def test_a_rank_failing_mid_way_makes_every_rank_raise(method, fail, step) -> None:
    _, outcomes = run_ranks(2, method, [8, 8], fail)
    failing = outcomes[1]
    assert failing["error"] in ("PluginError", "ValueError"), failing
    assert "rank 1" in failing["message"] or "this rank's data broke the model" in failing["message"]
    assert outcomes[0]["error"] == "DistributedError"
    assert step in outcomes[0]["message"] and "rank 1:" in outcomes[0]["message"], outcomes[0]["message"]


@pytest.mark.slow
def test_a_search_only_rank_0_makes_runs_as_one_process_with_distributed_false() -> None:
    _, outcomes = run_ranks(2, "taylor", [8, 8], "rank0-only")
    assert "error" not in outcomes[0], outcomes[0].get("trace")
    assert outcomes[1] == {"skipped": True}
    single = Path(tempfile.mkdtemp())
    assert outcomes[0]["kept"] == worker.search(single, worker.shard(0, 8), "taylor")["kept"]
