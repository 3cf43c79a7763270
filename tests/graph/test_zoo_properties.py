"""Random networks stacked from the zoo's blocks: whatever acps decides to prune, the pruned model computes what the
unpruned model computes with the removed channels masked.

Hypothesis draws a stack of blocks (conv-norm-act with BatchNorm, GroupNorm, InstanceNorm, channels-last
LayerNorm or none; residual block; inverted residual with or without squeeze-excitation; squeeze-excitation;
two-branch concat; grouped conv; chunk + concat; dense concat), their widths, and a seed for the weights and for a
random keep set that removes 30-60 % of every prunable group in whole atoms; channel shuffles alone and in
ShuffleNetV1 units. A second test does the same with transformer blocks on token inputs (hand-written and
``nn.MultiheadAttention`` attention pruned in whole heads and along the stream, MLPs, LayerNorms, Linear layers
on the last dim). Derandomized: CI sees the same examples every run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from acps_core.graph.build import build_channel_graph
from testing.zoo import (
    BasicBlock,
    ConvBNAct,
    MBConv,
    ShuffleV1Unit,
    SqueezeExcite,
    channel_shuffle,
    pruned_and_masked,
    random_keep,
    randomize,
)

ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "hardswish": F.hardswish, "silu": F.silu, "gelu": F.gelu}


class ConvNormAct(nn.Module):
    """conv -> norm -> activation, the norm one of BatchNorm, GroupNorm, InstanceNorm, a LayerNorm over the
    channels (permuted to the last dim and back) or none; the activation may be a per-channel PReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, norm: str, act: str, groups: int = 1,
                 norm_groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups)
        self.norm_kind = norm
        self.norm: nn.Module = {
            "bn": lambda: nn.BatchNorm2d(cout),
            "gn": lambda: nn.GroupNorm(norm_groups, cout),
            "in": lambda: nn.InstanceNorm2d(cout, affine=True),
            "ln": lambda: nn.LayerNorm(cout),
            "none": nn.Identity,
        }[norm]()
        self.act_kind = act
        self.prelu = nn.PReLU(cout) if act == "prelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_kind == "ln":
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            x = self.norm(x)
        return self.prelu(x) if self.prelu is not None else ACTS[self.act_kind](x)


class Concat(nn.Module):
    """Two branches of the same input, concatenated along the channels."""

    def __init__(self, cin: int, a: int, b: int) -> None:
        super().__init__()
        self.a = ConvBNAct(cin, a, 1)
        self.b = ConvBNAct(cin, b, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


class ChunkConcat(nn.Module):
    """Cross-stage partial: the first half of the channels bypasses a conv that transforms the second half."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.part = ConvBNAct(cin // 2, cin // 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, self.part(b)], 1)


class Dense(nn.Module):
    """DenseNet layer: the input with new channels appended."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], 1)


class Shuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


class Head(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def build(spec: list[tuple]) -> nn.Sequential:
    """The network a drawn spec describes (input 3 x 8 x 8): a conv stem, the blocks, a pooled Linear head.
    Choices are indices wrapped into what the current width allows, so every spec builds."""
    blocks: list[nn.Module] = [ConvBNAct(3, 6, 3)]
    cin, size = 6, 8
    for kind, width, a, b, c in spec:
        if kind == "conv":
            norm = ["bn", "gn", "in", "ln", "none"][a % 5]
            act = [*ACTS, "prelu"][b % 5]
            stride = 2 if c % 3 == 2 and size > 2 else 1
            norm_groups = divisors(width)[c % len(divisors(width))]
            blocks.append(ConvNormAct(cin, width, 1 + 2 * (a % 2), stride, norm, act, norm_groups=norm_groups))
            cin, size = width, (size + stride - 1) // stride
        elif kind == "residual":
            blocks.append(BasicBlock(cin, width))
            cin = width
        elif kind == "inverted":
            expand = 1 + a % 3
            hidden = cin * expand
            se = max(1, hidden // 4) if b % 2 else 0
            blocks.append(MBConv(cin, width, expand, se=se, act=F.relu6))
            cin = width
        elif kind == "se":
            blocks.append(SqueezeExcite(cin, 1 + a % max(1, cin // 2)))
        elif kind == "concat":
            blocks.append(Concat(cin, width, 1 + b % 8))
            cin = width + 1 + b % 8
        elif kind == "grouped":
            options = [d for d in divisors(cin) if d > 1] or [1]
            groups = options[a % len(options)]
            cout = groups * max(1, -(-width // groups))
            norm = ["bn", "gn", "none"][b % 3]
            norm_groups = divisors(cout)[c % len(divisors(cout))]
            blocks.append(ConvNormAct(cin, cout, 3, 1, norm, "relu", groups=groups, norm_groups=norm_groups))
            cin = cout
        elif kind == "chunk":
            if cin % 2:
                blocks.append(ConvBNAct(cin, cin + 1, 1))
                cin += 1
            blocks.append(ChunkConcat(cin))
        elif kind == "dense":
            blocks.append(Dense(cin, 1 + a % 6))
            cin += 1 + a % 6
        elif kind == "shuffle":
            options = [d for d in divisors(cin) if d > 1] or [1]
            blocks.append(Shuffle(options[a % len(options)]))
        elif kind == "shufflev1":
            options = [d for d in divisors(cin) if d > 1] or [1]
            groups = options[a % len(options)]
            blocks.append(ShuffleV1Unit(cin, cin, groups * (1 + b % 3), groups, 1))
    blocks.append(Head(cin))
    return nn.Sequential(*blocks)


class TokenAttention(nn.Module):
    """Pre-norm residual self-attention with ``heads`` heads of ``head_dim`` (hand-written or
    ``scaled_dot_product_attention``), inner width independent of the model width."""

    def __init__(self, dim: int, heads: int, head_dim: int, sdpa: bool) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.sdpa = sdpa
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, heads * head_dim)
        self.v = nn.Linear(dim, heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm(x)
        q, k, v = (layer(h).view(b, t, -1, self.head_dim).transpose(1, 2) for layer in (self.q, self.k, self.v))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim ** 0.5, dim=-1) @ v
        return x + self.proj(out.transpose(1, 2).reshape(b, t, -1))


class TorchAttention(nn.Module):
    """Post-norm residual ``nn.MultiheadAttention`` (its embed_dim is the stream's width)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.attn(x, x, x, need_weights=False)[0])


class TokenMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TokenLinear(nn.Module):
    def __init__(self, dim: int, width: int, act: str) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, width)
        self.act = ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class TokenHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x).mean(1))


def build_tokens(spec: list[tuple]) -> nn.Sequential:
    """A transformer-like network on (B, 4, 5) token inputs: an embedding Linear on the last dim, then the drawn
    blocks, then a LayerNorm, a mean over the tokens and a Linear head."""
    acts = list(ACTS)
    dim = 2 + spec[0][1] % 11 if spec else 8
    blocks: list[nn.Module] = [TokenLinear(5, dim, "gelu")]
    for kind, width, a, b in spec:
        if kind == "attn":
            blocks.append(TokenAttention(dim, 1 + a % 3, 1 + width % 4, bool(b % 2)))
        elif kind == "mha":
            blocks.append(TorchAttention(dim, divisors(dim)[a % len(divisors(dim))]))
        elif kind == "mlp":
            blocks.append(TokenMlp(dim, width, acts[a % len(acts)]))
        else:
            blocks.append(TokenLinear(dim, width, acts[a % len(acts)]))
            dim = width
    blocks.append(TokenHead(dim))
    return nn.Sequential(*blocks)


TOKEN_BLOCK = st.tuples(st.sampled_from(["attn", "mha", "mlp", "linear"]), st.integers(2, 12), st.integers(0, 63),
                        st.integers(0, 63))


KINDS = ["conv", "residual", "inverted", "se", "concat", "grouped", "chunk", "dense", "shuffle", "shufflev1"]
BLOCK = st.tuples(st.sampled_from(KINDS), st.integers(2, 12), st.integers(0, 63), st.integers(0, 63),
                  st.integers(0, 63))


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_pruned_matches_masked(model: nn.Module, x: torch.Tensor, seed: int) -> None:
    graph = build_channel_graph(model, x)
    keep = random_keep(graph, seed)
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if keep:
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@settings(max_examples=600, deadline=None, derandomize=True, database=None)
@given(spec=st.lists(BLOCK, min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_random_conv_networks_prune_to_what_masking_computes(spec, seed) -> None:
    torch.manual_seed(seed)
    model = randomize(build(spec), seed).double().eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    check_pruned_matches_masked(model, x, seed)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(spec=st.lists(TOKEN_BLOCK, min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_random_token_networks_prune_to_what_masking_computes(spec, seed) -> None:
    torch.manual_seed(seed)
    model = randomize(build_tokens(spec), seed).double().eval()
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    check_pruned_matches_masked(model, x, seed)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(spec=st.lists(BLOCK, min_size=1, max_size=4), seed=st.integers(0, 2**16),
       ratio=st.sampled_from([1.2, 1.5, 2.0]))
def test_random_networks_through_the_public_calls_succeed_exactly_or_raise_acps_errors(spec, seed, ratio) -> None:
    """Search, then create: the pruned model computes what the masked model computes, or an AcpsError says why
    (a target too far for a tiny network is a warning, never another exception)."""
    import tempfile
    import warnings
    from pathlib import Path

    import acps_core as acps
    from acps_core.graph.masking import masked_channels

    torch.manual_seed(seed)
    model = randomize(build(spec), seed).double().eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (6,), generator=generator)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        (path / "search.cfg").write_text(f"compress_ratio: {ratio}\nascend_optimized: false\n")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = acps.auto_channel_prune_search(model, str(path / "search.cfg"), [x, labels],
                                                        str(path / "prune.cfg"))
            pruned = acps.create_prune_retrain_model(model, x, path / "prune.cfg", path / "prune.record")
        except acps.AcpsError:
            return
    graph = build_channel_graph(model, x)
    ids = {group.name: group.id for group in graph.groups}
    keep = {ids[name]: kept for name, kept in result.kept_channels.items()}
    with masked_channels(model, graph, keep), torch.no_grad():
        expected = model(x)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5)
