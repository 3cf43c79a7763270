"""Which channels a channel-prune config keeps: the counts it sets per group (from its producers' entries), and
the channels themselves: the search's choice from the selection file when it still matches, else the channels
with the largest filter norms (the reference's rule)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acps_core._util.atomic import StrPath
from acps_core.config.prune_config import validate_override_targets
from acps_core.config.selection import selection_path
from acps_core.errors import ConfigError
from acps_core.graph.model import ChannelGraph, ChannelGroup
from acps_core.layers.base import adapter_for
from acps_core.search.overrides import group_setting

logger = logging.getLogger(__name__)


def check_indices(removed: Mapping[str, Sequence[int]], producers: Mapping[str, ChannelGroup], path: StrPath,
                   what: str) -> None:
    """Refuse removed channel indices beyond a layer's channels, or removing all of them.

    Raises:
        ConfigError: naming the file, the layer and what is wrong.
    """
    for name, indices in removed.items():
        group = producers.get(name)
        if group is None:
            continue
        beyond = [i for i in indices if i >= group.channels]
        if beyond:
            raise ConfigError(f'{what} removes channel {max(beyond)} of layer "{name}", which has only '
                              f"{group.channels} output channels (0..{group.channels - 1}); it was written for "
                              "another model or edited: search again, or use the file written for this model",
                              path=os.fspath(path))
        if len(set(indices)) >= group.channels:
            raise ConfigError(f'{what} removes all {group.channels} output channels of layer "{name}"; a layer '
                              "must keep at least one: search again, or use the file written for this model",
                              path=os.fspath(path))


def largest_norm_channels(model: nn.Module, group: ChannelGroup, count: int) -> list[int]:
    """The ``count`` channels of ``group`` with the largest filter L2 norms summed over its producers (the
    reference's rule), taken in whole atoms when the group has units or blocks. Sorted."""
    norms = torch.zeros(group.channels, dtype=torch.float64)
    for name in group.producers:
        module = model.get_submodule(name)
        adapter = adapter_for(module)
        assert adapter is not None, f"{name} produces a group's channels but has no layer adapter"
        rows = adapter.filter_rows(module)
        norms += torch.linalg.vector_norm(rows.float(), dim=1).double().cpu() ** 2
    removed = [c for atom in group.atoms(norms)[: (group.channels - count) // group.atom] for c in atom]
    return sorted(set(range(group.channels)) - set(removed))


def decide_keep(model: nn.Module, graph: ChannelGraph, cfg: Any, config_path: Path,
                 selection: dict[str, list[int]]) -> tuple[dict[int, list[int]], bool]:
    """What each group keeps, and whether every choice came from the search's selection file.

    Raises:
        ConfigError: the config names a layer or type the model does not have (with the closest names), gives a
            ratio to a layer that cannot be pruned, or the selection file removes channels the model lacks.
    """
    # Entries for a norm or depthwise conv that follows a group are allowed (the producers' entries decide).
    validate_override_targets(cfg, config_path, {name: (info.kind, info.reason) for name, info in graph.layers.items()})
    check_indices(selection, {p: g for g in graph.groups for p in g.producers}, selection_path(config_path),
                   "the selection file")
    keep: dict[int, list[int]] = {}
    searched = True
    for group in graph.groups:
        if not group.prunable:
            continue
        setting = group_setting(graph, group, cfg, str(config_path))
        if setting is None or setting.kept >= group.channels:
            continue
        count = setting.kept
        chosen = [selection[p] for p in group.producers if p in selection]
        if chosen and all(c == chosen[0] for c in chosen) and group.channels - len(chosen[0]) == count:
            removed = set(chosen[0])
            keep[group.id] = [c for c in range(group.channels) if c not in removed]
        else:
            if chosen:
                logger.info("the selection file does not match the config for %s (edited?); choosing channels "
                            "by filter L2 norm", group.name)
            keep[group.id] = largest_norm_channels(model, group, count)
            searched = False
    return keep, searched


# ----------------------------------------------------------------------------------------------------------------
# The public calls
# ----------------------------------------------------------------------------------------------------------------
