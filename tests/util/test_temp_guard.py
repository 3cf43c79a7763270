"""The test run leaves the system temp folder as it found it: a run whose test leaks a temporary folder fails
and names it, a clean run passes, and neither leaves anything in the temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_pytest(test_file: Path, temp: Path) -> subprocess.CompletedProcess[str]:
    """Run one test file in a fresh pytest with the guard loaded, the system temp folder being ``temp``."""
    env = {**os.environ, "TMPDIR": str(temp)}
    env.pop("ACPS_KEEP_TEST_TMP", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.support.temp_guard", "-o", "addopts=",
                           "-p", "no:cacheprovider", str(test_file)], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("leaks", [True, False])
def test_a_run_that_leaks_a_temporary_folder_fails_and_the_temp_folder_stays_as_it_was(tmp_path: Path,
                                                                                      leaks: bool) -> None:
    temp = tmp_path / "system-temp"
    temp.mkdir()
    (temp / "someone-elses-file").write_text("not ours\n")
    tests = tmp_path / "case"
    tests.mkdir()
    body = "tempfile.mkdtemp()" if leaks else "with tempfile.TemporaryDirectory():\n        pass"
    (tests / "test_case.py").write_text(
        "import tempfile\n\n\ndef test_uses_a_temporary_folder(tmp_path):\n"
        f"    (tmp_path / 'x').write_text('y')\n    {body}\n")
    result = run_pytest(tests / "test_case.py", temp)
    if leaks:
        assert result.returncode == 1, result.stdout + result.stderr
        assert "the tests left 1 entries in the temp folder: tmp" in result.stdout
    else:
        assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(temp)) == ["someone-elses-file"]


def test_what_libraries_make_on_their_own_is_no_leak(tmp_path: Path) -> None:
    from tests.support.temp_guard import leftovers

    for name in ("pytest-of-someone", "torchinductor_someone", "leaked-folder"):
        (tmp_path / name).mkdir()
    for name in (".ses", "leaked.txt"):
        (tmp_path / name).write_text("")
    assert leftovers(tmp_path) == ["leaked-folder", "leaked.txt"]
