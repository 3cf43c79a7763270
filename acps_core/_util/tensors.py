"""The one walker over nested tensors: a model's inputs and outputs are tensors, or tuples, lists and dicts of
them, nested (a named tuple or a Hugging Face ``ModelOutput`` included). Everything in acps that visits or
rebuilds such a structure goes through :func:`tensors_in` and :func:`map_tensors`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: What counts as a tensor by default.
TENSOR: tuple[type, ...] = (torch.Tensor,)


def tensors_in(data: Any, kinds: tuple[type, ...] = TENSOR) -> list[Any]:
    """Every tensor (every instance of ``kinds``) in ``data``, depth first, in order."""
    if isinstance(data, kinds):
        return [data]
    if isinstance(data, (tuple, list)):
        return [t for item in data for t in tensors_in(item, kinds)]
    if isinstance(data, dict):
        return [t for item in data.values() for t in tensors_in(item, kinds)]
    return []


def map_tensors(data: Any, fn: Callable[[Any], Any], kinds: tuple[type, ...] = TENSOR) -> Any:
    """``data`` rebuilt with ``fn(t)`` in place of every tensor ``t`` (every instance of ``kinds``).

    Lists and tuples keep their type (a named tuple too); dicts, ``ModelOutput`` included, come back as plain
    dicts. Anything else is kept as it is.
    """
    if isinstance(data, kinds):
        return fn(data)
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # a named tuple takes its fields as arguments
        return type(data)(*(map_tensors(item, fn, kinds) for item in data))
    if isinstance(data, (tuple, list)):
        return type(data)(map_tensors(item, fn, kinds) for item in data)
    if isinstance(data, dict):
        return {key: map_tensors(value, fn, kinds) for key, value in data.items()}
    return data


def bits_checksum(tensor: torch.Tensor, word: torch.dtype = torch.int64) -> int:
    """A sum of the tensor's bits read as integers of ``word`` (wrapping on overflow): it changes when a value
    changes, and depends on nothing but the values, dtype and size. Summing 64-bit words runs at memory speed;
    ``torch.int32`` words summed into 64 bits are the older, slower checksum (a tenth of the speed on a CPU) that
    earlier weight fingerprints used. A size the word does not divide is read in narrower words."""
    data = tensor.detach().contiguous().reshape(-1)
    if data.is_complex():
        data = torch.view_as_real(data).reshape(-1)
    raw = data.view(torch.uint8)
    for dtype in dict.fromkeys((word, torch.int32)):
        size = torch.empty((), dtype=dtype).element_size()
        if raw.numel() % size == 0:
            if raw.storage_offset() % size:
                raw = raw.clone()  # a view that starts inside a word: realigned, so that only the values count
            words = raw.view(dtype)
            return int(words.sum() if dtype == torch.int64 else words.sum(dtype=torch.int64))
    return int(raw.sum(dtype=torch.int64))
