"""A forward that follows its pruned heads: only a reshape that no longer fits, and only at the input's width,
is changed; everything else runs as written."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from acps_core.layers.following import FollowHeads, fitted_sizes, follow_heads, follows_heads


@pytest.mark.parametrize(("shape", "sizes", "width", "channel_dim", "expected"), [
    ((2, 5, 3, 8), (2, 5, 32), 32, -1, (2, 24)),  # heads merged back to the input width: the kept width
    ((2, 5, 4, 8), (2, 5, 32), 32, -1, None),  # fits as written: left alone
    ((2, 5, 3, 8), (2, 5, -1), 32, -1, None),  # already inferred
    ((2, 5, 3, 8), (2, 5, 48), 32, -1, None),  # not the input width: left to fail as written
    ((2, 5, 3, 7), (2, 32, 32), 32, -1, None),  # no size of that value would make them fit
    ((32, 5, 3, 8), (32, 5, 32), 32, -1, (2, 24)),  # the one at the channel dim, not another of that value
    ((2, 3, 8, 8, 32), (2, 32, 8, 32), 32, 1, (1, 24)),  # channels first: the channel dim, not the last match
    ((2, 3, 8, 8, 8), (2, 8, 8, 8), 8, 1, (1, 24)),
    ((0, 5, 3, 8), (0, 5, 32), 32, -1, (2, 24)),  # an empty batch fits any sizes, and still gets the width
    ((0, 5, 4, 8), (0, 5, 32), 32, -1, None),
    ((2, 5, 3 * 7 * 8), (2, 5, 3, 7, 9), 64, -1, (4, 8)),  # a head width written C // num_heads, one head gone
    ((2, 5, 3 * 8 * 8), (2, 5, 3, 8, 7), 63, -1, (4, 8)),  # ... and with one input channel gone
    ((2, 5, 3 * 7 * 8), (2, 5, 3, 7, 10), 64, -1, None),  # a last size not derived so: left to fail
])
def test_fitted_sizes(shape: tuple[int, ...], sizes: tuple[int, ...], width: int, channel_dim: int,
                      expected: tuple[int, int] | None) -> None:
    assert fitted_sizes(shape, sizes, width, channel_dim) == expected


def test_the_mode_fixes_reshape_and_view_of_either_spelling_and_nothing_else() -> None:
    x = torch.arange(2 * 3 * 8.0).reshape(2, 3, 8)
    with FollowHeads(32):
        assert x.reshape(2, 3, 32).shape == (2, 3, 8)  # sizes given one by one ...
        assert x.view((2, 3, 32)).shape == (2, 3, 8)  # ... or as a tuple
        assert torch.reshape(x, (2, 3, 32)).shape == (2, 3, 8)
        assert x.reshape(torch.tensor(2), torch.tensor(3), torch.tensor(32)).shape == (2, 3, 8)  # (jit.trace)
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
    assert follows_heads(module) and len(module._forward_pre_hooks) == 1
    expected = (x @ module.weight.T).reshape(2, 5, 12)
    torch.testing.assert_close(module(x), expected)
    with pytest.raises(RuntimeError):
        module(torch.randn(2, 5, 7))  # a failing call leaves the mode ...
    with pytest.raises(RuntimeError):
        torch.randn(2, 3, 8).reshape(2, 3, 16)  # ... so nothing outside the module follows
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.weight.zero_()
    assert module(x).abs().sum() > 0 and twin(x).abs().sum() == 0  # the copy computes with its own weights
    torch.testing.assert_close(module(x[:0]), expected[:0])  # an empty batch keeps the heads' width
    traced = torch.jit.trace(module, x)
    torch.testing.assert_close(traced(x), expected)


def test_replicas_follow_with_their_own_parameters() -> None:
    """nn.DataParallel copies a module per device and calls each in its own thread: each replica must run its
    own forward with its own parameters."""
    module = Merge(heads=3)
    follow_heads(module, -1)
    replica = module._replicate_for_data_parallel()  # what nn.parallel.replicate makes for each device
    replica.weight = nn.Parameter(torch.zeros_like(module.weight))
    x = torch.randn(2, 5, 16)
    assert replica(x).abs().sum() == 0 and module(x).abs().sum() > 0


def test_a_batch_size_torch_export_keeps_dynamic_stays_dynamic() -> None:
    """Sizes torch.export keeps symbolic are never taken for the input width (no guard on the batch size)."""
    module = Merge(heads=3)
    follow_heads(module, -1)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(module, (torch.randn(2, 5, 16),), dynamic_shapes=({0: batch},))
    x = torch.randn(16, 5, 16)  # a batch of the input's width
    torch.testing.assert_close(exported.module()(x), module(x))
