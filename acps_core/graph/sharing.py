"""Parameters several modules hold: a layer whose weights another module shares is left alone (slicing it would
unshare them), except a *tied family*: embeddings and Linear heads that hold one ``(vocabulary, hidden)`` weight
(a language model's ``lm_head`` tied to its token embedding; T5's ``shared`` embedding, which its encoder and
decoder embed with). Their columns are one set of channels, the embeddings' outputs and the heads' inputs: they
lose the same ones and stay tied, members the forward never calls included (see
:func:`~acps_core.prune.slicing.prune_channels`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from acps_core._util.model_checks import parameter_owners
from acps_core.layers.base import adapter_for

if TYPE_CHECKING:
    from acps_core.graph.build import GroupBuilder


def shared_weights(model: nn.Module, names: Mapping[nn.Module, str]) -> tuple[dict[str, str], list[list[str]]]:
    """Layers and norms whose parameters also belong to another module (name -> the other module(s)), and, apart,
    the tied families (see the module docs), each as its members' names."""
    owners = parameter_owners(model)
    shared: dict[str, str] = {}
    families: dict[int, list[str]] = {}
    for module, name in names.items():
        if adapter_for(module) is None:
            continue
        others = sorted({o for p in module.parameters(recurse=False) for o in owners.get(id(p), [])
                         if o != name and model.get_submodule(o) is not module})  # (not its own other names)
        if others and _family_member(module) and all(_family_member(model.get_submodule(o)) for o in others):
            members = [model.get_submodule(n) for n in (name, *others)]
            if any(isinstance(m, nn.Embedding) for m in members) and all(m.weight is module.weight for m in members):
                families[id(module.weight)] = sorted({name, *others})
                continue
        if others:
            shared[name] = ", ".join(others)
    return shared, list(families.values())


def _family_member(module: nn.Module) -> bool:
    """An embedding, or a Linear holding nothing but its weight and maybe a bias."""
    if isinstance(module, nn.Embedding):
        return set(module._parameters) == {"weight"}
    return isinstance(module, nn.Linear) and set(module._parameters) - {"weight"} <= {"bias"}


def keep_tied(builder: GroupBuilder, family: list[str]) -> None:
    """The members of a tied family that the forward calls lose the same channels: the embeddings' outputs and
    the heads' inputs are one group, and the heads never lose rows (the vocabulary)."""
    called = [name for name in family if name in builder.layers]
    reason = f"the weight of {', '.join(family)} is one tied parameter"
    spaces: list[int] = []
    in_pieces = False  # a head that reads its columns from several sources: the family cannot be pruned
    for name in called:
        entry = builder.layers[name]
        if isinstance(builder.modules[name], nn.Embedding):
            spaces += [entry["out"]] if entry["out"] is not None else []
            continue
        if entry["out"] is not None:
            builder.block(entry["out"], f"{reason} (a head's rows are the vocabulary)")
        in_pieces = in_pieces or len(entry["in"]) != 1
        spaces += [space for space, _ in entry["in"] if space is not None]
    roots = sorted({builder.find(space) for space in spaces})
    for root in roots:
        if in_pieces:
            builder.block(root, f"{reason}, but a head reads its columns from several sources")
        else:
            builder.union(roots[0], root, reason)
