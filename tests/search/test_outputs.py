"""The battery for the user's files: an output never destroys an input, every read is bounded, and one call's
outputs are one transaction that a kill, a crash or a second process cannot leave half done.

Three classes of case, each through the API and the command line:

1. an output that is (or resolves to) an input, or two outputs that are one file: an ``OutputPathError`` naming
   both roles before anything is written, every file as it was;
2. inputs that are not regular files or are far too large (a FIFO, ``/dev/zero``, a folder, a sparse file of
   gigabytes, random bytes): a clear error naming the file and the limit, quickly, never a hang;
3. kills at every step of a write (a real process killed with SIGKILL), two processes writing the same outputs
   and a reader beside them: a reader always sees one complete set, and no leftover stays.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import acps_core as acps
from acps_core._util.atomic import atomic_write_many, recover
from acps_core._util.files import inode
from acps_core.cli.main import EXIT_BAD_INPUT, EXIT_OK, main
from acps_core.errors import ArgumentError, ConfigError, DataError, OutputPathError
from tests.support import write_worker
from tests.support.model_snapshot import ModelSnapshot
from tests.support.write_worker import data, litter, model, set_ids

#: The model factory the command-line calls name.
WORKER_MODEL = "tests.support.write_worker:model"

ROOT = Path(__file__).resolve().parents[2]
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX files: links, FIFOs, devices, signals")


def folder_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.fixture
def searched(tmp_path: Path) -> Path:
    """A folder holding a search config, calibration data and a search's outputs (prune.cfg and its set)."""
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    torch.save(data(), tmp_path / "calib.pt")
    torch.save(model().state_dict(), tmp_path / "trained.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps.auto_channel_prune_search(model(), str(tmp_path / "search.cfg"), data(), str(tmp_path / "prune.cfg"))
    return tmp_path


def search(folder: Path, output: Any, config: Any = None, **kwargs: Any) -> acps.SearchResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acps.auto_channel_prune_search(model(), str(config or folder / "search.cfg"), data(), str(output),
                                              **kwargs)


# ------------------------------------------------------------------------------------------------------------
# 1. An output that is also an input
# ------------------------------------------------------------------------------------------------------------

def _link(target: Path, link: Path) -> Path:
    if not link.is_symlink():
        link.symlink_to(target)
    return link


def _hard_link(target: Path, link: Path) -> Path:
    if not link.exists():
        os.link(target, link)
    return link


API_COLLISIONS: dict[str, tuple[tuple[str, ...], Any]] = {
    "search: output_cfg is the search config": (
        ("output_cfg=", "is the same file as the input config="),
        lambda f: search(f, f / "search.cfg")),
    "search: output_cfg is the search config through '..'": (
        ("output_cfg=", "input config="),
        lambda f: search(f, f / "sub" / ".." / "search.cfg")),
    "search: output_cfg is a symbolic link to the search config": (
        ("output_cfg=", "input config="),
        lambda f: search(f, _link(f / "search.cfg", f / "out.cfg"))),
    "search: output_cfg is a hard link to the search config": (
        ("output_cfg=", "input config="),
        lambda f: search(f, _hard_link(f / "search.cfg", f / "out.cfg"))),
    "search: the selection file would be the search config": (
        ("output_cfg's selection file=", "input config="),
        lambda f: search(f, f / "x", config=_copy(f / "search.cfg", f / "x.selection"))),
    "search: output_cfg is the override file": (
        ("output_cfg=", "override_prune_cfg in the search config="),
        lambda f: search(f, f / "override.cfg", config=_override_config(f))),
    "search: a report would be the override file": (
        ("output_cfg's JSON report=", "override_prune_cfg in the search config="),
        lambda f: search(f, f / "o", config=_override_config(f, "o.report.json"))),
    "create: record_file is the config": (
        ("record_file=", "is the same file as the input config_defination="),
        lambda f: acps.create_prune_retrain_model(model(), data()[0][:2], f / "prune.cfg", f / "prune.cfg")),
    "create: record_file is the config's selection file": (
        ("record_file=", "the config's selection file="),
        lambda f: acps.create_prune_retrain_model(model(), data()[0][:2], f / "prune.cfg",
                                                  f / "prune.cfg.selection")),
    "create: record_file is a link to the config": (
        ("record_file=", "config_defination="),
        lambda f: acps.create_prune_retrain_model(model(), data()[0][:2], f / "prune.cfg",
                                                  _link(f / "prune.cfg", f / "r.record"))),
    "save: save_path is '.'": (("save_path='.'", "is a directory"),
                               lambda f: acps.save_prune_retrain_model(model(), ".", data()[0][:2])),
    "save: save_path is a folder with a slash": (
        ("save_path=", "ends with a slash, so it names a folder", "model.onnx"),
        lambda f: acps.save_prune_retrain_model(model(), str(f) + "/", data()[0])),
    "search: output_cfg holds a NUL character": (("output_cfg=", "NUL character"),
                                                 lambda f: search(f, str(f / "a\x00b.cfg"))),
    "search: output_cfg's name is too long": (("output_cfg=", "bytes long", "choose a shorter name"),
                                              lambda f: search(f, f / ("n" * 250 + ".cfg"))),
    "search: output_cfg's report name would be too long": (
        ("output_cfg's JSON report=", "choose a shorter name"), lambda f: search(f, f / ("n" * 218 + ".cfg"))),
}


def _copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    return target


def _override_config(folder: Path, name: str = "override.cfg") -> Path:
    (folder / name).write_text('regular_prune_skip_layers: "conv1"\n')
    (folder / "with_override.cfg").write_text(f'compress_ratio: 1.5\nascend_optimized: false\n'
                                              f'override_prune_cfg: "{name}"\n')
    return folder / "with_override.cfg"


@POSIX
@pytest.mark.parametrize("name", list(API_COLLISIONS))
def test_an_output_that_is_an_input_is_refused_before_anything_is_written(searched: Path, name: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    words, call = API_COLLISIONS[name]
    (searched / "sub").mkdir()
    monkeypatch.chdir(searched)
    with pytest.raises(OutputPathError) as info:
        call(searched)
    for text in words:
        assert text in str(info.value), f"{text!r} not in: {info.value}"
    before = folder_state(searched)
    with pytest.raises(OutputPathError):  # and a second time: nothing was written the first time either
        call(searched)
    assert folder_state(searched) == before
    assert not litter(searched)


CLI_COLLISIONS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "search --output is the calibration data": (
        ("--output=", "is the same file as the input --data="),
        ["search", "--model", WORKER_MODEL, "--data", "{f}/calib.pt", "--config", "{f}/search.cfg",
         "--output", "{f}/calib.pt"]),
    "search --output is --weights": (
        ("--output=", "--weights="),
        ["search", "--model", WORKER_MODEL, "--weights", "{f}/trained.pth", "--data", "{f}/calib.pt",
         "--config", "{f}/search.cfg", "--output", "{f}/trained.pth"]),
    "search --output is --config": (
        ("--output=", "--config="),
        ["search", "--model", WORKER_MODEL, "--data", "{f}/calib.pt", "--config", "{f}/search.cfg",
         "--output", "{f}/search.cfg"]),
    "prune --record is --config": (
        ("--record=", "is the same file as the input --config="),
        ["prune", "--model", WORKER_MODEL, "--data", "{f}/calib.pt", "--config", "{f}/prune.cfg",
         "--record", "{f}/prune.cfg"]),
    "prune --record is --config's selection file": (
        ("--record=", "--config's selection file="),
        ["prune", "--model", WORKER_MODEL, "--data", "{f}/calib.pt", "--config", "{f}/prune.cfg",
         "--record", "{f}/prune.cfg.selection"]),
    "prune --save is --record": (
        ("--record=", "--save=", "are the same file"),
        ["prune", "--model", WORKER_MODEL, "--data", "{f}/calib.pt", "--config", "{f}/prune.cfg",
         "--record", "{f}/p.record", "--save", "{f}/p.record"]),
    "prune --save in a missing folder (checked before the record is written)": (
        ("--save=", "does not exist"),
        ["prune", "--model", WORKER_MODEL, "--data", "{f}/calib.pt", "--config", "{f}/prune.cfg",
         "--record", "{f}/p.record", "--save", "{f}/nodir/p.pt"]),
    "restore --save is --record": (
        ("--save=", "--record="),
        ["restore", "--model", WORKER_MODEL, "--data", "{f}/calib.pt", "--config", "{f}/prune.cfg",
         "--record", "{f}/prune.cfg.selection", "--save", "{f}/prune.cfg.selection"]),
    "export --output is --weights": (
        ("--output (with .onnx added)=", "is the same file as the input --weights="),
        ["export", "--model", WORKER_MODEL, "--data", "{f}/calib.pt", "--config", "{f}/prune.cfg",
         "--record", "{f}/prune.cfg.selection", "--weights", "{f}/trained.onnx", "--output", "{f}/trained"]),
    "export --output is '.'": (
        ("--output='.'", "is a directory"),
        ["export", "--model", WORKER_MODEL, "--data", "{f}/calib.pt", "--config", "{f}/prune.cfg",
         "--record", "{f}/prune.cfg.selection", "--output", "."]),
}


@POSIX
@pytest.mark.parametrize("name", list(CLI_COLLISIONS))
def test_the_command_line_refuses_an_output_that_is_an_input(searched: Path, name: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    words, argv = CLI_COLLISIONS[name]
    (searched / "trained.onnx").write_bytes(b"weights")
    before = folder_state(searched)
    assert main([arg.replace("{f}", str(searched)) for arg in argv]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    for text in words:
        assert text in error, f"{text!r} not in: {error}"
    assert folder_state(searched) == before, "an input was overwritten or an output written"


@POSIX
def test_side_files_of_a_linked_output_go_beside_the_link_and_are_read_there(tmp_path: Path) -> None:
    (tmp_path / "search.cfg").write_text("compress_ratio: 2\nascend_optimized: false\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "real.cfg").write_text("# the link's target\n")
    link = _link(elsewhere / "real.cfg", tmp_path / "prune.cfg")
    result = search(tmp_path, link, sensitivity="GroupMagnitudeSensitivity", search_alg="GlobalRankSearch")
    assert link.is_symlink() and (elsewhere / "real.cfg").read_text().startswith("# Written by acps")
    assert (tmp_path / "prune.cfg.selection").is_file() and not (elsewhere / "real.cfg.selection").exists()
    assert result.selection_file == tmp_path / "prune.cfg.selection"
    pruned = acps.create_prune_retrain_model(model(), data()[0][:2], link, tmp_path / "p.record")
    # the selection beside the link was used: exactly the channels the search chose are gone
    kept = result.kept_channels
    assert pruned.conv2.out_channels == len(next(v for k, v in kept.items() if "conv2" in k))
    removed = acps.prune.read_record(tmp_path / "p.record")["conv2"]
    chosen = next(v for k, v in kept.items() if "conv2" in k)
    assert sorted(set(range(24)) - set(chosen)) == sorted(removed)


# ------------------------------------------------------------------------------------------------------------
# 2. Reads that are bounded and never block
# ------------------------------------------------------------------------------------------------------------

def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as stream:
        stream.truncate(size)
    return path


def _random_bytes(path: Path, seed: int) -> Path:
    path.write_bytes(torch.randint(1, 256, (4096,), generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.uint8).numpy().tobytes())
    return path


READS: dict[str, tuple[type[Exception], tuple[str, ...], Any]] = {
    "search config is a FIFO": (ConfigError, ("fifo.cfg: search config is a FIFO", "not a regular file"),
                                lambda f: search(f, f / "o.cfg", config=_fifo(f / "fifo.cfg"))),
    "override_prune_cfg is /dev/zero": (ConfigError, ("/dev/zero", "a device", "not a regular file"),
                                        lambda f: search(f, f / "o.cfg", config=_config_naming(f, "/dev/zero"))),
    "override_prune_cfg is a FIFO": (ConfigError, ("FIFO",),
                                     lambda f: search(f, f / "o.cfg", config=_config_naming(f, str(_fifo(
                                         f / "o.fifo"))))),
    "search config is a 3 GB sparse file": (ConfigError, ("over the 16777216 byte limit", "ACPS_MAX_CONFIG_BYTES"),
                                            lambda f: search(f, f / "o.cfg", config=_sparse(f / "big.cfg",
                                                                                            3 << 30))),
    "channel-prune config is a FIFO": (ConfigError, ("FIFO",), lambda f: acps.create_prune_retrain_model(
        model(), data()[0][:2], _fifo(f / "p.fifo"), f / "r.record")),
    "selection file is a FIFO": (ConfigError, ("prune.cfg.selection", "FIFO"),
                                 lambda f: _create_with_selection(f, _fifo)),
    "selection file is a 3 GB sparse file": (ConfigError, ("over the 268435456 byte limit",
                                                           "ACPS_MAX_RECORD_BYTES"),
                                             lambda f: _create_with_selection(f, lambda p: _sparse(p, 3 << 30))),
    "record file is a 3 GB sparse file": (ConfigError, ("big.record", "over the 268435456 byte limit"),
                                          lambda f: acps.restore_prune_retrain_model(
                                              model(), data()[0][:2], _sparse(f / "big.record", 3 << 30),
                                              f / "prune.cfg", f / "trained.pth")),
    "record file is /dev/zero": (ConfigError, ("/dev/zero", "a device"), lambda f: acps.prune.replay_prune_record(
        model(), data()[0][:2], "/dev/zero")),
    "record file is a folder": (ConfigError, ("is a directory",), lambda f: acps.prune.replay_prune_record(
        model(), data()[0][:2], f)),
    "checkpoint is a FIFO": (DataError, ("FIFO",), lambda f: _restore_with_checkpoint(f, _fifo(f / "w.fifo"))),
    "checkpoint is /dev/zero": (DataError, ("/dev/zero", "a device"),
                                lambda f: _restore_with_checkpoint(f, Path("/dev/zero"))),
    "checkpoint over a lowered data limit": (DataError, ("over the 1000 byte limit", "ACPS_MAX_DATA_BYTES"),
                                             lambda f: _with_env("ACPS_MAX_DATA_BYTES", "1000", lambda: (
                                                 _restore_with_checkpoint(f, f / "trained.pth")))),
    "a limit set to nonsense": (ArgumentError, ("ACPS_MAX_CONFIG_BYTES='lots'", "positive number of bytes"),
                                lambda f: _with_env("ACPS_MAX_CONFIG_BYTES", "lots",
                                                    lambda: search(f, f / "o.cfg"))),
}
for _seed in range(6):
    READS[f"search config of random bytes (seed {_seed})"] = (
        ConfigError, ("random.cfg",), lambda f, s=_seed: search(f, f / "o.cfg", config=_random_bytes(
            f / "random.cfg", s)))


def _config_naming(folder: Path, override: str) -> Path:
    (folder / "named.cfg").write_text(f'compress_ratio: 1.5\noverride_prune_cfg: "{override}"\n')
    return folder / "named.cfg"


def _create_with_selection(folder: Path, make: Any) -> Any:
    (folder / "prune.cfg.selection").unlink()
    make(folder / "prune.cfg.selection")
    return acps.create_prune_retrain_model(model(), data()[0][:2], folder / "prune.cfg", folder / "r.record")


def _restore_with_checkpoint(folder: Path, checkpoint: Path) -> Any:
    acps.create_prune_retrain_model(model(), data()[0][:2], folder / "prune.cfg", folder / "p.record")
    return acps.restore_prune_retrain_model(model(), data()[0][:2], folder / "p.record", folder / "prune.cfg",
                                            checkpoint)


def _with_env(name: str, value: str, call: Any) -> Any:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return call()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@POSIX
@pytest.mark.parametrize("name", list(READS))
def test_a_read_that_could_hang_or_exhaust_memory_is_a_quick_clear_error(searched: Path, name: str) -> None:
    error, words, call = READS[name]
    net = model()
    snapshot = ModelSnapshot.take(net)
    started = time.monotonic()
    with pytest.raises(error) as info:
        call(searched)
    assert time.monotonic() - started < 20, "a read took far too long"
    for text in words:
        assert text in str(info.value), f"{text!r} not in: {info.value}"
    snapshot.assert_same(net)
    assert not (searched / "o.cfg").exists() and not (searched / "r.record").exists()


@POSIX
def test_the_command_line_refuses_data_and_reports_that_are_not_regular_files(
        searched: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = _fifo(searched / "data.fifo")
    common = ["--model", WORKER_MODEL, "--config", str(searched / "search.cfg"), "--output",
              str(searched / "o.cfg")]
    for source in (str(fifo), "/dev/zero"):
        assert main(["search", "--data", source, *common]) == EXIT_BAD_INPUT
        assert "not a regular file" in capsys.readouterr().err
    assert main(["explain", "--report", "/dev/zero"]) == EXIT_BAD_INPUT
    assert "a device, not a regular file" in capsys.readouterr().err
    assert main(["explain", "--report", str(fifo)]) == EXIT_BAD_INPUT
    assert "FIFO" in capsys.readouterr().err
    assert not (searched / "o.cfg").exists()


def test_a_raised_limit_lets_a_large_config_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n" + "# note\n" * 400)
    monkeypatch.setenv("ACPS_MAX_CONFIG_BYTES", "1000")
    with pytest.raises(ConfigError, match="over the 1000 byte limit"):
        search(tmp_path, tmp_path / "prune.cfg")
    monkeypatch.setenv("ACPS_MAX_CONFIG_BYTES", "100000")
    assert search(tmp_path, tmp_path / "prune.cfg").output_cfg == tmp_path / "prune.cfg"


# ------------------------------------------------------------------------------------------------------------
# 3. One set: kills, a second writer, readers
# ------------------------------------------------------------------------------------------------------------

def _worker(*args: str, timeout: float = 600) -> list[dict[str, Any]]:
    result = subprocess.run([sys.executable, "-m", "tests.support.write_worker", *args], cwd=ROOT, capture_output=True,
                            text=True, check=False, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@POSIX
@pytest.mark.slow
@pytest.mark.parametrize("how", ["search", "search-through-link"])
def test_a_search_killed_at_any_step_leaves_a_reader_one_complete_set_and_no_litter(tmp_path: Path,
                                                                                    how: str) -> None:
    lines = _worker("kill", str(tmp_path), how)
    kills, last = lines[:-1], lines[-1]
    assert last["steps"] == len(kills) >= 20, "the write has fewer steps than expected: is the count armed?"
    old_ids = {name for kill in kills for name in [kill["ids_before_reading"]["prune.cfg"]]}
    seen = {"old": 0, "new": 0}
    for kill in kills:
        ids = kill["ids"]
        assert len(set(ids.values())) == 1 and None not in ids.values(), kill  # all five files, one set
        seen["old" if ids["prune.cfg"] in old_ids and ids["prune.cfg"] == kills[0]["ids"]["prune.cfg"]
             else "new"] += 1
        assert kill["litter_after_reading"] == [], kill
    assert seen["old"] and seen["new"], seen  # killed before the commit point, and after it
    assert last["finished"]["litter"] == []
    assert any(kill["litter"] for kill in kills), "no kill ever left anything to clean up: is the test killing?"


@POSIX
@pytest.mark.slow
@pytest.mark.parametrize("where", ["prune", "prune-two-folders"])
def test_acps_prune_killed_at_any_step_leaves_the_record_and_the_saved_model_of_one_run(tmp_path: Path,
                                                                                        where: str) -> None:
    lines = _worker("kill", str(tmp_path), where)
    kills, last = lines[:-1], lines[-1]
    assert last["steps"] == len(kills) >= 10
    first, finished = kills[0], last["finished"]
    assert first["record"] != finished["record"] and first["saved_conv2"] != finished["saved_conv2"]
    pairs = {(first["record"], first["saved_conv2"]), (finished["record"], finished["saved_conv2"])}
    for kill in kills:
        assert (kill["record"], kill["saved_conv2"]) in pairs, kill  # never one run's record with another's model
        assert kill["litter_after_reading"] == [], kill
    assert {(k["record"], k["saved_conv2"]) for k in kills} == pairs  # both outcomes happen


@POSIX
@pytest.mark.slow
def test_two_processes_writing_the_same_outputs_and_a_reader_never_mix(tmp_path: Path) -> None:
    write_worker.search(tmp_path, 2.0)
    command = [sys.executable, "-m", "tests.support.write_worker"]
    workers = [subprocess.Popen([*command, "search", str(tmp_path), ratio, "6"], cwd=ROOT, stderr=subprocess.PIPE,
                                text=True) for ratio in ("1.5", "2.5")]
    workers.append(subprocess.Popen([*command, "read", str(tmp_path), "12"], cwd=ROOT, stderr=subprocess.PIPE,
                                    text=True))
    for worker in workers:
        _, error = worker.communicate(timeout=600)
        assert worker.returncode == 0, error  # the reader never met a selection of another search
    ids = set_ids(tmp_path)
    assert len(set(ids.values())) == 1 and None not in ids.values(), ids
    assert litter(tmp_path) == []


def test_a_search_without_the_figure_removes_the_figure_of_an_earlier_one(tmp_path: Path) -> None:
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    search(tmp_path, tmp_path / "prune.cfg", figure=True)
    assert (tmp_path / "prune.cfg.report.png").is_file()
    result = search(tmp_path, tmp_path / "prune.cfg")
    assert not (tmp_path / "prune.cfg.report.png").exists()
    ids = set_ids(tmp_path)
    assert ids.pop("prune.cfg.report.png") is None and set(ids.values()) == {result.output_set}


def _journal(copies: dict[Path, list[dict[str, Any]]], folders: list[Path] | None = None,
             name: str = ".a.cfg.feedbeef.acps-journal") -> None:
    """Write the journal copies a killed write would have left: per folder, its own steps by file name."""
    every = [os.path.realpath(f) for f in (folders or list(copies))]
    for folder, steps in copies.items():
        for step in steps:
            step.setdefault("old", None)
            step["temp_inode"] = inode(folder / step["temp"]) if step.get("temp") else None
        (folder / name).write_text(json.dumps({"acps_journal": 2, "folders": every, "steps": steps}))


def test_leftovers_of_a_killed_write_are_cleaned_and_a_committed_journal_finished(tmp_path: Path) -> None:
    (tmp_path / "a.cfg").write_text("old a\n")
    (tmp_path / "b.cfg").write_text("old b\n")
    (tmp_path / ".a.cfg.0123abcd.acps-tmp").write_text("new a\n")
    (tmp_path / ".b.cfg.4567cdef.acps-tmp").write_text("new b\n")
    os.link(tmp_path / "a.cfg", tmp_path / ".a.cfg.89abcdef.acps-old")
    (tmp_path / ".x.cfg.00000000.acps-tmp").write_text("a temporary file of a write that never committed\n")
    _journal({tmp_path: [{"target": "a.cfg", "temp": ".a.cfg.0123abcd.acps-tmp", "old": ".a.cfg.89abcdef.acps-old"},
                         {"target": "b.cfg", "temp": ".b.cfg.4567cdef.acps-tmp"}]})
    os.replace(tmp_path / ".a.cfg.0123abcd.acps-tmp", tmp_path / "a.cfg")  # killed after the first step
    recover(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.cfg": "new a\n", "b.cfg": "new b\n"}


def test_a_journal_whose_files_were_cleaned_elsewhere_is_undone_not_half_finished(tmp_path: Path) -> None:
    """A kill between the journal copies of two folders (no file was replaced yet): the folder without a copy
    lost its temporary files to a later cleanup, so the write cannot be finished, and it is dropped."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "r.record").write_text("old record\n")
    (one / ".r.record.0123abcd.acps-tmp").write_text("new record\n")
    os.link(one / "r.record", one / ".r.record.89abcdef.acps-old")
    (two / ".p.pt.4567cdef.acps-tmp").write_text("new model\n")
    (two / "p.pt").write_text("old model\n")
    _journal({one: [{"target": "r.record", "temp": ".r.record.0123abcd.acps-tmp",
                     "old": ".r.record.89abcdef.acps-old"}]}, [one, two], ".r.record.feedbeef.acps-journal")
    recover(two)  # no journal copy there: its temporary file looks like any leftover
    recover(one)
    assert (one / "r.record").read_text() == "old record\n" and (two / "p.pt").read_text() == "old model\n"
    assert litter(one) == [] and litter(two) == []


def test_a_folder_copied_after_a_kill_recovers_itself_and_leaves_the_original_alone(tmp_path: Path) -> None:
    import shutil

    first = tmp_path / "first"
    first.mkdir()
    for name in ("a.cfg", "b.cfg"):
        (first / name).write_text(f"old {name}\n")
        (first / f".{name}.0123abcd.acps-tmp").write_text(f"new {name}\n")
    _journal({first: [{"target": "a.cfg", "temp": ".a.cfg.0123abcd.acps-tmp"},
                      {"target": "b.cfg", "temp": ".b.cfg.0123abcd.acps-tmp"}]})
    shutil.copytree(first, tmp_path / "copy")
    recover(tmp_path / "copy")
    assert {p.name: p.read_text() for p in (tmp_path / "copy").iterdir()} == {"a.cfg": "new a.cfg\n",
                                                                             "b.cfg": "new b.cfg\n"}
    assert (first / "a.cfg").read_text() == "old a.cfg\n" and len(litter(first)) == 3  # untouched


@pytest.mark.parametrize("journal", [
    {"acps_journal": 2, "folders": ["{f}"], "steps": [{"target": "{victim}", "temp": ".x.11111111.acps-tmp",
                                                       "old": None, "temp_inode": None}]},
    {"acps_journal": 2, "folders": ["{f}"], "steps": [{"target": "../home/notes.txt", "temp": None, "old": None,
                                                       "temp_inode": None}]},
    {"acps_journal": 2, "folders": ["{f}"], "steps": [{"target": "x", "temp": "../home/notes.txt", "old": None,
                                                       "temp_inode": None}]},
    {"acps_journal": 2, "folders": ["{f}"], "steps": []},
    "[" * 100000,
], ids=["absolute target", "target outside", "temporary file outside", "no steps", "nested too deep"])
def test_a_journal_never_touches_a_file_outside_its_folder(tmp_path: Path, journal: Any) -> None:
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    (home / "notes.txt").write_text("mine\n")
    (project / ".x.11111111.acps-tmp").write_text("echo pwned\n")
    text = journal if isinstance(journal, str) else json.dumps(journal)
    text = text.replace("{f}", str(project)).replace("{victim}", str(home / "notes.txt"))
    (project / ".x.deadbeef.acps-journal").write_text(text)
    (project / ".notes.acps-tmp").write_text("the user's own file, not named as acps names its files\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search(project, project / "prune.cfg", config=_write_config(project))
    assert (home / "notes.txt").read_text() == "mine\n"
    assert (project / ".x.deadbeef.acps-journal").exists()  # not ours: left alone
    assert (project / ".notes.acps-tmp").exists()


def _write_config(folder: Path) -> Path:
    (folder / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    return folder / "search.cfg"


def test_a_write_spanning_a_folder_another_process_holds_waits_for_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fcntl = pytest.importorskip("fcntl")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / ".r.record.0123abcd.acps-tmp").write_text("new record\n")
    (two / "p.pt").write_text("old model\n")
    _journal({one: [{"target": "r.record", "temp": ".r.record.0123abcd.acps-tmp"}],
              two: [{"target": "p.pt", "temp": None}]}, name=".r.record.feedbeef.acps-journal")
    holder = os.open(two, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(OutputPathError, match=r"an interrupted write of .*r\.record is still to be finished"):
            atomic_write_many({one / "r.record": "newer\n"})
        assert (one / ".r.record.0123abcd.acps-tmp").exists()  # kept for the journal
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    atomic_write_many({one / "r.record": "newer\n"})  # the journal is finished first, then the new write
    assert (one / "r.record").read_text() == "newer\n" and not (two / "p.pt").exists()
    assert litter(one) == [] and litter(two) == []


def test_a_write_meets_no_leftovers_of_other_writes_and_leaves_none(tmp_path: Path) -> None:
    (tmp_path / ".prune.cfg.deadbeef.acps-tmp").write_text("half written")
    atomic_write_many({tmp_path / "prune.cfg": "new\n", tmp_path / "prune.cfg.selection": "sel\n"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune.cfg", "prune.cfg.selection"]


def test_a_selection_of_another_search_is_refused(searched: Path) -> None:
    other = searched / "other"
    other.mkdir()
    search(searched, other / "prune.cfg")
    (searched / "prune.cfg.selection").write_bytes((other / "prune.cfg.selection").read_bytes())
    with pytest.raises(ConfigError, match=r"prune\.cfg\.selection:3: prune\.cfg\.selection belongs to another "
                                          r"search .* search again, or delete the selection file"):
        acps.create_prune_retrain_model(model(), data()[0][:2], searched / "prune.cfg", searched / "r.record")
    assert not (searched / "r.record").exists()


def test_a_second_writer_waits_for_the_lock_or_fails_with_a_clear_error(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fcntl = pytest.importorskip("fcntl")
    holder = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process writing in the folder
    monkeypatch.setenv("ACPS_LOCK_TIMEOUT", "0.3")
    try:
        with pytest.raises(OutputPathError, match=r"another process has been writing in .* for over 0\.3 s"):
            atomic_write_many({tmp_path / "a.cfg": "a\n"})
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    atomic_write_many({tmp_path / "a.cfg": "a\n"})
    assert (tmp_path / "a.cfg").read_text() == "a\n"


def test_the_command_line_writes_the_figure_with_the_set(searched: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    assert main(["search", "--model", WORKER_MODEL, "--data", str(searched / "calib.pt"), "--config",
                 str(searched / "search.cfg"), "--output", str(searched / "cli.cfg"), "--quiet"]) == EXIT_OK
    ids = {name: value for name, value in set_ids(searched).items()}
    assert ids  # the fixture's set
    names = ["cli.cfg", "cli.cfg.selection", "cli.cfg.report.md", "cli.cfg.report.json", "cli.cfg.report.png"]
    for name in names:
        assert (searched / name).is_file(), name
    png = (searched / "cli.cfg.report.png").read_bytes()
    config_set = (searched / "cli.cfg").read_text().split("# acps output set: ")[1].split()[0]
    assert f"acps output set {config_set}".encode() in png


# ------------------------------------------------------------------------------------------------------------
# Found by trying to break the guarantees above
# ------------------------------------------------------------------------------------------------------------

@POSIX
def test_a_figure_path_that_links_to_an_input_is_refused_and_a_linked_figure_goes_by_itself(tmp_path: Path) -> None:
    config = _write_config(tmp_path)
    (tmp_path / "prune.cfg.report.png").symlink_to(config)
    with pytest.raises(OutputPathError, match=r"output_cfg's figure \(removed, as figure=False\)=.* is the same "
                                              r"file as the input config="):
        search(tmp_path, tmp_path / "prune.cfg")
    assert config.read_text().startswith("compress_ratio")
    (tmp_path / "prune.cfg.report.png").unlink()
    elsewhere = tmp_path / "thesis.png"
    elsewhere.write_bytes(b"the user's picture")
    (tmp_path / "prune.cfg.report.png").symlink_to(elsewhere)
    search(tmp_path, tmp_path / "prune.cfg")  # the figure of an earlier search is removed: here, only the link
    assert not os.path.lexists(tmp_path / "prune.cfg.report.png")
    assert elsewhere.read_bytes() == b"the user's picture"


@POSIX
@pytest.mark.parametrize("kind", ["FIFO", "link to /dev/zero", "folder"])
def test_a_file_named_like_a_journal_that_is_not_one_never_blocks_or_is_removed(tmp_path: Path, kind: str) -> None:
    name = tmp_path / ".prune.cfg.deadbeef.acps-journal"
    if kind == "FIFO":
        os.mkfifo(name)
    elif kind == "folder":
        name.mkdir()
    else:
        name.symlink_to("/dev/zero")
    started = time.monotonic()
    search(tmp_path, tmp_path / "prune.cfg", config=_write_config(tmp_path))
    assert time.monotonic() - started < 30 and os.path.lexists(name)


@POSIX
@pytest.mark.parametrize("how", ["symlinked folder", "'..'"])
def test_outputs_reached_through_a_symlinked_folder_or_dots_are_written_and_recovered(tmp_path: Path,
                                                                                     how: str) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (real / "sub").mkdir()
    folder = tmp_path / "link" if how == "symlinked folder" else real / "sub" / ".."
    config = _write_config(real)
    search(tmp_path, folder / "prune.cfg", config=config)
    ids = set_ids(real)
    assert None not in ids.values() or ids["prune.cfg.report.png"] is None
    assert litter(real) == [] and litter(real / "sub") == []
    pruned = acps.create_prune_retrain_model(model(), data()[0][:2], folder / "prune.cfg", folder / "p.record")
    assert (real / "p.record").is_file() and pruned.conv2.out_channels < 24


@POSIX
def test_the_command_line_guards_the_model_source_the_onnx_name_and_meta_data(
        searched: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(searched)
    (searched / "net.py").write_text("from tests.support.write_worker import model\n")
    monkeypatch.syspath_prepend(str(searched))
    source = (searched / "net.py").read_bytes()
    argv = ["prune", "--model", "net:model", "--data", "calib.pt", "--config", "prune.cfg"]
    assert main([*argv, "--record", "net.py"]) == EXIT_BAD_INPUT
    assert "is the same file as the input --model's source file=" in capsys.readouterr().err
    assert (searched / "net.py").read_bytes() == source
    # --output .onnx writes .onnx.onnx, which is checked against the inputs
    (searched / ".onnx.onnx").write_bytes((searched / "calib.pt").read_bytes())
    assert main(["export", "--model", "net:model", "--data", ".onnx.onnx", "--config", "prune.cfg", "--record",
                 "prune.cfg.selection", "--output", ".onnx"]) == EXIT_BAD_INPUT
    assert "--output (with .onnx added)='.onnx.onnx' is the same file as the input --data" in capsys.readouterr().err
    torch.save([torch.empty(4, 3, 8, 8, device="meta"), torch.zeros(4, dtype=torch.long)], searched / "meta.pt")
    for command in (["search", "--output", "o.cfg", "--config", "search.cfg"],
                    ["prune", "--record", "r.record", "--config", "prune.cfg"]):
        assert main([command[0], "--model", "net:model", "--data", "meta.pt", *command[1:]]) == EXIT_BAD_INPUT
        assert "meta device" in capsys.readouterr().err


def test_the_command_line_refuses_a_damaged_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for content in ('{"report_format": 1, "layers": [5]}',
                    '{"report_format": 1, "layers": [{"name": "a", "status": "unprunable", "reason": 5}]}'):
        (tmp_path / "r.json").write_text(content)
        assert main(["explain", "--report", str(tmp_path / "r.json")]) == EXIT_BAD_INPUT
        assert "layers[0] is not a layer entry" in capsys.readouterr().err


@pytest.mark.parametrize(("call", "parameter"), [
    (lambda f: acps.create_prune_retrain_model(model(), data()[0][:2], f / "prune.cfg", None), "record_file"),
    (lambda f: acps.create_prune_retrain_model(model(), data()[0][:2], 3, f / "r.record"), "config_defination"),
    (lambda f: acps.save_prune_retrain_model(model(), None, data()[0][:2]), "save_path"),
    (lambda f: acps.prune.replay_prune_record(model(), data()[0][:2], None), "record_file"),
    (lambda f: acps.restore_prune_retrain_model(model(), data()[0][:2], f / "p", f / "prune.cfg", None), "pth_file"),
    (lambda f: acps.restore_prune_retrain_model(model(), data()[0][:2], f / "p", None, f / "w"),
     "config_defination"),
], ids=["record_file None", "config 3", "save_path None", "replay record None", "pth_file None", "config None"])
def test_a_path_argument_of_the_wrong_type_is_an_argument_error(searched: Path, call: Any, parameter: str) -> None:
    with pytest.raises(ArgumentError, match=f"{parameter} must be a file path"):
        call(searched)


@POSIX
def test_file_names_with_a_newline_keep_every_file_readable(tmp_path: Path) -> None:
    config = _write_config(tmp_path)
    output = tmp_path / "odd\nname.cfg"
    search(tmp_path, output, config=config)
    pruned = acps.create_prune_retrain_model(model(), data()[0][:2], output, tmp_path / "odd\nname.record")
    replayed = acps.prune.replay_prune_record(model(), data()[0][:2], tmp_path / "odd\nname.record")
    assert replayed.conv2.out_channels == pruned.conv2.out_channels < 24


def test_ctrl_c_on_the_command_line_is_one_line_and_exit_code_130(searched: Path, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import acps_core.search.run

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(acps_core.search.run, "score", interrupted)
    before = folder_state(searched)
    assert main(["search", "--model", WORKER_MODEL, "--data", str(searched / "calib.pt"), "--config",
                 str(searched / "search.cfg"), "--output", str(searched / "prune.cfg")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("acps: interrupted") and "Traceback" not in err
    assert folder_state(searched) == before


def test_nonsense_in_the_lock_timeout_or_the_demo_ratio_is_refused_up_front(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACPS_LOCK_TIMEOUT", "nan")
    with pytest.raises(ArgumentError, match=r"ACPS_LOCK_TIMEOUT='nan' must be a number of seconds"):
        atomic_write_many({tmp_path / "a.cfg": "a\n"})
    monkeypatch.delenv("ACPS_LOCK_TIMEOUT")
    started = time.monotonic()
    assert main(["demo", "--out", str(tmp_path / "demo"), "--ratio", "0.5"]) == EXIT_BAD_INPUT
    assert "--ratio 0.5 is not a compress ratio" in capsys.readouterr().err
    assert time.monotonic() - started < 5 and not (tmp_path / "demo").exists()
