"""``nn.Embedding``: a producer of channels (its ``embedding_dim``, the columns of its ``(num_embeddings, dim)``
weight) that reads no channels, only indices. A transformer's token, position and type embeddings start its
residual stream, so pruning the hidden width prunes their columns; a language-model head tied to the token
embedding (the same weight) loses the same columns, and the two stay tied."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from acps_core.graph.model import LayerGeometry
from acps_core.layers.base import STATISTICS, LayerAdapter, plain_subclass, take


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding`` (and subclasses that keep its forward and parameters)."""

    def traced_whole(self, module: nn.Module) -> bool:
        return plain_subclass(module, (nn.Embedding,), {"weight"}, STATISTICS)

    def kind(self, module: nn.Module) -> str:
        return "Embedding"

    def geometry(self, name: str, module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                 dtype: torch.dtype) -> LayerGeometry:
        """A lookup: its "input channels" are the table's rows; it multiplies nothing (see ``LayerGeometry``)."""
        embedding = cast(Any, module)
        return LayerGeometry(name, "Embedding", embedding.num_embeddings, embedding.embedding_dim, 1, (1,), (1,),
                             input_shape, output_shape, embedding.weight.dtype, embedding.weight.dtype)

    def input_dim(self, module: nn.Module, ndim: int) -> int:
        return ndim - 1

    def output_dim(self, module: nn.Module, ndim: int) -> int:
        return ndim - 1

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int | tuple[int, ...]]]:
        return [("weight", 1, 0)]

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return []

    def out_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).embedding_dim)

    def in_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).num_embeddings)

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        embedding = cast(Any, module)
        embedding.weight = take(embedding.weight, 1, index)
        embedding.embedding_dim = len(index)

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        raise NotImplementedError("an embedding reads indices, not channels")
