"""Greedy value-density channel search for acps (``GreedySearch``)."""

from __future__ import annotations

from acps_search_greedy.greedy import GreedySearch

__all__ = ["GreedySearch"]
