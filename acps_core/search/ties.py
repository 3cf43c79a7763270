"""Uniform widths across repeated blocks: channel groups that play the same part in every block of a stack keep
the same count (``auto_channel_prune_search(..., uniform_widths=True)``).

A Hugging Face config holds one width for all layers (``intermediate_size``, ``num_attention_heads``), and
runtimes that compile one kernel per block shape like every block alike; Minitron searches this way. Two groups
play the same part when their names are the same once every block index is replaced (``model.layers.3.mlp.
gate_proj`` and ``model.layers.7.mlp.gate_proj`` are both ``model.layers.#.mlp.gate_proj``), where the blocks are
alike children of one container (:func:`repeated_blocks`), and they have the same channels and structure (units,
blocks).

The search method sees one record per set of tied groups, its *leader* (the first), whose sensitivity is what
every count costs the whole set: each member removes its own least sensitive channels, so keeping ``k`` loses the
sum of every member's loss at ``k``. The graph info it is handed moves every member with the leader, so costs and
savings are those of the whole set. Afterwards each member keeps its own best ``k`` channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from acps_core.search.problem import Decision, SearchRecord


def block_pattern(name: str, repeated: Container[str] | None = None) -> str:
    """``name`` with its block indices replaced by ``#``: ``model.layers.3.mlp`` -> ``model.layers.#.mlp``.

    A block index is a dotted component made of digits; with ``repeated`` (see :func:`repeated_blocks`), only
    one whose module, the name up to it, is in ``repeated``.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and (repeated is None or ".".join(parts[: i + 1]) in repeated):
            parts[i] = "#"
    return ".".join(parts)


def repeated_blocks(model: nn.Module) -> set[str]:
    """The modules that are one of several alike children of a container: the same class with parameters of the
    same names and shapes (the decoder layers of a transformer, the blocks of a ResNet stage; not the layers of
    one ``nn.Sequential`` block, which differ), or those and more (T5's first block, which also holds the position
    bias table)."""
    repeated: set[str] = set()
    for prefix, parent in model.named_modules():
        children = [(name, type(child), {n: tuple(p.shape) for n, p in child.named_parameters()})
                    for name, child in parent.named_children() if name.isdigit()]
        # Fewest parameters first: a set starts from a block with no extras, which later blocks may add to.
        sets: list[tuple[type, dict[str, tuple[int, ...]], list[str]]] = []
        for name, kind, shapes in sorted(children, key=lambda c: len(c[2])):
            alike = next((members for base_kind, base, members in sets if base_kind is kind and base
                          and all(shapes.get(n) == shape for n, shape in base.items())), None)
            if alike is None:
                sets.append((kind, shapes, [name]))
            else:
                alike.append(name)
        repeated.update(f"{prefix}.{name}" if prefix else name for _, _, members in sets if len(members) > 1
                        for name in members)
    return repeated


@dataclass
class Ties:
    """Sets of groups that keep equal counts: leader group id -> every member's id, leader first."""

    sets: dict[int, list[int]] = field(default_factory=dict)
    #: Each set's name pattern, by leader (``model.layers.#.mlp.gate_proj``).
    patterns: dict[int, str] = field(default_factory=dict)

    def expand(self, kept: Mapping[int, int]) -> dict[int, int]:
        """``kept`` (group id -> count) with every leader's count given to the members of its set."""
        out = dict(kept)
        for leader, members in self.sets.items():
            if leader in kept:
                out.update(dict.fromkeys(members, kept[leader]))
        return out

    def members(self, group_id: int) -> list[int]:
        """The groups that move with ``group_id``: its set, or itself alone."""
        return self.sets.get(group_id, [group_id])

    def describe(self) -> str:
        """One line for the report: how many groups were tied into how many sets, with the largest sets."""
        largest = sorted(self.sets.items(), key=lambda item: len(item[1]), reverse=True)[:4]
        shown = ", ".join(f"{self.patterns[leader]} ({len(ids)} blocks)" for leader, ids in largest)
        tied = sum(len(ids) for ids in self.sets.values())
        return (f"uniform_widths: {tied} groups in repeated blocks were searched as {len(self.sets)} sets that keep "
                f"equal counts: {shown}" + (" ..." if len(self.sets) > len(largest) else ""))


def tie_records(records: Sequence[SearchRecord], repeated: Container[str] | None = None,
                roles: Mapping[int, str] | None = None) -> tuple[list[SearchRecord], Ties]:
    """The records a search method sees when repeated blocks keep uniform widths, and the sets they stand for.

    Records must carry their sensitivity; ``repeated`` names the repeated blocks (:func:`block_pattern`);
    ``roles`` gives groups a role that ties them wherever they are (group id -> the config field their width
    is: :func:`~acps_core.prune.model_config.config_roles`), in place of their pattern. A record with no twin is
    passed on as it is; each set of twins is passed on as one copy of its leader whose sensitivity is the set's
    (see the module docs).
    """
    by_role: dict[tuple[object, ...], list[SearchRecord]] = {}
    for record in records:
        pattern = (roles or {}).get(record.group_id) or block_pattern(record.name, repeated)
        role = (pattern, record.channels, record.unit, record.blocks, record.aligned, tuple(record.allowed_kept))
        by_role.setdefault(role if pattern != record.name else (record.group_id,), []).append(record)
    view: list[SearchRecord] = []
    ties = Ties()
    for twins in by_role.values():  # in the order of each role's first record
        leader = twins[0]
        if len(twins) == 1:
            view.append(leader)
            continue
        ties.sets[leader.group_id] = [r.group_id for r in twins]
        ties.patterns[leader.group_id] = " + ".join(dict.fromkeys(block_pattern(t.name, repeated) for t in twins))
        view.append(dataclasses.replace(leader, sensitivity=_shared_sensitivity(twins), gain=None, _order=None,
                                        _cumulative=None))
    return view, ties


def _shared_sensitivity(twins: Sequence[SearchRecord]) -> torch.Tensor:
    """Per-channel scores over the leader's channels whose atoms, least first, cost what the set loses: the r-th
    atom of the leader scores the sum of every twin's r-th least sensitive atom, spread over its channels."""
    leader_atoms = twins[0].atoms()
    totals = torch.zeros(len(leader_atoms), dtype=torch.float64)
    for twin in twins:
        scores = torch.as_tensor(twin.sensitivity, dtype=torch.float64).flatten()
        totals += torch.stack([scores[atom].sum() for atom in twin.atoms()])
    shared = torch.zeros(twins[0].channels, dtype=torch.float64)
    for atom, total in zip(leader_atoms, totals):
        shared[atom] = total / len(atom)
    return shared


def untie_decision(decision: Decision, ties: Ties, records: Sequence[SearchRecord]) -> Decision:
    """The search's decision over leaders made a decision over every group: each member of a set keeps the
    leader's count, choosing its own least sensitive channels to remove."""
    by_id = {r.group_id: r for r in records}
    keep = dict(decision.keep)
    for leader, members in ties.sets.items():
        if leader not in decision.keep:
            continue
        count = len(decision.keep[leader])
        for member in members:
            mask = by_id[member].keep_mask(count)
            keep[member] = [c for c, flag in enumerate(mask) if flag]
    return Decision(keep)
