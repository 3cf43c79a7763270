"""Attention holding depthwise convolutions over groups of its heads' values, shared by several blocks (timm's
CoaT: factorised attention with a convolutional relative position encoding): the blocks that share one lose the
same heads, the convolutions and their split sizes are sliced with them (a convolution left with no head is
dropped), and the head width the forward derives from its input (``C // num_heads``) follows."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from timm.models.coat import ConvRelPosEnc, FactorAttnConvRelPosEnc
from torch import nn

import acps_core as acps
from acps_core.graph.build import build_channel_graph
from acps_core.graph.verify import verify_groups
from acps_core.layers import fused_attention
from acps_core.layers.following import follows_heads
from acps_core.layers.head_convs import head_convs, keep_head_convs
from testing.flops import counted_macs, graph_macs
from testing.zoo import pruned_and_masked, random_keep

SIDE, DIM, HEADS = 4, 32, 4
HEAD_DIM = DIM // HEADS
WINDOWS = {3: 2, 5: 1, 7: 1}  # heads 0-1 in the first convolution, head 2 in the second, head 3 in the third


def _encoding() -> ConvRelPosEnc:
    return ConvRelPosEnc(head_chs=HEAD_DIM, num_heads=HEADS, window=dict(WINDOWS))


class TwoBlocks(nn.Module):
    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        first = _encoding()
        self.attn1 = FactorAttnConvRelPosEnc(DIM, HEADS, qkv_bias=True, shared_crpe=first)
        self.attn2 = FactorAttnConvRelPosEnc(DIM, HEADS, qkv_bias=True, shared_crpe=first if shared else _encoding())
        self.head = nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn1(x, (SIDE, SIDE))
        x = x + self.attn2(x, (SIDE, SIDE))
        return self.head(x[:, 0])


def _model(shared: bool = True) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = TwoBlocks(shared).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model, torch.randn(2, 1 + SIDE * SIDE, 8)


@pytest.mark.parametrize("shared", [True, False])
def test_blocks_sharing_the_convolutions_lose_the_same_heads(shared: bool) -> None:
    model, x = _model(shared)
    graph = build_channel_graph(model, x)
    assert verify_groups(model, graph, x) == []
    heads = [g for g in graph.groups if any(p.startswith("attn") for p in g.producers) and g.unit == HEAD_DIM]
    assert all(g.prunable for g in heads)
    assert sorted(len(g.producers) for g in heads) == ([2] if shared else [1, 1])
    stream = next(g for g in graph.groups if "embed" in g.producers)
    assert stream.prunable  # the head width written C // num_heads follows a pruned input

    keep = random_keep(graph, seed=3)
    for group in heads:
        keep[group.id] = [c for c in range(DIM) if c // HEAD_DIM != 2]  # the second convolution's only head
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert (pruned.attn1.crpe is pruned.attn2.crpe) == shared
    for attention in (pruned.attn1, pruned.attn2):
        assert attention.num_heads == HEADS - 1 and follows_heads(attention)
        crpe = attention.crpe
        assert len(crpe.conv_list) == 2 and [c.out_channels for c in crpe.conv_list] == [16, 8]
        assert crpe.channel_splits == [16, 8] and crpe.head_splits == [2, 1] and crpe.window == {3: 2, 7: 1}

    kept = {g.id: len(keep[g.id]) for g in graph.prunable_groups}
    assert graph_macs(graph, {}) == pytest.approx(counted_macs(model, x), rel=1e-6)
    # The cost counts the convolutions' mean per value channel; their windows differ from head to head.
    assert graph_macs(graph, kept) == pytest.approx(counted_macs(pruned, x), rel=0.01)


def test_searched_pruned_saved_and_restored(tmp_path: Path) -> None:
    model, x = _model()
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.4\nascend_optimized: false\n")
    labels = torch.randint(0, 10, (2,))
    acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, labels], str(tmp_path / "prune.cfg"))
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert pruned.attn1.crpe is pruned.attn2.crpe
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    fused_attention._PROVEN.clear()  # as in a fresh process
    fused_attention._FOLLOWING.clear()
    restored = acps.restore_prune_retrain_model(_model()[0], x, tmp_path / "prune.record", tmp_path / "prune.cfg",
                                                tmp_path / "tuned.pth")
    buffer = io.BytesIO()
    torch.save(pruned, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), pruned(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)


def test_convolutions_are_recognised_by_what_they_cover_and_sliced_once() -> None:
    crpe = _encoding()
    assert head_convs(crpe, HEADS, HEAD_DIM) is crpe.conv_list
    assert head_convs(crpe, HEADS + 1, HEAD_DIM) is None  # they cover four heads, not five
    assert head_convs(crpe, 2 * HEADS, HEAD_DIM // 2) is not None  # eight heads of four would be whole too
    assert head_convs(crpe, HEADS * HEAD_DIM // 3, 3) is None  # but not heads of three channels
    crpe.channel_splits = [8, 8, 16]  # split sizes that are not the convolutions' widths
    assert head_convs(crpe, HEADS, HEAD_DIM) is None

    crpe = _encoding()
    weight = crpe.conv_list[0].weight.detach().clone()
    kept = torch.tensor([1, 2])
    keep_head_convs(crpe, HEADS, HEAD_DIM, kept)
    keep_head_convs(crpe, HEADS, HEAD_DIM, kept)  # a second module sharing it: left as it is
    assert crpe.channel_splits == [8, 8] and crpe.head_splits == [1, 1] and crpe.window == {3: 1, 5: 1}
    torch.testing.assert_close(crpe.conv_list[0].weight, weight[HEAD_DIM:])
    assert crpe.conv_list[0].groups == crpe.conv_list[0].in_channels == HEAD_DIM
    with pytest.raises(ValueError, match="does not hold convolutions over 3 heads"):
        keep_head_convs(crpe, 3, HEAD_DIM, torch.tensor([0]))


class OneBlockIdle(TwoBlocks):
    """The second block shares the encoding but the forward never calls it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        return self.head((x + self.attn1(x, (SIDE, SIDE)))[:, 0])


def test_heads_sharing_the_convolutions_with_a_module_never_called_are_left_alone() -> None:
    torch.manual_seed(0)
    model, x = OneBlockIdle(shared=True).eval(), torch.randn(2, 1 + SIDE * SIDE, 8)
    graph = build_channel_graph(model, x)
    heads = next(g for g in graph.groups if g.producers == ["attn1"])
    assert not heads.prunable and "attn2 holds the ConvRelPosEnc these heads share" in heads.reasons[0]
    assert verify_groups(model, graph, x) == []
