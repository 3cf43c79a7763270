"""Where an attention module's heads sit: in the rows of a fused q/k/v projection (:class:`HeadLayout`), and in
the parameters that hold one entry per head (relative-position bias tables, attention biases, temperatures), found
by their shapes and cut with the heads, with the head counts its children keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from acps_core.layers.base import take


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads sit in the rows of a fused ``qkv`` projection."""

    heads: int
    key_dim: int
    value_dim: int
    #: Each head's q, k and v rows together (else every head's q rows, then every head's k rows, then v).
    head_major: bool

    @property
    def rows(self) -> int:
        return self.heads * (2 * self.key_dim + self.value_dim)

    def head_rows(self, kept: torch.Tensor) -> torch.Tensor:
        """The ``qkv`` rows of the heads ``kept``, in their order in the projection."""
        parts = (self.key_dim, self.key_dim, self.value_dim)
        if self.head_major:
            per_head = sum(parts)
            return (kept[:, None] * per_head + torch.arange(per_head)).reshape(-1)
        found, offset = [], 0
        for width in parts:
            found.append((offset + kept[:, None] * width + torch.arange(width)).reshape(-1))
            offset += self.heads * width
        return torch.cat(found)

    def row_channels(self) -> tuple[int, ...]:
        """For each ``qkv`` row, the head channel it counts with: a value row with its own channel, a query or
        key row with a channel of its head (what matters is that each head's rows count with that head)."""
        channel = torch.empty(self.rows, dtype=torch.long)
        for head in range(self.heads):
            rows = self.head_rows(torch.tensor([head]))
            within = torch.cat([torch.arange(width) % self.value_dim
                                for width in (self.key_dim, self.key_dim, self.value_dim)])
            channel[rows] = head * self.value_dim + within
        return tuple(channel.tolist())


def head_parameters(module: nn.Module, heads: int | None, skip: tuple[str, ...]) -> list[tuple[str, int]] | None:
    """The parameters of the module and its children but the projections (``skip``) that hold one entry per head
    (``heads``, by default ``num_heads``), each with that dim (a relative-position bias table of ``(positions,
    num_heads)``); None when one of them has several dims of ``num_heads`` entries."""
    heads = getattr(module, "num_heads", None) if heads is None else heads
    found = []
    for name, param in module.named_parameters():
        if name.split(".")[0] in skip:
            continue
        dims = [d for d, size in enumerate(param.shape) if size == heads]
        if isinstance(module.get_submodule(name.rpartition(".")[0]), nn.Embedding):
            dims = [d for d in dims if d == 1]  # a lookup table (T5's position bias): its columns are its outputs
        if len(dims) > 1:
            return None
        if dims:
            found.append((name, dims[0]))
    return found


def keep_head_entries(module: nn.Module, heads: int, kept: torch.Tensor, skip: tuple[str, ...],
                      head_dim: int = 0) -> None:
    """Slice the per-head parameters of ``module`` (see :func:`head_parameters`) to the heads ``kept``, and set
    the head counts, bias shapes and caches its children keep (and T5's ``inner_dim``, given ``head_dim``)."""
    for name, dim in head_parameters(module, heads, skip) or []:
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        setattr(owner, attr, take(getattr(owner, attr), dim, kept))
        if isinstance(owner, nn.Embedding):
            owner.embedding_dim = len(kept)
    for owner in module.modules():
        _resize(owner, heads, len(kept))
    attention: Any = module
    if head_dim and getattr(attention, "inner_dim", None) == heads * head_dim:
        attention.inner_dim = len(kept) * head_dim


def _resize(owner: nn.Module, heads: int, kept: int) -> None:
    """Head counts a child keeps of its own (``num_heads``, a bias shape holding it) and caches of per-head
    tensors (timm's attention-bias caches): set to the kept count, emptied."""
    for name, value in list(vars(owner).items()):
        if name.startswith("_") or name == "training":
            continue
        if name in ("num_heads", "num_attention_heads", "n_heads") and value == heads:
            setattr(owner, name, kept)
        elif name.endswith("_shape") and isinstance(value, tuple) and value and value[-1] == heads:
            setattr(owner, name, (*value[:-1], kept))
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            value.clear()
