"""A forward that follows its pruned heads: only a reshape that no longer fits, and only at the input's width,
is changed; everything else runs as written."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from acps_core.layers.following import FollowHeads, HeadsFollowingForward, fitted_sizes, follow_heads


@pytest.mark.parametrize(("shape", "sizes", "width", "expected"), [
    ((2, 5, 3, 8), (2, 5, 32), 32, (2, 5, -1)),  # heads merged back to the input width: inferred
    ((2, 5, 4, 8), (2, 5, 32), 32, (2, 5, 32)),  # fits as written: left alone
    ((2, 5, 3, 8), (2, 5, -1), 32, (2, 5, -1)),  # already inferred
    ((2, 5, 3, 8), (2, 5, 48), 32, (2, 5, 48)),  # not the input width: left to fail as written
    ((2, 5, 3, 7), (2, 32, 32), 32, (2, 32, 32)),  # no placement of -1 fits
    ((32, 5, 3, 8), (32, 5, 32), 32, (32, 5, -1)),  # the last size of that value is the one inferred
])
def test_fitted_sizes(shape: tuple[int, ...], sizes: tuple[int, ...], width: int,
                      expected: tuple[int, ...]) -> None:
    assert fitted_sizes(torch.Size(shape), sizes, width) == expected


def test_the_mode_fixes_reshape_and_view_of_either_spelling_and_nothing_else() -> None:
    x = torch.arange(2 * 3 * 8.0).reshape(2, 3, 8)
    with FollowHeads(32):
        assert x.reshape(2, 3, 32).shape == (2, 3, 8)  # sizes given one by one ...
        assert x.view((2, 3, 32)).shape == (2, 3, 8)  # ... or as a tuple
        assert torch.reshape(x, (2, 3, 32)).shape == (2, 3, 8)
        assert x.reshape(6, 8).shape == (6, 8)
        with pytest.raises(RuntimeError):
            x.reshape(2, 3, 16)  # not the width it follows: fails as it would without the mode
    with pytest.raises(RuntimeError):
        x.reshape(2, 3, 32)  # outside the block, nothing changes


class Merge(nn.Module):
    """Heads merged back with the input width read from the input."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.weight = nn.Parameter(torch.randn(heads * 4, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        heads = (x @ self.weight.T).reshape(b, n, self.heads, 4)
        return heads.reshape(b, n, c)


def test_an_installed_forward_follows_the_input_of_each_call_and_copies_with_the_module() -> None:
    module = Merge(heads=3)
    x = torch.randn(2, 5, 16)
    with pytest.raises(RuntimeError):
        module(x)  # 12 channels cannot be reshaped to 16
    follow_heads(module, -1)
    follow_heads(module, -1)  # once is enough
    assert isinstance(vars(module)["forward"], HeadsFollowingForward)
    assert vars(module)["forward"].module is module
    expected = (x @ module.weight.T).reshape(2, 5, 12)
    torch.testing.assert_close(module(x), expected)
    twin = copy.deepcopy(module)
    assert vars(twin)["forward"].module is twin  # the copy's forward is its own
    with torch.no_grad():
        twin.weight.zero_()
    assert module(x).abs().sum() > 0 and twin(x).abs().sum() == 0
