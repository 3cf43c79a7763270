"""The bit checksum behind the weight fingerprints and the untouched-model check: any changed value changes it,
whatever the dtype, size or storage offset."""

from __future__ import annotations

import pytest
import torch

from acps_core._util.tensors import bits_checksum


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8,
                                   torch.bool, torch.complex64])
@pytest.mark.parametrize("size", [1, 3, 8, 1001])
def test_one_changed_value_changes_the_checksum(dtype: torch.dtype, size: int) -> None:
    base = (torch.arange(size) % 2 == 0) if dtype == torch.bool else torch.arange(size).to(dtype) / 7
    changed = base.clone()
    changed[-1] = ~changed[-1] if dtype == torch.bool else changed[-1] + 1
    for word in (torch.int64, torch.int32):
        assert bits_checksum(base, word) == bits_checksum(base.clone(), word)
        assert bits_checksum(base, word) != bits_checksum(changed, word)


def test_a_view_at_any_offset_sums_like_a_copy_of_it() -> None:
    storage = torch.arange(9, dtype=torch.float32)
    view = storage[1:]  # 8 floats starting 4 bytes in: not 8-byte aligned
    assert bits_checksum(view) == bits_checksum(view.clone())
    assert bits_checksum(view) != bits_checksum(storage[:8])


def test_the_older_32_bit_words_give_the_older_sum() -> None:
    values = torch.tensor([1.5, -2.25, 3.0, 0.1])
    assert bits_checksum(values, torch.int32) == int(values.view(torch.int32).sum(dtype=torch.int64))
    assert bits_checksum(values) == int(values.view(torch.int64).sum())
