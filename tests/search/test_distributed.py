"""Distributed scoring: gloo processes on this machine reach the decision one process reaches on the union of
their shards, with every built-in sensitivity method and on the label-free fallback; only rank 0 writes; a
failing rank makes every rank raise instead of hanging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.support import distributed_worker as worker

TAYLOR_FAMILY = ["taylor", "normalized", "fisher", "grouptaylor"]


def run_ranks(folder: Path, world: int, scenarios: list[tuple[str, str]], sizes: list[int],
              fail: str = "") -> list[list[dict]]:
    """Every rank's outcomes: ``outcomes[rank][scenario]``."""
    mp.spawn(worker.run, args=(world, str(folder / "init"), str(folder), scenarios, sizes, fail), nprocs=world,
             join=True)
    return [torch.load(folder / f"outcome{rank}.pt", weights_only=False) for rank in range(world)]


def union(sizes: list[int], labels: str = "class") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The passes one process sees: pass p is every rank's p-th half, in rank order (test_iteration 2)."""
    shards = [worker.shard(rank, size, labels) for rank, size in enumerate(sizes)]
    passes = []
    for part in range(2):
        xs, ys = [], []
        for x, y in shards:
            bounds = [round(i * len(y) / 2) for i in range(3)]
            xs.append(x[bounds[part]:bounds[part + 1]])
            ys.append(y[bounds[part]:bounds[part + 1]])
        passes.append((torch.cat(xs), torch.cat(ys)))
    return passes


def check_against_one_process(folder: Path, scenarios: list[tuple[str, str]], sizes: list[int],
                              outcomes: list[list[dict]]) -> None:
    """Every rank's scores (to float64 rounding), kept channels, notes and rank 0's written config are those of
    one process on the union of the shards, scenario by scenario."""
    for number, (method, labels) in enumerate(scenarios):
        ranks = [o[number] for o in outcomes]
        assert all("error" not in o for o in ranks), (method, labels, [o.get("trace") for o in ranks])
        single = folder / "single" / str(number)
        expected = worker.search(single, union(sizes, labels), method)
        fallback = labels != "class" and method in TAYLOR_FAMILY
        assert any("label-free" in note for note in expected["notes"]) == fallback, (method, labels)
        for rank, outcome in enumerate(ranks):
            assert outcome["kept"] == expected["kept"], (method, labels, rank)
            assert outcome["cost_after"] == pytest.approx(expected["cost_after"])
            assert expected["scores"].keys() == outcome["scores"].keys()
            for group, scores in expected["scores"].items():
                torch.testing.assert_close(outcome["scores"][group], scores, rtol=1e-9, atol=1e-12,
                                           msg=lambda m, s=(method, labels, rank, group): f"{s}: {m}")
            # The same notes: none, or the same fallback (no averaging over the ranks either way)
            assert outcome["notes"] == expected["notes"], (method, labels, rank)
        # Only rank 0 wrote the config, its selection and the reports
        assert ranks[0]["files"] == ["prune.cfg", "prune.cfg.report.json", "prune.cfg.report.md",
                                     "prune.cfg.selection"]
        assert all(o["files"] == [] for o in ranks[1:])
        assert config_text(folder / "rank0" / str(number)) == config_text(single)


def config_text(folder: Path) -> list[str]:
    """The written config's lines, but for the id of the set of files one search writes (new in every call)."""
    return [line for line in (folder / "prune.cfg").read_text().splitlines()
            if not line.startswith("# acps output set")]


#: Every built-in method with class labels; the Taylor methods' fallback with the reference's random labels, with
#: one-hot labels and with the model's own outputs (all three under the default L1 loss).
EVERY_METHOD = ([(method, "class") for method in worker.SENSITIVITIES]
                + [(method, "random") for method in TAYLOR_FAMILY] + [("outchange", "random")]
                + [("taylor", "onehot"), ("grouptaylor", "onehot"), ("fisher", "own"), ("grouptaylor", "own")])


@pytest.mark.slow
def test_two_ranks_reach_the_single_process_scores_and_decision_with_every_method_and_fallback(tmp_path) -> None:
    # Uneven shards: a label-free chunk holds samples of both ranks in each pass, and the first pass has 17
    # samples, so MeasuredSensitivity uses the batch statistics on the union's first 16 or 17.
    sizes = [10, 23]
    check_against_one_process(tmp_path, EVERY_METHOD, sizes, run_ranks(tmp_path, 2, EVERY_METHOD, sizes))


@pytest.mark.slow
def test_three_ranks_reach_the_single_process_scores_and_decision(tmp_path) -> None:
    scenarios = [("fisher", "class"), ("taylor", "random"), ("grouptaylor", "random"), ("normalized", "own"),
                 ("measured", "class"), ("outchange", "class")]
    sizes = [7, 4, 10]  # two label-free chunks straddle two ranks in each pass
    check_against_one_process(tmp_path, scenarios, sizes, run_ranks(tmp_path, 3, scenarios, sizes))


@pytest.mark.slow
@pytest.mark.parametrize(("method", "fail", "step"), [("taylor", "data", "calibration pass 1"),
                                                      ("taylor", "plugin", "scoring the channels"),
                                                      ("outchange", "data", "label-free pass 1")])
def test_a_rank_failing_mid_way_makes_every_rank_raise(tmp_path, method, fail, step) -> None:
    outcomes = run_ranks(tmp_path, 2, [(method, "class")], [8, 8], fail)
    failing = outcomes[1][0]
    assert failing["error"] in ("PluginError", "ValueError"), failing
    assert "rank 1" in failing["message"] or "this rank's data broke the model" in failing["message"]
    assert outcomes[0][0]["error"] == "DistributedError"
    assert step in outcomes[0][0]["message"] and "rank 1:" in outcomes[0][0]["message"], outcomes[0][0]["message"]


@pytest.mark.slow
def test_a_search_only_rank_0_makes_runs_as_one_process_with_distributed_false(tmp_path) -> None:
    outcomes = run_ranks(tmp_path, 2, [("taylor", "class")], [8, 8], "rank0-only")
    assert "error" not in outcomes[0][0], outcomes[0][0].get("trace")
    assert outcomes[1][0] == {"skipped": True}
    single = worker.search(tmp_path / "single", worker.shard(0, 8), "taylor")
    assert outcomes[0][0]["kept"] == single["kept"]
