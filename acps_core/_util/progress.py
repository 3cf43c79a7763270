"""Progress on the terminal for the steps that can take more than a second or two.

:func:`progress` shows a bar over a loop (calibration passes, latency measurements); :func:`stage` shows a line
with a running clock while one step runs (tracing the model, searching, writing). Both show only when stderr
is a terminal, never with ``ACPS_PROGRESS=0`` in the environment (which ``acps --quiet`` sets), only on rank 0
of a distributed search, and only once the step has taken more than :data:`DELAY_S` seconds, so a quick
search prints nothing. Everything else is reported through :mod:`logging`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

#: Seconds a step runs before its progress shows.
DELAY_S = 1.0


def enabled() -> bool:
    """Whether progress is shown."""
    if os.environ.get("ACPS_PROGRESS", "1") == "0" or not sys.stderr.isatty():
        return False
    from acps_core._util.distributed import Communicator

    return Communicator.current().rank == 0


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """``items``, with a tqdm progress bar on the terminal (see the module docs)."""
    if not enabled():
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, desc=description, total=total, leave=False, unit="step", delay=DELAY_S) as bar:
        yield from bar


@contextmanager
def stage(description: str) -> Iterator[None]:
    """Show ``acps: <description> ... N s`` on the terminal while the block runs (see the module docs); the line
    is cleared when the block ends."""
    if not enabled():
        yield
        return
    done = threading.Event()
    shown = threading.Event()

    def tick() -> None:
        started = time.monotonic()
        if done.wait(DELAY_S):
            return
        while not done.is_set():
            sys.stderr.write(f"\racps: {description} ... {time.monotonic() - started:.0f} s ")
            sys.stderr.flush()
            shown.set()
            done.wait(0.5)

    ticker = threading.Thread(target=tick, name="acps-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        if shown.is_set():
            sys.stderr.write("\r\033[K")  # back to the start of the line, cleared
            sys.stderr.flush()
