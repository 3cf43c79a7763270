"""Parameters several modules hold: a layer whose weights another module shares is left alone (slicing it would
unshare them), except a Linear head tied to an embedding (a language model's ``lm_head``), whose columns are the
embedding's channels: it loses the same ones and stays tied (see :func:`~acps_core.prune.slicing.prune_channels`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from acps_core._util.model_checks import parameter_owners
from acps_core.layers.base import adapter_for

if TYPE_CHECKING:
    from acps_core.graph.build import GroupBuilder


def shared_weights(model: nn.Module, names: Mapping[nn.Module, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Layers and norms whose parameters also belong to another module (name -> the other module(s)), and,
    apart, Linear heads tied to an embedding (the same ``(vocabulary, hidden)`` weight: head -> embedding), whose
    columns are the embedding's channels."""
    owners = parameter_owners(model)
    shared, tied = {}, {}
    for module, name in names.items():
        if adapter_for(module) is not None:
            others = sorted({o for p in module.parameters(recurse=False) for o in owners.get(id(p), []) if o != name})
            if len(others) == 1 and isinstance(module, (nn.Linear, nn.Embedding)):
                other = model.get_submodule(others[0])
                kinds = sorted(isinstance(m, nn.Embedding) for m in (module, other))
                pair = kinds == [False, True] and isinstance(other, (nn.Linear, nn.Embedding))
                if pair and module.weight is other.weight and set(module._parameters) - {"weight"} <= {"bias"}:
                    head = others[0] if isinstance(module, nn.Embedding) else name
                    tied[head] = others[0] if head == name else name
                    continue
            if others:
                shared[name] = ", ".join(others)
    return shared, tied


def keep_tied(builder: GroupBuilder, head: str, embedding: str) -> None:
    """A head tied to an embedding may lose input columns only as the embedding loses output columns (the same
    group), and never its rows (the embedding's vocabulary)."""
    head_entry, embedding_entry = builder.layers.get(head), builder.layers.get(embedding)
    reason = f"{head}'s weight is tied to {embedding}'s"
    if head_entry is None or embedding_entry is None:
        for entry in (head_entry, embedding_entry):
            for space in entry["spaces"] if entry is not None else []:
                builder.block(space, reason)
        return
    if head_entry["out"] is not None:
        builder.block(head_entry["out"], f"{reason} (its rows are the vocabulary)")
    spaces = [space for space, _ in head_entry["in"]] + [embedding_entry["out"]]
    roots = {builder.find(space) for space in spaces if space is not None}
    if len(roots) > 1 or len(head_entry["in"]) != 1:
        for root in roots:
            builder.block(root, f"{reason}, but it reads other channels than {embedding} produces")
