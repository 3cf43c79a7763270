"""Progress bars: shown on a terminal, silent otherwise and with ACPS_PROGRESS=0 (acps --quiet)."""

from __future__ import annotations

import io
import sys
import time

import pytest

from acps_core._util import progress as progress_module
from acps_core._util.progress import enabled, progress, stage


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_shows_on_a_terminal_and_items_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("ACPS_PROGRESS", raising=False)
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)
    assert enabled()
    assert list(progress(range(5), "calibration passes", 5)) == [0, 1, 2, 3, 4]
    assert "calibration passes" in terminal.getvalue()


def test_a_quick_loop_or_step_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("ACPS_PROGRESS", raising=False)
    assert list(progress(range(3), "calibration passes", 3)) == [0, 1, 2]
    with stage("tracing the model"):
        pass
    assert terminal.getvalue() == ""


def test_a_long_step_shows_its_name_and_clock_then_clears_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("ACPS_PROGRESS", raising=False)
    monkeypatch.setattr(progress_module, "DELAY_S", 0.05)
    with stage("searching (GreedySearch)"):
        time.sleep(0.3)
    shown = terminal.getvalue()
    assert "\racps: searching (GreedySearch) ... 0 s" in shown
    assert shown.endswith("\r\033[K")


@pytest.mark.parametrize("terminal", [False, True])
def test_silent_off_a_terminal_or_when_asked(monkeypatch: pytest.MonkeyPatch, terminal: bool) -> None:
    stream = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("ACPS_PROGRESS", "0" if terminal else "1")
    assert not enabled()
    assert list(progress(iter("abc"), "layers")) == ["a", "b", "c"]
    assert stream.getvalue() == ""


def test_quiet_command_line_turns_the_bars_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from acps_core.cli.main import EXIT_OK, main

    monkeypatch.delenv("ACPS_PROGRESS", raising=False)
    assert main(["--quiet", "plugins"]) == EXIT_OK
    import os

    assert os.environ["ACPS_PROGRESS"] == "0"
    monkeypatch.delenv("ACPS_PROGRESS")
