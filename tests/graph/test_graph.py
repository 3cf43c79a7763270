"""The channel graph finds the coupled channel groups of a traced model and says why a layer is left alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acps_core.errors import GraphError
from acps_core.graph.build import build_channel_graph
from acps_core.graph.masking import masked_channels
from acps_core.graph.model import ChannelUse
from acps_core.graph.verify import verify_groups
from acps_core.prune.slicing import prune_channels
from testing.models import ConvChain, pooled_chain, randomize_norms


def group_of(graph, producer: str):
    (group,) = [g for g in graph.groups if producer in g.producers]
    return group


def test_chain_groups_follow_conv_bn_and_feed_the_next_layer() -> None:
    graph = build_channel_graph(ConvChain().eval(), torch.randn(4, 3, 8, 8))
    assert [g.producers for g in graph.groups] == [["conv1"], ["conv2"], ["conv3"], ["fc1"], ["fc2"]]
    conv1 = group_of(graph, "conv1")
    assert conv1.channels == 32
    assert conv1.followers == [ChannelUse("bn1", "BatchNorm2d")]
    assert conv1.consumers == [ChannelUse("conv2", "Conv2d")]
    assert conv1.prunable


def test_flatten_maps_each_channel_to_its_spatial_block_of_linear_inputs() -> None:
    graph = build_channel_graph(ConvChain(size=8).eval(), torch.randn(2, 3, 8, 8))
    conv3 = group_of(graph, "conv3")
    # conv3 outputs 64 x 4 x 4: channel c is fc1 inputs 16c .. 16c + 15
    assert conv3.consumers == [ChannelUse("fc1", "Linear", offset=0, block=16)]


def test_global_pool_then_flatten_maps_one_to_one() -> None:
    graph = build_channel_graph(pooled_chain().eval(), torch.randn(2, 3, 12, 12))
    assert group_of(graph, "3").consumers == [ChannelUse("8", "Linear", offset=0, block=1)]


def test_output_layer_is_never_prunable_and_says_why() -> None:
    graph = build_channel_graph(ConvChain().eval(), torch.randn(2, 3, 8, 8))
    assert not graph.layers["fc2"].prunable
    assert "model's output" in graph.layers["fc2"].reason
    assert graph.output_layers == ["fc2"]


def test_geometry_comes_from_the_real_activation_shapes() -> None:
    graph = build_channel_graph(ConvChain(size=8).eval(), torch.randn(3, 3, 8, 8))
    conv3 = graph.layers["conv3"].geometry
    assert conv3.input_shape == (1, 64, 4, 4) and conv3.output_shape == (1, 64, 4, 4)
    assert conv3.macs() == 4 * 4 * 64 * 64 * 9
    assert conv3.macs(in_channels=32, out_channels=16) == 4 * 4 * 16 * 32 * 9
    fc1 = graph.layers["fc1"].geometry
    assert fc1.macs() == 64 * 4 * 4 * 64


def test_channel_counts_shrink_consumers_by_the_block() -> None:
    graph = build_channel_graph(ConvChain(size=8).eval(), torch.randn(2, 3, 8, 8))
    conv3 = group_of(graph, "conv3")
    assert graph.channel_counts(graph.layers["fc1"], {conv3.id: 48}) == (48 * 16, 64)
    assert graph.channel_counts(graph.layers["conv3"], {conv3.id: 48}) == (64, 48)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv_a = nn.Conv2d(16, 16, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.bn_a(self.conv_a(x)))
        return self.head(x).mean((2, 3))


def test_residual_add_couples_both_producers_into_one_group() -> None:
    graph = build_channel_graph(Residual().eval(), torch.randn(2, 3, 8, 8))
    group = group_of(graph, "stem")
    assert sorted(group.producers) == ["conv_a", "stem"]
    assert {u.layer for u in group.consumers} == {"conv_a", "head"}
    assert group.prunable


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 24, 1)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.bn = nn.BatchNorm2d(24)
        self.project = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.project(torch.relu(self.bn(self.dw(torch.relu(self.expand(x))))))
        return self.fc(x.mean((2, 3)))


def test_depthwise_conv_follows_its_input_group() -> None:
    graph = build_channel_graph(Depthwise().eval(), torch.randn(2, 3, 8, 8))
    group = group_of(graph, "expand")
    assert [u.layer for u in group.followers] == ["dw", "bn"]
    assert [u.layer for u in group.consumers] == ["project"]
    assert graph.layers["dw"].out_group == group.id
    assert graph.layers["dw"].in_groups == [group.id]
    dw = graph.layers["dw"].geometry
    assert dw.macs(in_channels=16, out_channels=16) == 8 * 8 * 16 * 9


class Sliced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        x = self.conv1(x)
        x = x[:, :4]  # an op acps cannot map channel by channel
        return self.conv2(x).flatten(1)


def test_unmappable_op_blocks_the_group_and_names_the_source_line() -> None:
    graph = build_channel_graph(Sliced().eval(), torch.randn(2, 3, 8, 8))
    reason = graph.layers["conv1"].reason
    assert not graph.layers["conv1"].prunable
    assert "getitem" in reason and "test_graph.py:" in reason


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv2(self.conv1(x) * self.scale).flatten(1)


def test_a_bare_per_channel_parameter_is_sliced_with_the_channels() -> None:
    model = Scaled().eval()
    with torch.no_grad():
        model.scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    graph = build_channel_graph(model, x)
    group = graph.group(graph.layers["conv1"].out_group)
    assert group.prunable
    assert ChannelUse("scale", "Parameter", dim=0) in group.followers
    pruned = copy.deepcopy(model)
    prune_channels(pruned, graph, {group.id: [0, 2, 5]})
    assert pruned.scale.shape == (3, 1, 1)
    with masked_channels(model, graph, {group.id: [0, 2, 5]}), torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))


class Unrelated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        noise = torch.linspace(0, 1, 8).view(1, 8, 1, 1)  # a per-channel tensor that is not the model's
        return self.conv2(self.conv1(x) * noise).flatten(1)


def test_per_channel_constant_that_is_not_a_parameter_blocks_the_group() -> None:
    graph = build_channel_graph(Unrelated().eval(), torch.randn(2, 3, 8, 8))
    assert not graph.layers["conv1"].prunable
    assert "no prunable layer produces" in graph.layers["conv1"].reason


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2.weight = self.conv1.weight
        self.stem = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.conv2(self.conv1(self.stem(x)))).mean((2, 3))


def test_shared_weights_are_never_pruned() -> None:
    graph = build_channel_graph(Shared().eval(), torch.randn(2, 3, 8, 8))
    assert "shared with conv2" in graph.layers["conv1"].reason
    assert "shared with conv1" in graph.layers["conv2"].reason


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)
        self.unused = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.block(self.block(self.stem(x)))
        return self.head(x.mean((2, 3)))


def test_layer_called_twice_on_its_channels_is_pruned_and_unused_layer_explained() -> None:
    model, x = CalledTwice().eval(), torch.randn(2, 3, 8, 8)
    graph = build_channel_graph(model, x)
    # Its second call reads its own outputs where the first read the stem's: one set of channels for both.
    assert graph.layers["block"].reason is None and graph.layers["block"].calls == 2
    assert graph.group(graph.layers["block"].out_group).producers == ["stem", "block"]
    assert verify_groups(model, graph, x) == []
    assert "not called" in graph.layers["unused"].reason
    assert graph.layers["unused"].geometry is None


class ChannelSplitView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).sum(1)
        return self.conv2(x).flatten(1)


def test_channels_split_into_units_and_summed_over_the_units_are_blocked() -> None:
    graph = build_channel_graph(ChannelSplitView().eval(), torch.randn(2, 3, 8, 8))
    assert "'sum'" in graph.layers["conv1"].reason and "reduces over the channel" in graph.layers["conv1"].reason


def test_model_that_raises_in_forward_is_a_graph_error() -> None:
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom in forward")

    with pytest.raises(GraphError, match="boom in forward"):
        build_channel_graph(Broken(), torch.randn(2, 3))


def test_tracing_leaves_no_hook_and_works_in_train_mode_models() -> None:
    model = ConvChain()
    before = {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}
    build_channel_graph(model.eval(), torch.randn(2, 3, 8, 8))
    after = {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}
    assert before == after
    assert not nn.modules.module._global_forward_hooks


def _physically_pruned(model: ConvChain, keep: dict[str, list[int]]) -> ConvChain:
    """ConvChain with channels sliced by hand (independent of acps) for the equivalence check."""
    small = copy.deepcopy(model)
    k1, k2, k3, kf = (torch.tensor(keep[n]) for n in ("conv1", "conv2", "conv3", "fc1"))

    def conv(layer, out_idx, in_idx):
        layer.weight = nn.Parameter(layer.weight.detach()[out_idx][:, in_idx])
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach()[out_idx])

    def bn(layer, idx):
        layer.weight = nn.Parameter(layer.weight.detach()[idx])
        layer.bias = nn.Parameter(layer.bias.detach()[idx])
        layer.running_mean = layer.running_mean[idx]
        layer.running_var = layer.running_var[idx]

    conv(small.conv1, k1, torch.arange(3))
    bn(small.bn1, k1)
    conv(small.conv2, k2, k1)
    bn(small.bn2, k2)
    conv(small.conv3, k3, k2)
    bn(small.bn3, k3)
    fc1_inputs = (k3[:, None] * 16 + torch.arange(16)).flatten()
    small.fc1.weight = nn.Parameter(small.fc1.weight.detach()[kf][:, fc1_inputs])
    small.fc1.bias = nn.Parameter(small.fc1.bias.detach()[kf])
    small.fc2.weight = nn.Parameter(small.fc2.weight.detach()[:, kf])
    return small


def test_masking_the_groups_equals_slicing_the_layers() -> None:
    torch.manual_seed(0)
    model = randomize_norms(ConvChain(size=8)).eval()
    x = torch.randn(5, 3, 8, 8)
    graph = build_channel_graph(model, x)
    generator = torch.Generator().manual_seed(1)
    keep = {}
    for name in ("conv1", "conv2", "conv3", "fc1"):
        group = group_of(graph, name)
        count = group.channels // 2
        keep[name] = sorted(torch.randperm(group.channels, generator=generator)[:count].tolist())
    ids = {name: group_of(graph, name).id for name in keep}
    with masked_channels(model, graph, {ids[n]: k for n, k in keep.items()}), torch.no_grad():
        masked = model(x)
    with torch.no_grad():
        sliced = _physically_pruned(model, keep)(x)
        full = model(x)
    torch.testing.assert_close(masked, sliced, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked, full, atol=1e-3)  # the masking did something


class HeadAttention(nn.Module):
    def __init__(self, width: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        weights = (q @ k.transpose(-2, -1) / self.head_dim ** 0.5).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, -1))


class TinyViT(nn.Module):
    def __init__(self, width: int = 32, head_dim: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 17, width))
        self.ln1, self.ln2, self.ln = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = HeadAttention(width, head_dim)
        self.fc1, self.fc2 = nn.Linear(width, 64), nn.Linear(64, width)
        self.gamma = nn.Parameter(torch.rand(width))
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = x + self.attn(self.ln1(x))
        x = x + self.gamma * self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(self.ln(x)[:, 0])


def test_transformer_stream_heads_and_mlp_are_prunable_and_exact() -> None:
    torch.manual_seed(0)
    model = TinyViT().double().eval()
    for norm in (model.ln1, model.ln2, model.ln):
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    graph = build_channel_graph(model, x)
    stream = group_of(graph, "patch")
    assert sorted(stream.producers) == ["attn.out", "fc2", "patch"]
    assert {u.layer for u in stream.followers} == {"cls", "pos", "ln1", "ln2", "ln", "gamma"}
    heads = group_of(graph, "attn.q")
    assert sorted(heads.producers) == ["attn.k", "attn.q", "attn.v"] and heads.unit == 8
    assert [u.layer for u in heads.consumers] == ["attn.out"]
    assert all(g.prunable for g in graph.groups if g.name != "head")
    generator = torch.Generator().manual_seed(1)
    keep = {}
    for group in graph.prunable_groups:
        atoms = group.atoms(torch.rand(group.channels, generator=generator))
        keep[group.id] = sorted(c for atom in atoms[len(atoms) // 2:] for c in atom)
    pruned = copy.deepcopy(model)
    prune_channels(pruned, graph, keep)
    assert pruned.attn.q.out_features == 16 and pruned.ln1.normalized_shape == (16,)
    with masked_channels(model, graph, keep), torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))


def test_aligned_atoms_take_the_same_channel_of_every_shuffled_block() -> None:
    from acps_core.graph.model import atom_size, channel_atoms, structure_violation

    # 12 channels: 2 shuffled blocks of 6 (aligned), and 4 blocks of 3 that must keep equal counts.
    scores = torch.tensor([5.0, 1, 9, 2, 8, 3, 0, 7, 4, 6, 1, 2])
    atoms = channel_atoms(12, 1, 4, scores, aligned=2)
    assert atom_size(1, 4, 2) == 4 and all(len(atom) == 4 for atom in atoms) and len(atoms) == 3
    assert sorted(c for atom in atoms for c in atom) == list(range(12))
    for atom in atoms:
        assert all((c + 6) % 12 in atom for c in atom)  # channel j of one block goes with channel j of the other
        assert [sum(1 for c in atom if b * 3 <= c < b * 3 + 3) for b in range(4)] == [1, 1, 1, 1]
    # Folded scores (j and j + 6 summed): 5, 8, 13 | 8, 9, 5: the r-th least of each folded half, repeated.
    assert atoms == [[0, 5, 6, 11], [1, 3, 7, 9], [2, 4, 8, 10]]
    assert "must keep the same channels" in structure_violation(12, 1, 4, [1, 2, 4, 5, 6, 7, 8, 10, 11], aligned=2)
    keep = sorted(set(range(12)) - set(atoms[0]))
    assert structure_violation(12, 1, 4, keep, aligned=2) is None


class ShuffledGroups(nn.Module):
    """A grouped 1x1 conv, nn.ChannelShuffle, a depthwise conv and another grouped conv reading the shuffle."""

    def __init__(self, shuffle_module: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.g1 = nn.Conv2d(12, 18, 1, groups=3)
        self.bn = nn.BatchNorm2d(18)
        self.shuffle = nn.ChannelShuffle(3) if shuffle_module else None
        self.dw = nn.Conv2d(18, 18, 3, padding=1, groups=18)
        self.g2 = nn.Conv2d(18, 12, 1, groups=3)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.g1(self.stem(x))))
        if self.shuffle is not None:
            x = self.shuffle(x)
        else:  # the same shuffle written out
            b, c, h, w = x.shape
            x = x.reshape(b, 3, c // 3, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, h, w)
        return self.fc(self.g2(self.dw(x)).mean((2, 3)))


@pytest.mark.parametrize("shuffle_module", [True, False])
def test_channel_shuffle_keeps_the_same_channels_of_each_unit_and_prunes_exactly(shuffle_module) -> None:
    from testing.zoo import pruned_and_masked

    torch.manual_seed(0)
    model = randomize_norms(ShuffledGroups(shuffle_module)).double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    graph = build_channel_graph(model, x)
    group = group_of(graph, "g1")
    assert group.prunable and group.aligned == 3 and group.blocks == 9 and group.atom == 9
    # Unit k (channels 6k .. 6k+5) lands at positions k, k + 3, ..., k + 15: two of them in each group of g2.
    assert {(u.layer, u.offset, u.stride, u.start, u.stop) for u in group.consumers} == {
        ("g2", k, 3, 6 * k, 6 * k + 6) for k in range(3)}
    assert {u.layer for u in group.followers} == {"bn", "dw"}
    with pytest.raises(GraphError, match="must keep the same channels"):
        prune_channels(copy.deepcopy(model), graph, {group.id: list(range(1, 18))})
    # The same channel of every unit, but g2's first group would lose two inputs and its last none.
    with pytest.raises(GraphError, match="equal counts"):
        prune_channels(copy.deepcopy(model), graph, {group.id: [c for c in range(18) if c % 6 not in (0, 1)]})
    keep = {group.id: [c for atom in group.atoms(torch.arange(18.0))[1:] for c in atom]}
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-8)
    assert (pruned.g1.out_channels, pruned.dw.groups, pruned.g2.in_channels) == (9, 9, 9)


def test_a_shuffle_mixing_in_channels_no_layer_produces_is_left_alone() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = torch.cat([self.conv(x), x[:, :1].expand(-1, 4, -1, -1)], 1)
            return self.fc(F.channel_shuffle(y, 2).mean((2, 3)))

    graph = build_channel_graph(Mixed().eval(), torch.randn(2, 3, 6, 6))
    assert not graph.layers["conv"].prunable
    assert "channel shuffle" in graph.layers["conv"].reason


def test_an_unsqueeze_transpose_flatten_round_trip_stays_prunable_channel_by_channel() -> None:
    class RoundTrip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.head(h.view(h.shape[0], -1, 1).transpose(1, 2).flatten(1))

    graph = build_channel_graph(RoundTrip().eval(), torch.randn(2, 4))
    group = group_of(graph, "fc")
    assert group.prunable and group.aligned == 1 and group.atom == 1


def test_layers_on_sequence_first_or_windowed_tokens_count_their_positions_per_sample() -> None:
    # A sequence-first encoder layer (tokens, batch, channels) and a Linear on windows (batch * windows, tokens, C):
    # the positions per sample are the tokens of one sample, whichever dim holds the batch.
    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, channels)
            return self.encoder(x.transpose(0, 1)).transpose(0, 1)

    graph = build_channel_graph(SequenceFirst().eval(), torch.randn(2, 5, 8))
    assert graph.layers["encoder.linear1"].geometry.output_positions == 5

    class Windows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(-1, 4, 8)).reshape(x.shape)  # 3 windows of 4 tokens per sample

    graph = build_channel_graph(Windows().eval(), torch.randn(2, 12, 8))
    assert graph.layers["fc"].geometry.output_positions == 12
