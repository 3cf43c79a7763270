"""Greedy channel searches for acps: by value density (``GreedySearch``, the reference's default) and by global
rank of the channels' sensitivity (``GlobalRankSearch``)."""

from __future__ import annotations

from acps_search_greedy.greedy import GreedySearch
from acps_search_greedy.rank import GlobalRankSearch

__all__ = ["GlobalRankSearch", "GreedySearch"]
