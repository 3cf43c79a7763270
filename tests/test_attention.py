"""HeadPrunedMultiheadAttention computes what nn.MultiheadAttention computes, with the heads it kept."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.attention import HeadPrunedMultiheadAttention, shrink_heads

MASKS = {
    "none": {},
    "bool attn_mask": {"attn_mask": torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) > 0.7},
    "float attn_mask": {"attn_mask": torch.randn(5, 5, generator=torch.Generator().manual_seed(1))},
    "key padding": {"key_padding_mask": torch.tensor([[False] * 4 + [True]] * 3)},
    "causal": {"attn_mask": torch.ones(5, 5).triu(1).bool(), "is_causal": True},
    "no weights": {"need_weights": False},
    "per-head weights": {"average_attn_weights": False},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_with_every_head_it_matches_torch(batch_first, mask) -> None:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    pruned = copy.deepcopy(reference)
    pruned.__class__ = HeadPrunedMultiheadAttention
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    expected, expected_weights = reference(x, x, x, **MASKS[mask])
    got, weights = pruned(x, x, x, **MASKS[mask])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights)


def test_dropping_a_head_equals_zeroing_its_output_columns() -> None:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pruned = copy.deepcopy(reference)
    keep = torch.tensor([c for c in range(16) if not 4 <= c < 8])  # drop head 1
    shrink_heads(pruned, keep)
    pruned.out_proj.weight = nn.Parameter(pruned.out_proj.weight.detach()[:, keep])
    with torch.no_grad():
        reference.out_proj.weight[:, 4:8] = 0
        torch.testing.assert_close(pruned(x, x, x)[0], reference(x, x, x)[0])
    assert pruned.num_heads == 3 and pruned.in_proj_weight.shape == (36, 16)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        x = self.embed(x)
        return self.fc((x + self.attn(x, x, x, need_weights=False)[0]).mean(1))


def test_heads_of_torch_attention_are_searched_pruned_restored_and_exported(tmp_path) -> None:
    import onnxruntime

    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(4, 7, 6)
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.4\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, torch.randint(0, 3, (4,))],
                                            str(tmp_path / "prune.cfg"))
    assert result.layers["attn"].kept < 32 and result.layers["attn"].kept % 8 == 0
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert isinstance(pruned.attn, nn.MultiheadAttention)
    assert pruned.attn.num_heads * 8 == result.layers["attn"].kept
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    restored = acps.restore_prune_retrain_model(Encoder().eval(), x, tmp_path / "prune.record",
                                                tmp_path / "prune.cfg", tmp_path / "tuned.pth")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), pruned(x))
    path = acps.save_prune_retrain_model(restored, tmp_path / "encoder", x, input_names=["x"])
    (out,) = onnxruntime.InferenceSession(str(path)).run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, restored(x).numpy(), rtol=1e-4, atol=1e-5)
