"""Processes for the tests of the output transactions (tests/search/test_outputs.py), run as ``python -m
tests.support.write_worker MODE FOLDER [...]``:

- ``kill FOLDER``: for k = 1, 2, ... a forked process runs a search (or ``acps prune``) writing into FOLDER and
  kills itself with SIGKILL just before its k-th file-system step (a call of os.open, os.fsync, os.replace,
  os.rename, os.link, os.remove or os.unlink) inside the transaction or the recovery; after each kill this
  process checks what a reader then sees, and puts the old set back. Prints one JSON line per kill.
- ``search FOLDER RATIO COUNT``: COUNT searches at compress_ratio RATIO into FOLDER/prune.cfg (with the figure).
- ``read FOLDER COUNT``: COUNT times, create_prune_retrain_model from FOLDER/prune.cfg (and its selection).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import acps_core as acps
from acps_core._util import atomic, locks
from acps_core.config.selection import read_header

STEPS = ("open", "fsync", "replace", "rename", "link", "remove", "unlink")
SET_FILES = ("prune.cfg", "prune.cfg.selection", "prune.cfg.report.md", "prune.cfg.report.json",
             "prune.cfg.report.png")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x))))).mean((2, 3)))


def model() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def data() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator)]


def search(folder: Path, ratio: float, output: Path | None = None) -> acps.SearchResult:
    """A search at ``ratio`` writing ``folder/prune.cfg`` (or ``output``) and its set, the figure included."""
    (folder / f"search{ratio:g}.cfg").write_text(f"compress_ratio: {ratio:g}\nascend_optimized: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acps.auto_channel_prune_search(model(), str(folder / f"search{ratio:g}.cfg"), data(),
                                              str(output or folder / "prune.cfg"),
                                              sensitivity="GroupMagnitudeSensitivity", search_alg="GlobalRankSearch",
                                              figure=True)


def set_ids(folder: Path) -> dict[str, str | None]:
    """The output set each file of a search's set names (None: the file is missing or names none)."""
    ids: dict[str, str | None] = {}
    for name in SET_FILES:
        path = folder / name
        if not path.exists():
            ids[name] = None
        elif name.endswith(".json"):
            ids[name] = json.loads(path.read_text())["output_set"]
        elif name.endswith(".png"):
            found = re.search(rb"acps output set (\d{8}T\d{6}Z-[0-9a-f]{8})", path.read_bytes())
            ids[name] = found.group(1).decode() if found else None
        elif name.endswith(".md"):
            text = path.read_text()
            ids[name] = text.split("(output set `")[1].split("`")[0] if "(output set `" in text else None
        else:
            ids[name] = read_header(path.read_text()).output_set
    return ids


def litter(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".acps-" in p.name) if folder.is_dir() else []


def arm(kill_at: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make every file-system step inside a transaction or a recovery count, and the ``kill_at``-th one kill
    this process (SIGKILL: no cleanup of any kind runs)."""
    count = [0]
    depth = [0]
    for name in STEPS:
        real = getattr(os, name)

        def step(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            if depth[0]:
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)

        setattr(os, name, step)

    def counted(function: Callable[..., Any]) -> Callable[..., Any]:
        def inside(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
        return inside

    atomic._transaction = counted(atomic._transaction)
    locks.recover = counted(locks.recover)
    return counted


def kill_each_step(folder: Path, what: str) -> None:
    """See the module docs; ``what`` is "search" or "prune" (a record and a saved model written as one set)."""
    torch.set_num_threads(1)  # no thread pool: forking below is safe
    work = folder / "work"
    pristine = folder / "pristine"
    work.mkdir()
    # "search-through-link": the output named through a symbolic link to the folder
    named = folder / "link" if what == "search-through-link" else work
    if named != work:
        named.symlink_to(work)
    search(work, 1.5)  # the old set
    if what.startswith("prune"):
        from acps_core.cli.main import main

        saved = work / "models" / "p.pt" if what == "prune-two-folders" else work / "p.pt"
        saved.parent.mkdir(exist_ok=True)
        base = ["prune", "--model", "tests.support.write_worker:model", "--data", str(work / "calib.pt"), "--config",
                str(work / "prune.cfg"), "--record", str(work / "p.record"), "--save", str(saved)]
        torch.save(data()[0], work / "calib.pt")
        assert main([*base, "--quiet"]) == 0  # the old record and model
        search(work, 2.5)  # the config the forked processes prune with: a new record and model
    shutil.copytree(work, pristine)
    kill_at = 1
    while True:
        pid = os.fork()
        if pid == 0:
            try:
                arm(kill_at)
                if what.startswith("search"):
                    search(work, 3.0, named / "prune.cfg")
                else:
                    main([*base, "--quiet"])
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        if not os.WIFSIGNALED(status):
            break  # every step was reached: this run finished
        print(json.dumps({"kill_at": kill_at, **after_kill(work, what, named)}), flush=True)
        shutil.rmtree(work)
        shutil.copytree(pristine, work)
        kill_at += 1
    print(json.dumps({"steps": kill_at - 1, "finished": after_kill(work, what, named)}), flush=True)


def after_kill(work: Path, what: str, named: Path) -> dict[str, Any]:
    """What the folder holds after a kill, and what a reader (through ``named``) then sees."""
    raw = {"litter": litter(work)}
    if what.startswith("search"):
        raw["ids_before_reading"] = set_ids(work)
        record = work.parent / "reader.record"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acps.create_prune_retrain_model(model(), data()[0][:2], named / "prune.cfg", record)  # recovers first
        record.unlink()
        return {**raw, "ids": set_ids(work), "litter_after_reading": litter(work)}
    from acps_core._util.atomic import locked_folders

    models = work / "models"
    raw["litter"] += litter(models)
    with locked_folders([work, models] if models.is_dir() else [work]):  # what the next acps prune does first
        pass
    saved = models / "p.pt" if (models / "p.pt").exists() else work / "p.pt"
    pruned = torch.load(saved, weights_only=False)
    return {**raw, "litter_after_reading": litter(work) + litter(models), "record": (work / "p.record").read_text(),
            "saved_conv2": int(pruned.conv2.out_channels)}


def main_entry(argv: list[str]) -> None:
    mode, folder = argv[0], Path(argv[1])
    if mode == "kill":
        kill_each_step(folder, argv[2])
    elif mode == "search":
        for _ in range(int(argv[3])):
            search(folder, float(argv[2]))
    elif mode == "read":
        for _ in range(int(argv[2])):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                acps.create_prune_retrain_model(model(), data()[0][:2], folder / "prune.cfg",
                                                folder / f"read{os.getpid()}.record")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main_entry(sys.argv[1:])
