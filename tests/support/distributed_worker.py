"""The process each rank of the distributed tests runs (importable by name, as spawned processes need)."""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import acps_core as acps
from acps_sensitivity_taylor import (
    BalancedL2NormSensitivity,
    FisherSensitivity,
    GroupMagnitudeSensitivity,
    GroupTaylorSensitivity,
    MeasuredSensitivity,
    NormalizedTaylorSensitivity,
    OutputChangeSensitivity,
    TaylorLossSensitivity,
)

SENTINEL = 1234.0


class Net(nn.Module):
    """A small residual CNN in float64; raises on a batch holding the sentinel value (a rank failing mid-way)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == SENTINEL).any()):
            raise ValueError("this rank's data broke the model")
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.a(h))
        return self.fc(torch.relu(self.b(h)).mean((2, 3)))


def model() -> Net:
    torch.manual_seed(0)
    net = Net().double().eval()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net


#: The labels a shard can come with: class indices (cross-entropy), or output-shaped ones for the default L1 loss
#: that make the Taylor methods fall back to the label-free score: random as in the reference's example, one-hot,
#: or the model's own outputs.
LABELS = ("class", "random", "onehot", "own")


def shard(rank: int, samples: int, labels: str = "class") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    data = torch.randn(samples, 3, 8, 8, generator=generator, dtype=torch.float64)
    classes = torch.randint(0, 5, (samples,), generator=generator)
    if labels == "random":
        return [data, torch.randn(samples, 5, generator=generator, dtype=torch.float64)]
    if labels == "onehot":
        return [data, F.one_hot(classes, 5).double()]
    if labels == "own":
        with torch.no_grad():
            return [data, model()(data)]
    return [data, classes]


def capturing(cls: Any) -> Any:
    class Capturing(cls):  # type: ignore[misc, valid-type]
        def get_sensitivity(self, search_records: list) -> None:
            super().get_sensitivity(search_records)
            self.captured = {r.name: torch.as_tensor(r.sensitivity).clone() for r in search_records}

    return Capturing


class FailsOnRankOne(acps.SensitivityBase):
    def get_sensitivity(self, search_records: list) -> None:
        if self.model is not None and getattr(self, "rank", 0) == 1:
            raise RuntimeError("rank 1's plugin failed")
        for record in search_records:
            record.sensitivity = torch.ones(record.channels)


#: Every built-in sensitivity method, by a short name (``measured16``: on the first 16 samples of the union).
SENSITIVITIES = {"taylor": (TaylorLossSensitivity, {}), "normalized": (NormalizedTaylorSensitivity, {}),
                 "fisher": (FisherSensitivity, {}), "grouptaylor": (GroupTaylorSensitivity, {}),
                 "outchange": (OutputChangeSensitivity, {}), "l2norm": (BalancedL2NormSensitivity, {}),
                 "magnitude": (GroupMagnitudeSensitivity, {}), "measured": (MeasuredSensitivity, {}),
                 "measured16": (MeasuredSensitivity, {"max_samples": 16})}


def search(folder: Path, input_data: Any, method: str, rank: int = 0, fail: str = "",
           distributed: bool | None = None) -> dict[str, Any]:
    """One call of the public search; returns what the tests compare."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "search.cfg").write_text("compress_ratio: 1.6\nascend_optimized: false\ntest_iteration: 2\n")
    if fail == "plugin":
        sensitivity: Any = FailsOnRankOne()
        sensitivity.rank = rank
    else:
        cls, arguments = SENSITIVITIES[method]
        sensitivity = capturing(cls)(**arguments)
    result = acps.auto_channel_prune_search(model(), str(folder / "search.cfg"), input_data,
                                            str(folder / "prune.cfg"), sensitivity=sensitivity,
                                            distributed=distributed)
    return {"kept": result.kept_channels, "cost_after": result.cost_after, "notes": result.notes,
            "scores": getattr(sensitivity, "captured", {}),
            "files": sorted(p.name for p in folder.iterdir() if p.name != "search.cfg")}


def run(rank: int, world: int, init_file: str, folder: str, scenarios: list[tuple[str, str]], sizes: list[int],
        fail: str) -> None:
    """Run every ``(method, labels)`` scenario in turn in one process group; each rank saves its outcomes (one
    per scenario) to ``outcome<rank>.pt``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    out = Path(folder)
    outcomes = []
    for number, (method, labels) in enumerate(scenarios):
        mine = out / f"rank{rank}" / str(number)
        try:
            data = shard(rank, sizes[rank], labels)
            if fail == "data" and rank == world - 1:
                data[0][-1, 0, 0, 0] = SENTINEL  # the last sample: in this rank's second calibration pass
            if fail == "rank0-only":  # the DDP habit: only rank 0 searches, as a single process
                outcome: dict[str, Any] = (search(mine, data, method, distributed=False) if rank == 0
                                           else {"skipped": True})
            else:
                outcome = search(mine, data, method, rank, fail)
        except Exception as exc:
            outcome = {"error": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()}
        outcomes.append(outcome)
    torch.save(outcomes, out / f"outcome{rank}.pt")
    dist.destroy_process_group()
