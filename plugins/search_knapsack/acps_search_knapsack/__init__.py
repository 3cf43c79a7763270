"""Channel search as a multiple-choice knapsack, solved by Lagrangian relaxation (``KnapsackSearch``)."""

from __future__ import annotations

from acps_search_knapsack.knapsack import KnapsackSearch

__all__ = ["KnapsackSearch"]
