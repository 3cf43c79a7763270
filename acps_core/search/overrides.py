"""What a channel-prune config (or override file) says about each channel group, read one way for the search
and for the prune step (:func:`group_setting`); and the groups the search is left to decide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from acps_core.config.prune_config import validate_override_targets
from acps_core.config.settings import AMCTRetrainConfig, SearchSettings, resolve_layer
from acps_core.errors import ConfigError, GraphError
from acps_core.graph.model import ChannelGraph, ChannelGroup
from acps_core.search.problem import SearchRecord, allowed_kept_counts, kept_from_ratio

SettingSource = Literal["skip", "override_layer", "override_type", "global"]


@dataclass(frozen=True)
class GroupSetting:
    """What a config sets for one channel group.

    Attributes:
        source: ``"skip"`` (a skip list names one of its layers or their type), or the rule that gave its
            producers' ratio: ``"override_layer"``, ``"override_type"`` or ``"global"``.
        kept: the channels the group keeps (all of them for a skip).
        prune_ratio: the producers' ``prune_ratio`` (0 for a skip).
        ascend_optimized: the producers' ``ascend_optimized`` (false for a skip).
    """

    source: SettingSource
    kept: int
    prune_ratio: float
    ascend_optimized: bool


def group_setting(graph: ChannelGraph, group: ChannelGroup, cfg: AMCTRetrainConfig,
                  path: str | None) -> GroupSetting | None:
    """What ``cfg`` sets for ``group``, or None when nothing does (the search decides; the prune step leaves it).

    A group is skipped when a skip list names any of its layers, producers or followers (a norm, a depthwise
    conv), or their type. Otherwise its producers' entries decide (see
    :func:`~acps_core.config.settings.resolve_layer`); an entry for a follower is passed over, as its channels
    are its producers'. Producers of one group share their channels, so their entries must keep the same count.

    Args:
        graph: the model's channel graph.
        group: the group.
        cfg: a channel-prune config or override file.
        path: the file ``cfg`` came from, for messages.

    Raises:
        ConfigError: two producers of the group are given different kept counts.
    """
    members = group.producers + [use.layer for use in group.followers if use.layer in graph.layers]
    decisions = {name: resolve_layer(cfg, name, graph.module_type(name)) for name in members}
    if any(decision.source == "skip" for decision in decisions.values()):
        return GroupSetting("skip", group.channels, 0.0, False)
    given = {name: decision for name, decision in decisions.items()
             if name in group.producers and decision.source != "none" and decision.prune_ratio is not None}
    if not given:
        return None
    counts = {name: kept_from_ratio(group.channels, float(decision.prune_ratio or 0.0),
                                    decision.ascend_optimized is not False, group.atom)
              for name, decision in given.items()}
    if len(set(counts.values())) > 1:
        keeps = ", ".join(f"{name} keeps {count}" for name, count in counts.items())
        raise ConfigError(f"layers {', '.join(counts)} share their output channels (one channel group) but the "
                          f"config keeps different counts of them ({keeps}); give them the same prune_ratio and "
                          "ascend_optimized", path=path)
    name, decision = next(iter(given.items()))
    return GroupSetting(cast(SettingSource, decision.source), counts[name], float(decision.prune_ratio or 0.0),
                        decision.ascend_optimized is not False)


@dataclass
class FixedGroups:
    """The groups the search may not change.

    Attributes:
        kept: kept counts by group id: unprunable and skipped groups keep all, overridden ones what the
            override says.
        statuses: every group's status by id: ``"unprunable"``, ``"skip"``, ``"override"`` or ``"searched"``.
        settings: the user's ``(prune_ratio, ascend_optimized)`` for each overridden group, written back as given.
    """

    kept: dict[int, int]
    statuses: dict[int, str]
    settings: dict[int, tuple[float, bool]]


def fixed_groups(graph: ChannelGraph, override: AMCTRetrainConfig | None, settings: SearchSettings) -> FixedGroups:
    """The groups the search must leave as they are, after checking the override file names real layers.

    Raises:
        ConfigError: the override file names a layer or type the model lacks, sets a layer that cannot be
            pruned, or gives the producers of one group different counts.
    """
    fixed = FixedGroups({}, {}, {})
    path = str(settings.override_prune_cfg)
    if override is not None:
        layers = {name: (info.kind, override_blocker(graph, name)) for name, info in graph.layers.items()}
        validate_override_targets(override, path, layers)
    for group in graph.groups:
        if not group.prunable:
            fixed.kept[group.id], fixed.statuses[group.id] = group.channels, "unprunable"
            continue
        setting = group_setting(graph, group, override, path) if override is not None else None
        if setting is None:
            fixed.statuses[group.id] = "searched"
        elif setting.source == "skip":
            fixed.kept[group.id], fixed.statuses[group.id] = group.channels, "skip"
        else:
            fixed.kept[group.id], fixed.statuses[group.id] = setting.kept, "override"
            fixed.settings[group.id] = (setting.prune_ratio, setting.ascend_optimized)
    return fixed


def override_blocker(graph: ChannelGraph, name: str) -> str | None:
    """Why an override entry cannot set this layer's own prune ratio (None when it can)."""
    layer = graph.layers[name]
    if layer.reason is not None:
        return layer.reason
    if layer.out_group is None:
        return "not a producer of prunable channels"
    group = graph.group(layer.out_group)
    if name not in group.producers and layer.out_repeat > 1:
        return (f"its output channels are those of group {group.name}, {layer.out_repeat} times over (it is joined "
                f"to them that way); set the override on {group.name}")
    if name not in group.producers:
        return f"its output channels follow its input (group {group.name}); set the override on {group.name}"
    return None


def search_records(graph: ChannelGraph, fixed: FixedGroups, settings: SearchSettings) -> list[SearchRecord]:
    """One record for each group the search decides: prunable, not fixed, and with a count to choose."""
    records = []
    for group in graph.groups:
        if group.id in fixed.kept:
            continue
        allowed = allowed_kept_counts(group.channels, settings.ascend_optimized, settings.max_prune_ratio,
                                      group.atom)
        if len(allowed) > 1:  # otherwise nothing to choose: too few channels for one step
            records.append(SearchRecord.for_group(group, allowed))
    return records


def empty_search_space(graph: ChannelGraph, override: AMCTRetrainConfig | None,
                       settings: SearchSettings) -> GraphError | ConfigError:
    """The error for a search with no group to decide, saying why and what to change."""
    prunable = graph.prunable_groups
    if not prunable:
        reasons = "; ".join(f"{name}: {why}" for name, why in list(graph.explain().items())[:8])
        return GraphError("the model has no prunable channel group, so there is nothing to search: " + reasons)
    source = str(settings.source) if settings.source else None
    if override is not None:
        return ConfigError("the search space is empty: every prunable layer is skipped or overridden by "
                           f"override_prune_cfg {settings.override_prune_cfg}; leave some layers to the search",
                           path=source)
    step = 16 if settings.ascend_optimized else 1
    return ConfigError(f"the search space is empty: with ascend_optimized {str(settings.ascend_optimized).lower()} "
                       f"and max_prune_ratio {settings.max_prune_ratio:g} no prunable group can lose a step of "
                       f"{step} channels (groups: "
                       + ", ".join(f"{g.name} ({g.channels} channels)" for g in prunable[:8])
                       + "); set ascend_optimized: false or raise max_prune_ratio", path=source)
