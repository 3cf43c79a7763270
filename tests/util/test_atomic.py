"""Atomic output writes (acps_core._util.atomic): a failure never damages an existing file or leaves litter."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from acps_core._util import atomic
from acps_core._util.atomic import atomic_write_many, atomic_write_text, check_writable_output
from acps_core.errors import OutputPathError

OLD = b"compress_ratio: 1.5\n"


@pytest.fixture
def existing(tmp_path: Path) -> Path:
    """A folder holding one file with known bytes, the state every failure must leave behind."""
    path = tmp_path / "out.cfg"
    path.write_bytes(OLD)
    return path


def test_creates_a_new_file(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "new.cfg", "prune_config {}\n")
    assert (tmp_path / "new.cfg").read_text(encoding="utf-8") == "prune_config {}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.cfg"]


def test_replaces_an_existing_file(existing: Path) -> None:
    atomic_write_text(existing, "compress_ratio: 2\n")
    assert existing.read_text(encoding="utf-8") == "compress_ratio: 2\n"
    assert list(existing.parent.iterdir()) == [existing]


def test_failed_replace_keeps_the_old_bytes_and_removes_the_temporary_file(
        existing: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_replace(source: object, target: object) -> None:
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OutputPathError, match=r"cannot replace .*out\.cfg.*Permission denied") as error:
        atomic_write_text(existing, "new content\n")
    assert error.value.errno == 13
    assert existing.read_bytes() == OLD
    assert list(existing.parent.iterdir()) == [existing]


def test_failed_fsync_keeps_the_old_bytes_and_removes_the_temporary_file(
        existing: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OutputPathError, match=r"cannot write .*No space left on device.*free disk space"):
        atomic_write_text(existing, "new content\n")
    assert existing.read_bytes() == OLD
    assert list(existing.parent.iterdir()) == [existing]


def test_interrupt_during_replace_cleans_up(existing: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(source: object, target: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(existing, "new content\n")
    assert existing.read_bytes() == OLD
    assert list(existing.parent.iterdir()) == [existing]


def test_unencodable_text_touches_nothing(existing: Path) -> None:
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(existing, "layer_name: \"conv\u00e9\"\n", encoding="ascii")
    assert existing.read_bytes() == OLD
    assert list(existing.parent.iterdir()) == [existing]


def test_many_writes_nothing_when_one_file_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a.cfg", tmp_path / "b.cfg"
    first.write_bytes(b"old a\n")
    second.write_bytes(b"old b\n")
    real_write_temp = atomic._write_temp
    calls = []

    def fail_second(target: Path, data: bytes, what: str) -> Path:
        calls.append(target)
        if len(calls) == 2:
            raise OutputPathError("disk full")
        return real_write_temp(target, data, what)

    monkeypatch.setattr(atomic, "_write_temp", fail_second)
    with pytest.raises(OutputPathError, match="disk full"):
        atomic_write_many({first: "new a\n", second: "new b\n"})
    assert (first.read_bytes(), second.read_bytes()) == (b"old a\n", b"old b\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.cfg", "b.cfg"]


def test_many_writes_every_file(tmp_path: Path) -> None:
    atomic_write_many({tmp_path / "a.cfg": "a\n", os.fspath(tmp_path / "b.json"): "{}\n"})
    assert (tmp_path / "a.cfg").read_text(encoding="utf-8") == "a\n"
    assert (tmp_path / "b.json").read_text(encoding="utf-8") == "{}\n"


def test_many_rejects_two_names_for_one_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputPathError, match="two outputs name the same file"):
        atomic_write_many({tmp_path / "a.cfg": "1", tmp_path / "sub" / ".." / "a.cfg": "2"})
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]


@pytest.mark.parametrize("failure", [OSError(5, "Input/output error"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_second_replace_puts_the_first_file_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException) -> None:
    (tmp_path / "a.cfg").write_text("old a\n")
    real_replace = os.replace
    calls = []

    def fail_second(source: str, target: str) -> None:
        calls.append(target)
        if len(calls) == 2:
            raise failure
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", fail_second)
    expected = OutputPathError if isinstance(failure, OSError) else KeyboardInterrupt
    words = r"cannot replace .*c\.cfg \(no output was changed\)" if expected is OutputPathError else None
    with pytest.raises(expected, match=words):
        atomic_write_many({tmp_path / "a.cfg": "a\n", tmp_path / "c.cfg": "c\n", tmp_path / "d.cfg": "d\n"})
    # a.cfg got its old content back; c.cfg and d.cfg were never there; no temporary or backup file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.cfg"]
    assert (tmp_path / "a.cfg").read_text() == "old a\n"


def test_a_failure_after_new_files_removes_them_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def fail_on_b(source: str, target: str) -> None:
        if str(target).endswith("b.cfg"):
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", fail_on_b)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_many({tmp_path / "a.cfg": "a\n", tmp_path / "b.cfg": "b\n"})
    assert list(tmp_path.iterdir()) == []


def test_directory_target_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match=r"is a directory, not a file; give a file path inside it"):
        atomic_write_text(tmp_path, "x")


def test_missing_folder_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match=r"the folder of .* does not exist: .*missing.*create it first"):
        atomic_write_text(tmp_path / "missing" / "out.cfg", "x")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_existing_file_keeps_its_permissions(existing: Path) -> None:
    existing.chmod(0o640)
    atomic_write_text(existing, "new\n")
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX umask")
def test_new_file_follows_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new.cfg", "x\n")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "new.cfg").stat().st_mode) == 0o640


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_symlink_is_written_through(existing: Path) -> None:
    link = existing.parent / "link.cfg"
    link.symlink_to(existing.name)
    atomic_write_text(link, "via link\n")
    assert link.is_symlink()
    assert existing.read_text(encoding="utf-8") == "via link\n"


# ------------------------------------------------------------------------------------------------------------
# check_writable_output
# ------------------------------------------------------------------------------------------------------------


def test_check_returns_the_absolute_path_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_writable_output("out.cfg", "output_cfg") == tmp_path / "out.cfg"
    assert list(tmp_path.iterdir()) == []


def test_check_rejects_a_directory_naming_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match=r"output_cfg='.*' is a directory, not a file; give a file path "
                                              r"inside it, e\.g\. '.*channel_prune\.cfg'"):
        check_writable_output(tmp_path, "output_cfg")


def test_check_rejects_a_missing_folder(tmp_path: Path) -> None:
    target = tmp_path / "results" / "out.cfg"
    expected = r"the folder of output_cfg='.*out\.cfg' does not exist: .*results; create it first"
    with pytest.raises(OutputPathError, match=expected):
        check_writable_output(target, "output_cfg")


def test_check_rejects_an_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: the tests may run as root, for whom chmod cannot make a folder unwritable.
    def read_only(path: object, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputPathError, match=r"cannot create files in the folder of output_cfg=.*Permission "
                                              r"denied; choose a writable folder") as error:
        check_writable_output(tmp_path / "out.cfg", "output_cfg")
    assert isinstance(error.value, OSError)


def test_check_rejects_an_empty_path() -> None:
    with pytest.raises(OutputPathError, match=r"output_cfg is an empty path"):
        check_writable_output("", "output_cfg")


def test_a_file_that_cannot_go_back_is_kept_and_named_and_the_next_call_puts_it_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a.cfg", "b.cfg", "c.cfg"):
        (tmp_path / name).write_text(f"old {name}\n")
    real_replace = os.replace

    def replace(source: str, target: str) -> None:
        source_name = os.path.basename(str(source))
        if str(target).endswith("c.cfg") and source_name.endswith(".acps-tmp"):
            raise OSError(28, "No space left on device")  # writing c fails
        if str(target).endswith("b.cfg") and source_name.endswith(".acps-old"):
            raise OSError(5, "Input/output error")  # and putting b back fails too
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputPathError, match=r"could not be put back; it is kept in .*\.b\.cfg\.[0-9a-f]{8}\.acps-old"
                                              r", and the next acps call .* puts it back"):
        atomic_write_many({tmp_path / n: f"new {n}\n" for n in ("a.cfg", "b.cfg", "c.cfg")})
    assert (tmp_path / "a.cfg").read_text() == "old a.cfg\n"  # put back
    assert (tmp_path / "c.cfg").read_text() == "old c.cfg\n"  # never replaced
    backups = [p for p in tmp_path.iterdir() if p.name.startswith(".b.cfg.") and p.name.endswith(".acps-old")]
    assert len(backups) == 1 and backups[0].read_text() == "old b.cfg\n"  # b's old content is not lost
    monkeypatch.undo()
    # The journal says the write was being undone: the next call that locks the folder finishes the undoing.
    atomic.recover(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {n: f"old {n}\n" for n in ("a.cfg", "b.cfg",
                                                                                            "c.cfg")}
