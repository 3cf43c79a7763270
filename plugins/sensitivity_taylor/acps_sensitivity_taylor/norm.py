"""Filter-norm sensitivity: the reference's channel choice (``BalancedL2NormFilterPruner``) as a search score.

Needs no labels and no gradient: a channel's score is the L2 norm of everything its group's producers compute
it from (their filter rows, for attention the q/k/v rows), summed over the producers. "Balanced": each group's
scores are divided by their mean, so that groups of different size and depth compare on relative norms and the
search spreads the cuts instead of emptying the layers whose weights happen to be small.
"""

from __future__ import annotations

import torch

from acps_core.bases import SensitivityBase
from acps_core.problem import SearchRecord


class BalancedL2NormSensitivity(SensitivityBase):
    """Channel importance = filter L2 norm over the group's producers, divided by the group's mean (label-free)."""

    def get_sensitivity(self, search_records: list[SearchRecord]) -> None:
        """Set ``record.sensitivity`` for every record (see the module docs)."""
        assert self.model is not None and self.graph is not None, "setup_initialization was not called"
        for record in search_records:
            squares = torch.zeros(record.channels, dtype=torch.float64)
            for piece in self.graph.param_slices(self.graph.group(record.group_id)):
                if piece.module not in record.producers:
                    continue
                param = getattr(self.model.get_submodule(piece.module), piece.param, None)
                if isinstance(param, torch.Tensor):
                    squares += piece.per_channel(param.detach().double().pow(2), record.channels).cpu()
            norms = squares.sqrt()
            mean = float(norms.mean())
            record.sensitivity = norms / mean if mean > 0 else norms
