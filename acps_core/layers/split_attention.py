"""Self-attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` (Phi: ``dense``) Linears, as Hugging
Face's decoders write it (Llama, Qwen2/3, Mistral, Gemma, Phi, ...), with multi-head or grouped-query attention::

    q = self.q_proj(x).view(*shape, -1, self.head_dim).transpose(1, 2)      # num_heads heads
    k = self.k_proj(x).view(*shape, -1, self.head_dim).transpose(1, 2)      # num_key_value_heads heads
    ...  # rotary embeddings on q and k; each key/value head serves num_key_value_groups query heads
    out = self.o_proj(attention(q, k, v).reshape(*shape, -1))

Its channels are ``o_proj``'s inputs. Grouped-query attention is pruned one of two ways
(:func:`prune_grouped_query_attention`):

- ``"kv_groups"`` (the default): a key/value group at a time, one key/value head (its ``k_proj`` and ``v_proj``
  rows) with the ``num_key_value_groups`` query heads it serves (their ``q_proj`` rows and ``o_proj`` columns);
  the group size stays;
- ``"query_heads"``: query heads inside every group alike (the r-th query head of each group together), keeping
  every key/value head; the group size shrinks, uniform. Multi-query attention (one key/value head) is always
  pruned this way, since removing its one group would remove every head.

The head width and the rotary embedding stay as they are; ``num_heads``, ``num_key_value_heads`` and
``num_key_value_groups`` are updated where the module keeps them.

T5 writes the same attention with Linears ``q``, ``k``, ``v`` and ``o``, ``n_heads`` and ``key_value_proj_dim``;
its first block also holds a relative-position bias table (one column per head), whose bias it returns and every
later block adds: the graph ties the heads of the blocks that share such a per-head tensor
(:mod:`acps_core.graph.modules`), the table is sliced with the heads and ``n_heads`` and ``inner_dim`` updated.
Its cross-attention reads keys and values from ``key_value_states`` (UMT5: ``encoder_hidden_states``).

A module is recognised by its parts: the four Linears, an integer ``head_dim`` (``key_value_proj_dim``) and
``num_key_value_groups`` (or ``num_heads`` and ``num_key_value_heads``), widths that agree, and no other
parameters than norms over the head width applied to q and k (Qwen3's, Phi's), which all heads share and which
stay, and per-head tables. That its forward is the one above, whatever attention function it dispatches to
(eager, SDPA, ...), is proven on its first traced call: one key/value group is pruned in a copy (given per-head
inputs cut to the heads kept), which must compute what masking its query heads computes, and return per-head
tensors cut to them. A module that fails is traced function by function instead, with the reason.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from acps_core.errors import ArgumentError
from acps_core.layers.attention import (
    AttentionAdapter,
    cut_per_head_inputs,
    same_output,
    same_per_head,
    stateless,
)
from acps_core.layers.base import BUILD_CACHES, take
from acps_core.layers.head_entries import head_parameters, keep_head_entries

#: The names of the query, key and value projections: Hugging Face's decoders' and T5's.
NAMINGS = (("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))
PROJECTIONS = tuple(name for naming in NAMINGS for name in naming)
#: Names of the out projection (Phi calls it ``dense``, T5 ``o``).
OUT_PROJECTIONS = ("o_proj", "dense", "o")
#: Attributes that hold the head width (T5: ``key_value_proj_dim``).
HEAD_DIMS = ("head_dim", "key_value_proj_dim")
#: How grouped-query attention loses heads (see the module docs and :func:`prune_grouped_query_attention`).
GQA_MODES = ("kv_groups", "query_heads")
_SETTINGS = {"gqa": "kv_groups"}


#: What a trial of :meth:`SplitAttentionAdapter.confirm` found, by module class, head counts, mode, out projection and
#: the names of the call's keyword arguments, for one graph build.
_CONFIRMED: dict[tuple[Any, ...], bool] = {}
BUILD_CACHES.append(_CONFIRMED)


def prune_grouped_query_attention(by: str) -> None:
    """Choose how grouped-query attention loses heads from now on: ``"kv_groups"`` (whole key/value groups, the
    default) or ``"query_heads"`` (query heads inside every group alike). Set it before the search and keep it
    for ``create_prune_retrain_model`` and ``restore_prune_retrain_model``: the channel groups depend on it.

    Raises:
        ArgumentError: ``by`` is neither.
    """
    if by not in GQA_MODES:
        raise ArgumentError(f"prune_grouped_query_attention takes 'kv_groups' or 'query_heads', got {by!r}")
    _SETTINGS["gqa"] = by


def by_query_heads(module: nn.Module) -> bool:
    """Whether the module's query heads go inside its groups (the setting, or one key/value head only)."""
    counts = head_counts(module)
    return counts is not None and (_SETTINGS["gqa"] == "query_heads" or counts[1] == 1)


def naming(module: nn.Module) -> tuple[str, str, str]:
    """The names of the module's query, key and value projections (``q_proj``... or ``q``...)."""
    return next((names for names in NAMINGS if all(isinstance(getattr(module, n, None), nn.Linear) for n in names)),
                NAMINGS[0])


def head_counts(module: nn.Module) -> tuple[int, int, int] | None:
    """``(query heads, key/value heads, head_dim)`` from the module's attributes and its projections' widths."""
    head_dim = next((getattr(module, name) for name in HEAD_DIMS if hasattr(module, name)), None)
    q, k = (getattr(module, name, None) for name in naming(module)[:2])
    if not (isinstance(head_dim, int) and head_dim > 0 and isinstance(q, nn.Linear) and isinstance(k, nn.Linear)):
        return None
    if q.out_features % head_dim or k.out_features % head_dim:
        return None
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    groups = getattr(module, "num_key_value_groups", None)
    kv_attribute = getattr(module, "num_key_value_heads", None)
    if groups is None and isinstance(kv_attribute, int):
        groups = heads // max(1, kv_attribute)
    if groups is None and heads == kv_heads:
        groups = 1  # multi-head attention that keeps no group size (Hugging Face's Swin)
    if not isinstance(groups, int) or kv_heads == 0 or heads != kv_heads * groups:
        return None
    return heads, kv_heads, head_dim


def split_projection_attention(module: nn.Module) -> bool:
    """Whether ``module`` is self-attention with separate q/k/v/o projections acps prunes heads of (see the
    module docs)."""
    names = naming(module)
    if not all(isinstance(getattr(module, name, None), nn.Linear) for name in names):
        return False
    counts, out = head_counts(module), out_projection(module)
    if counts is None or out is None:
        return False
    _, k, v = (getattr(module, name) for name in names)
    if v.out_features != k.out_features:
        return False
    # Anything else with parameters is shared by all heads (q/k norms over the head width: Qwen3, Phi) or holds
    # one entry per query head (Swin's relative-position bias table, T5's relative-position bias), sliced with them.
    skip = (*names, out)
    per_head = {name for name, _ in head_parameters(module, counts[0], skip) or []}
    return head_parameters(module, counts[0], skip) is not None and all(
        param.shape == (counts[2],) or name in per_head for name, param in module.named_parameters()
        if name.split(".")[0] not in skip)


def out_projection(module: nn.Module) -> str | None:
    """The name of the module's out projection Linear, if it has one."""
    return next((name for name in OUT_PROJECTIONS if isinstance(getattr(module, name, None), nn.Linear)), None)


class SplitAttentionAdapter(AttentionAdapter):
    """Heads of self-attention with separate q/k/v/o projections (see the module docs)."""

    out_projection = "o_proj"

    def projection(self, module: nn.Module) -> str | None:
        return out_projection(module)

    def traced_whole(self, module: nn.Module) -> bool:
        return split_projection_attention(module)

    def heads(self, module: nn.Module) -> tuple[int, int]:
        heads, _, head_dim = head_counts(module) or (0, 0, 0)
        return heads, head_dim

    def unit(self, module: nn.Module) -> int:
        """Channels per key/value group (the query heads one key/value head serves), or per query head."""
        heads, kv_heads, head_dim = head_counts(module) or (1, 1, 1)
        return head_dim if by_query_heads(module) else heads // kv_heads * head_dim

    def aligned(self, module: nn.Module) -> int:
        """Query heads inside the groups: the r-th of every group go together."""
        _, kv_heads, _ = head_counts(module) or (1, 1, 1)
        return kv_heads if by_query_heads(module) else 1

    def kv_share(self, module: nn.Module) -> float:
        heads, kv_heads, _ = head_counts(module) or (1, 1, 1)
        return kv_heads / heads

    def batch_first(self, module: nn.Module) -> bool:
        return True

    def self_attention(self) -> bool:
        return True

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int | tuple[int, ...]]]:
        """q rows with their own channel; a key/value head's k and v rows with the first channel of its group."""
        heads, kv_heads, head_dim = head_counts(module) or (0, 0, 0)
        q, k, v = naming(module)
        queries: list[tuple[str, int, int | tuple[int, ...]]] = [(f"{q}.weight", 0, 0), (f"{q}.bias", 0, 0)]
        if by_query_heads(module):
            return queries  # the key/value heads all stay
        unit = heads // max(1, kv_heads) * head_dim
        kv_rows = tuple(j * unit + d for j in range(kv_heads) for d in range(head_dim))
        return queries + [(f"{name}.{param}", 0, kv_rows) for name in (k, v) for param in ("weight", "bias")]

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return [(f"{name}.weight", 1, 1) for name in naming(module)]

    def filter_rows(self, module: nn.Module) -> torch.Tensor:
        """Per channel, the norm of its q row and of its share of its group's k and v rows."""
        q, k, v = naming(module)
        squares = getattr(module, q).weight.detach().double().pow(2).sum(dim=1).cpu()
        heads, kv_heads, head_dim = head_counts(module) or (1, 1, 1)
        for name in (k, v):
            kv: torch.Tensor = getattr(module, name).weight.detach().double().pow(2).sum(dim=1).cpu()
            squares += kv.reshape(kv_heads, 1, head_dim).expand(kv_heads, heads // kv_heads, head_dim).reshape(
                -1) / (heads // kv_heads)
        norms: torch.Tensor = squares.sqrt().unsqueeze(1)
        return norms

    def out_size(self, module: nn.Module) -> int:
        return int(getattr(module, naming(module)[0]).out_features)

    def in_size(self, module: nn.Module) -> int:
        return int(getattr(module, naming(module)[0]).in_features)

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        """Keep the key/value groups (or the query heads, alike in every group) of the channels ``index``, as the
        graph made sure."""
        _, _, head_dim = head_counts(module) or (0, 0, 0)
        if by_query_heads(module):
            _keep_query_heads(module, index[::head_dim] // head_dim)
            return
        unit = self.unit(module)
        _keep_groups(module, index[::unit] // unit)

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        for name in naming(module):
            layer: Any = getattr(module, name)
            layer.weight = take(layer.weight, 1, index)
            layer.in_features = len(index)

    def confirm(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Prune the first key/value group in a copy and compare its output with the module's with that group's
        query heads' ``o_proj`` columns zeroed."""
        counts = head_counts(module)
        if counts is None or module.training:
            return False
        heads, kv_heads, _ = counts
        per_group = heads // kv_heads
        queries = by_query_heads(module)
        if (per_group if queries else kv_heads) < 2:
            return True  # nothing can go; nothing to prove
        # Blocks of one class differ in their own parameters (T5's first holds the position bias) and in what
        # they are given (a position bias, or None for the first).
        given = (tuple(type(value).__name__ for value in args),
                 tuple(sorted((name, type(value).__name__) for name, value in kwargs.items())))
        key = (type(module), counts, queries, out_projection(module), given,
               tuple(name for name, _ in module.named_parameters()))
        if key not in _CONFIRMED:  # the blocks of a model share their class and widths: one trial for them all
            _CONFIRMED[key] = self._trial(module, args, kwargs, counts, queries)
        return _CONFIRMED[key]

    @staticmethod
    def _trial(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], counts: tuple[int, int, int],
               queries: bool) -> bool:
        heads, kv_heads, head_dim = counts
        per_group = heads // kv_heads
        # The first group goes, or the first query head of every group.
        gone = [h for h in range(heads) if (h % per_group == 0 if queries else h < per_group)]
        kept = [h for h in range(heads) if h not in gone]
        columns = torch.tensor([h * head_dim + d for h in kept for d in range(head_dim)])
        # Copies of the module that share its tensors: pruning slices new ones, and the reference's out projection
        # gets a weight of its own before its columns are zeroed.
        shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
        trial: Any = copy.deepcopy(module, dict(shared))
        reference: Any = copy.deepcopy(module, dict(shared))
        try:
            with torch.no_grad():
                if queries:
                    _keep_query_heads(trial, torch.tensor(kept))
                else:
                    _keep_groups(trial, torch.arange(1, kv_heads))
                out = out_projection(module) or "o_proj"
                trial_out, reference_out = getattr(trial, out), getattr(reference, out)
                trial_out.weight = take(trial_out.weight, 1, columns)
                trial_out.in_features = len(columns)
                reference_out.weight = nn.Parameter(reference_out.weight.detach().clone())
                for h in gone:
                    reference_out.weight[:, h * head_dim:(h + 1) * head_dim] = 0
                kwargs = stateless(kwargs)
                # Per-head inputs (a position bias shared by the blocks) lose the same heads in the copy.
                index = torch.tensor(kept)
                cut_args, cut_kwargs = cut_per_head_inputs(args, kwargs, heads, index)
                got, expected = trial(*cut_args, **cut_kwargs), reference(*args, **kwargs)
        except Exception:
            return False
        return same_output(got, expected) and same_per_head(got, expected, heads, index)

    def unconfirmed(self, module: nn.Module, name: str) -> str:
        return (f"{name} ({type(module).__name__}) is attention with separate q/k/v/o projections, but a copy with "
                "one key/value group pruned (its k and v rows, its query heads' q rows and o_proj inputs) did not "
                "compute what masking those heads computes: its forward ties the heads to something their count "
                "does not set, so its heads are left alone")


def _keep_query_heads(module: nn.Module, kept: torch.Tensor) -> None:
    """Slice ``module`` to the query heads ``kept`` (the same ones in every group): their q rows, with the group
    size and the head counts the module keeps."""
    heads, kv_heads, head_dim = head_counts(module) or (0, 0, 0)
    attention: Any = module
    rows = (kept[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    query = getattr(attention, naming(module)[0])
    query.weight = take(query.weight, 0, rows)
    query.bias = take(query.bias, 0, rows)
    query.out_features = len(rows)
    keep_head_entries(module, heads, kept, (*PROJECTIONS, *OUT_PROJECTIONS), head_dim)
    for name, count in (("num_heads", len(kept)), ("num_key_value_groups", len(kept) // kv_heads)):
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, count)


def _keep_groups(module: nn.Module, kept: torch.Tensor) -> None:
    """Slice ``module`` to the key/value groups ``kept``: their k/v rows and their query heads' q rows, with the
    head counts the module keeps."""
    heads, kv_heads, head_dim = head_counts(module) or (0, 0, 0)
    per_group = heads // kv_heads
    attention: Any = module
    kv_rows = (kept[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    q_heads = (kept[:, None] * per_group + torch.arange(per_group)).reshape(-1)
    q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    for name, rows in zip(naming(module), (q_rows, kv_rows, kv_rows)):
        layer: Any = getattr(attention, name)
        layer.weight = take(layer.weight, 0, rows)
        layer.bias = take(layer.bias, 0, rows)
        layer.out_features = len(rows)
    keep_head_entries(module, heads, q_heads, (*PROJECTIONS, *OUT_PROJECTIONS), head_dim)
    for name, count in (("num_heads", len(q_heads)), ("num_key_value_heads", len(kept))):
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, count)
