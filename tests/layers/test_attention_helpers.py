"""What the trial of an attention module cuts: the per-head tensors it is given, never its input."""

from __future__ import annotations

import torch

from acps_core.layers.attention import cut_per_head_inputs, other_layout, per_head


def test_the_trial_cuts_per_head_tensors_but_not_the_input_nor_the_keys_source_however_passed() -> None:
    heads, kept = 4, torch.tensor([1, 3])
    image_like = torch.randn(2, 4, 4, 8)  # an input that happens to have as many rows as heads
    bias = torch.randn(1, 4, 6, 6)
    mask = torch.zeros(2, 1, 6, 6)  # broadcast over the heads: stays
    args, kwargs = cut_per_head_inputs((), {"hidden_states": image_like, "position_bias": bias, "mask": mask,
                                            "key_value_states": image_like}, heads, kept)
    assert args == () and kwargs["hidden_states"] is image_like and kwargs["key_value_states"] is image_like
    assert torch.equal(kwargs["position_bias"], bias[:, [1, 3]]) and kwargs["mask"] is mask
    args, kwargs = cut_per_head_inputs((image_like, bias), {"attn_mask": bias}, heads, kept)
    assert args[0] is image_like and torch.equal(args[1], bias[:, [1, 3]])
    assert torch.equal(kwargs["attn_mask"], bias[:, [1, 3]])


def test_per_head_layouts() -> None:
    assert per_head((2, 4, 6, 6), 4) and not per_head((2, 1, 6, 6), 4) and not per_head((2, 4, 6), 4)
    assert not per_head((2, 1, 6, 6), 1)  # one head: nothing to cut
    assert other_layout((1, 1, 4, 5, 15), 4) and not other_layout((1, 1, 3, 4, 4), 4)
    assert not other_layout((2, 4, 6, 6), 4)  # the layout acps maps
