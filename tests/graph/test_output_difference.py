"""The comparison behind every check by execution: float32 outputs must agree to rounding; half-precision ones
to two units of their dtype's rounding, which still tells a wrongly pruned channel apart."""

from __future__ import annotations

import pytest
import torch

from acps_core.graph.masking import output_difference


def test_float32_outputs_must_agree_to_rounding() -> None:
    expected = torch.linspace(-1, 1, 64)
    assert output_difference(expected + 1e-6, expected) is None
    assert "changed by up to" in str(output_difference(expected + 1e-3, expected))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_outputs_may_differ_by_their_rounding_but_not_by_a_channel(dtype: torch.dtype) -> None:
    expected = torch.linspace(-1, 1, 64).to(dtype)
    eps = torch.finfo(dtype).eps
    assert output_difference(expected + eps, expected) is None  # one unit of rounding at the output's scale
    # A channel mapped wrong moves the output by a share of its scale, well above the rounding.
    assert "changed by up to" in str(output_difference(expected + 8 * eps, expected))
    assert "changed by up to" in str(output_difference(expected * 1.05, expected))
