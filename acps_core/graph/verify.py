"""A check by execution of the channel graph: prune a copy, run it, compare with the masked model.

The graph maps what it recognises and blocks what it does not, but a model can still use a channel count in ways
no trace shows (``y / y.shape[1]``, a head count written as a constant after reading ``x.size()``, a user hook).
So before a search relies on the graph, every prunable group loses one atom in a copy; the copy must run and
compute what the unpruned model computes with those channels masked. Groups that break it are found by
bisection and left alone, with the error as the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from acps_core._util.data import forward
from acps_core.graph.masking import masked_channels, output_difference
from acps_core.graph.model import ChannelGraph
from acps_core.graph.trace import trace_sample
from acps_core.prune.copying import copy_sharing_tensors
from acps_core.prune.slicing import prune_channels

logger = logging.getLogger(__name__)


def _trial(model: nn.Module, graph: ChannelGraph, sample: Any, keep: dict[int, list[int]]) -> str | None:
    """Prune a copy as ``keep`` says and compare it with the masked model; why it fails, or None."""
    try:
        pruned = copy_sharing_tensors(model)  # slicing makes new tensors; the others stay shared, unchanged
        prune_channels(pruned, graph, keep, share=True)  # the last atom goes: most tensors are views, no copies
        with torch.no_grad():
            got = forward(pruned, sample)
        with masked_channels(model, graph, keep), torch.no_grad():
            expected = forward(model, sample)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return output_difference(got, expected)


def verify_groups(model: nn.Module, graph: ChannelGraph, data: Any) -> list[str]:
    """Leave alone every prunable group whose trial pruning breaks the model; returns their names.

    The model must be in eval mode; it is not changed (the trial prunes a copy whose untouched tensors are shared).
    """
    sample = trace_sample(data)
    keep: dict[int, list[int]] = {}
    for group in graph.prunable_groups:
        atoms = group.atoms(torch.zeros(group.channels))
        if len(atoms) > 1:
            removed = set(atoms[-1])
            keep[group.id] = [c for c in range(group.channels) if c not in removed]
    failing: list[tuple[int, str]] = []

    def bisect(ids: Sequence[int], why: str) -> None:
        if len(ids) == 1:
            failing.append((ids[0], why))
            return
        halves = [ids[: len(ids) // 2], ids[len(ids) // 2:]]
        reasons = [_trial(model, graph, sample, {g: keep[g] for g in half}) for half in halves]
        if not any(reasons):
            failing.extend((g, why) for g in ids)  # only together: leave them all alone
            return
        for half, reason in zip(halves, reasons):
            if reason:
                bisect(half, reason)

    why = _trial(model, graph, sample, keep) if keep else None
    if why:
        bisect(sorted(keep), why)
    for group_id, reason in failing:
        group = graph.group(group_id)
        group.reasons.append(f"pruning it in a trial broke the model or changed what it computes ({reason}); "
                             "something in the forward pass uses its channel count in a way acps cannot trace")
        for layer in graph.layers.values():
            if layer.out_group == group_id and layer.reason is None:
                layer.reason = "; ".join(group.reasons)
        logger.warning("leaving channel group %s alone: %s", group.name, group.reasons[-1])
    return [graph.group(g).name for g, _ in failing]
