"""The default loss for a language model's logits: integer labels per token, -100 ignored, out-of-range refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from acps_core._util.data import default_loss, label_kind
from acps_core.errors import DataError


def test_token_labels_get_a_cross_entropy_over_the_last_dim_ignoring_minus_100() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[:, -1] = -100
    assert label_kind(logits, labels) == "token_cross_entropy"
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, :-1].reshape(-1))
    torch.testing.assert_close(default_loss(logits, labels), expected)


def test_class_indices_over_dim_1_still_win_when_both_shapes_fit() -> None:
    # (batch, classes, positions) with (batch, positions): segmentation-style, classes on dim 1
    assert label_kind(torch.randn(2, 4, 4), torch.randint(0, 4, (2, 4))) == "cross_entropy"


def test_token_labels_out_of_range_are_refused_with_the_range() -> None:
    with pytest.raises(DataError, match=r"outside \[0, 7\)"):
        label_kind(torch.randn(2, 5, 7), torch.full((2, 5), 7))
