"""A pytest plugin: the test run leaves the system temp folder as it found it.

At the start of the run every temporary file (Python's ``tempfile``, pytest's ``tmp_path``, the processes the
tests start, which inherit ``TMPDIR``) is sent into a private folder inside the system temp folder. At the end,
anything left in it other than pytest's own ``tmp_path`` folders is a leak: the run fails and names it. The
private folder is then removed (``ACPS_KEEP_TEST_TMP=1`` keeps it, to look at a failure), so the system temp
folder holds nothing more than before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

#: Entries pytest manages itself (``tmp_path`` and ``tmp_path_factory`` folders).
PYTEST_OWN = "pytest-of-"
#: Files libraries write into the temp folder on their own (removed with the private folder all the same).
LIBRARY_FILES = {".ses": "onnxruntime's session marker, written when it loads"}
#: Folders libraries make there on their own, by name prefix (the rest of the name is the user's).
LIBRARY_FOLDERS = {"torchinductor_": "torch's compile cache, which torch.optim's first step makes"}

_state: dict[str, object] = {}


def leftovers(folder: Path) -> list[str]:
    """What a test run left in ``folder``, pytest's own ``tmp_path`` folders aside."""
    return sorted(name for name in os.listdir(folder)
                  if not name.startswith((PYTEST_OWN, *LIBRARY_FOLDERS)) and name not in LIBRARY_FILES)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or "folder" in _state:  # set up once, by the main process
        return
    folder = Path(tempfile.mkdtemp(prefix="acps-tests-"))
    _state.update(folder=folder, old_env=os.environ.get("TMPDIR"), old_tempdir=tempfile.tempdir)
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = str(folder)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    folder = _state.get("folder")
    if not isinstance(folder, Path):
        return
    left = leftovers(folder)
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (f"the tests left {len(left)} entries in the temp folder: {', '.join(left[:10])}; use pytest's "
                   "tmp_path (or a TemporaryDirectory) and remove what a test creates")
        if reporter is not None:
            reporter.write_line(message, red=True)
        else:
            print(message)


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = _state.pop("folder", None)
    if not isinstance(folder, Path):
        return
    old_env, old_tempdir = _state.pop("old_env", None), _state.pop("old_tempdir", None)
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = str(old_env)
    tempfile.tempdir = old_tempdir if isinstance(old_tempdir, str) else None
    if os.environ.get("ACPS_KEEP_TEST_TMP") != "1":
        shutil.rmtree(folder, ignore_errors=True)
