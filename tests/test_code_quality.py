"""The linter and the type checker configured in pyproject.toml pass on the whole code base (mypy in strict mode, at
the lowest Python it can check for)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["acps_core", *(str(p.parent) for p in sorted(ROOT.glob("plugins/*/acps_*/__init__.py"))),
            *(str(p.parent) for p in sorted(ROOT.glob("examples/*/acps_*/__init__.py")))]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_ruff_finds_nothing() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_finds_nothing() -> None:
    result = run("mypy", *PACKAGES)
    assert result.returncode == 0, result.stdout + result.stderr
