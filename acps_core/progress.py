"""Progress bars for the loops that can take more than a second (calibration passes, latency measurement).

A bar shows only when stderr is a terminal, and never with ``ACPS_PROGRESS=0`` in the environment (which
``acps --quiet`` sets); everything else is reported through :mod:`logging`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def enabled() -> bool:
    """Whether progress bars are shown."""
    return os.environ.get("ACPS_PROGRESS", "1") != "0" and sys.stderr.isatty()


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """``items``, with a tqdm progress bar on the terminal (see the module docs)."""
    if not enabled():
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, desc=description, total=total, leave=False, unit="step") as bar:
        yield from bar
