"""How long graph building and the prune step take, in forward passes of the same model.

Three full-size models are built here with random weights (no downloads, no torchvision):

- ``resnet152``: bottleneck blocks [3, 8, 36, 3], widths 64-2048, BatchNorm, residual adds, 7x7/2 stem conv and
  max pool, global average pool, fc 1000; input 1x3x224x224.
- ``vitb``: ViT-B/16: 16x16 patch conv, cls token, 12 blocks of width 768 with 12 heads (hand-written attention:
  Linear q/k/v, reshape into heads, softmax, output projection) and MLP 3072, LayerNorm, fc 1000; input
  1x3x224x224.
- ``vitb_torch``: the same ViT-B/16 with torch's own pre-norm ``nn.TransformerEncoderLayer`` blocks
  (``nn.MultiheadAttention`` inside; its forward pass takes torch's fused kernel).

- ``llama1b``: a Llama-architecture causal language model of 1.04 B parameters built with ``transformers`` from a
  config (hidden 2048, 16 layers, 32 query / 8 key-value heads of 64, SwiGLU MLP 8192, RMSNorm, rotary
  embeddings, a vocabulary of 32000 tied to the output); input 1x128 token ids.

For each model it times, on CPU, ``--repeats`` runs after one warm-up run:

- a plain forward pass under ``torch.no_grad()``: the unit. One is timed right before every run of every step
  below and one right after. A step's "x fwd" is the median of its per-run ratios (``--stat median``, the
  default), which holds still when other processes load the machine for a while (the absolute ms do not), or its
  best run over the best forward (``--stat min``), the estimate least disturbed by short bursts of load;
- ``build_channel_graph(model, x)``;
- ``prune_channels(copy, graph, keep)`` on a fresh deep copy (the copy is made outside the timed region), where
  ``keep`` drops a random 30-50 % of the channels of every prunable group;
- the whole public call ``create_prune_retrain_model(model, x, cfg, record)`` with a config that prunes every
  layer by 0.3 (deep copy, tracing, checks and the record file included).

For a language model (``llama1b``), with next-token labels, also the whole job:

- ``auto_channel_prune_search`` at a 1.25x target (the default Taylor scores: a forward and a backward pass);
- ``create_prune_retrain_model`` from the config that search wrote.

Each model is measured in a process of its own, which also reports its peak memory (resident set) over graph
building and the whole job (before the prune step is timed on deep copies of the model): how far it rose above
what the process held before the model was built, in multiples of the model's weights (the model itself is 1x).

Targets: graph building under 3 forward passes, the prune step under 5, search + create under 10; peak memory at
most twice the weights.

Usage::

    python bench/graph_prune_speed.py [--repeats 5] [--models resnet152,vitb,vitb_torch] [--threads 2]
                                      [--stat median|min] [--profile]
    python bench/graph_prune_speed.py --models llama1b --repeats 1    # a few minutes; needs transformers

``--profile`` also runs ``build_channel_graph`` once per model under cProfile and prints the costliest calls.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import multiprocessing
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from acps_core import PerLayerWidthsWarning, auto_channel_prune_search
from acps_core._util.tensors import tensors_in
from acps_core.graph.build import build_channel_graph
from acps_core.graph.model import ChannelGraph
from acps_core.prune.calls import create_prune_retrain_model
from acps_core.prune.slicing import prune_channels

GRAPH_TARGET = 3.0  # forward passes
PRUNE_TARGET = 5.0  # forward passes
#: A channel-prune config that asks every Conv/Linear layer to lose 30 % of its channels.
PRUNE_ALL_CONFIG = (
    "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: false } } }\n"
)


# ----------------------------------------------------------------------------------------------------------------
# ResNet-152
# ----------------------------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, each with BatchNorm; the input is added back."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + shortcut)


class ResNet(nn.Module):
    """A bottleneck ResNet (He et al., CVPR 2016); ``blocks=(3, 8, 36, 3)`` is ResNet-152."""

    def __init__(self, blocks: tuple[int, ...] = (3, 8, 36, 3), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        in_channels = 64
        for stage, count in enumerate(blocks):
            width = 64 * 2 ** stage
            layers = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(Bottleneck(in_channels, width, stride))
                in_channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


# ----------------------------------------------------------------------------------------------------------------
# ViT-B/16
# ----------------------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head self-attention written out: q/k/v projections, split into heads, softmax, output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        # -1 for the number of heads: heads are pruned whole, so their count changes and their width does not.
        q = self.q(x).reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
        attention = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj(out)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., ICLR 2021); the defaults are ViT-B/16 at 224x224."""

    def __init__(self, image_size: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, heads: int = 12,
                 mlp_dim: int = 3072, num_classes: int = 1000, torch_layers: bool = False) -> None:
        super().__init__()
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        if torch_layers:  # torch's own pre-norm encoder layers (nn.MultiheadAttention inside)
            layers = (nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, activation="gelu", batch_first=True,
                                                 norm_first=True) for _ in range(depth))
            self.blocks = nn.Sequential(*layers)
        else:
            self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def llama1b() -> nn.Module:
    """A Llama-architecture causal language model of 1.04 B parameters (see the module docs), random weights."""
    # This folder's transformers.py (a benchmark) would shadow the package: it is looked up without the folder.
    here = Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        import transformers
    finally:
        sys.path[:] = saved
    config = transformers.LlamaConfig(
        vocab_size=LLAMA_VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


LLAMA_VOCAB = 32000
MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet152": ResNet, "vitb": VisionTransformer, "vitb_torch": lambda: VisionTransformer(torch_layers=True),
    "llama1b": llama1b}
#: The search's target for the whole job on a language model.
SEARCH_CONFIG = "compress_ratio: 1.25\n"  # ascend_optimized: true, the default: multiples of 16
WHOLE_JOB_TARGET = 10.0  # forward passes, search + create
MEMORY_TARGET = 2.0  # peak resident memory over the weights


def example(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's input and, for a language model, its next-token labels (-100 after the last token)."""
    if name != "llama1b":
        return torch.randn(1, 3, 224, 224), None
    tokens = torch.randint(0, LLAMA_VOCAB, (1, 128), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    return tokens, labels


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """One step's timed runs and the forward passes timed around each of them (seconds)."""

    runs: list[float]
    forwards_before: list[float]
    forwards_after: list[float]

    def seconds(self, stat: str) -> float:
        """The step's median (``stat="median"``) or best (``"min"``) wall time."""
        return statistics.median(self.runs) if stat == "median" else min(self.runs)

    def forwards(self, stat: str) -> float:
        """The step's time in forward passes.

        ``median``: the median over runs of each run's time over the mean of the two forwards around it, which
        holds still when other processes load the machine for a while. ``min``: the best run over the best forward,
        the estimate least disturbed by short bursts of load.
        """
        if stat == "min":
            return min(self.runs) / min(self.forwards_before + self.forwards_after)
        return statistics.median(run / ((before + after) / 2) for run, before, after in
                                 zip(self.runs, self.forwards_before, self.forwards_after))


@dataclass
class Measurement:
    """The timed steps of one model, and the size of its channel graph."""

    model: str
    parameters: int
    graph: Timing
    prune: Timing
    create: Timing
    prunable_groups: int
    groups: int
    weight_bytes: int = 0
    peak_bytes: int = 0  # how far the resident set rose above what the process held before the model was built
    search: Timing | None = None
    create_searched: Timing | None = None

    @property
    def memory(self) -> float:
        """Peak memory over the weights."""
        return self.peak_bytes / self.weight_bytes if self.weight_bytes else 0.0

    def whole_job(self, stat: str) -> float | None:
        """Search + create from its config, in forward passes (None when not measured)."""
        if self.search is None or self.create_searched is None:
            return None
        return self.search.forwards(stat) + self.create_searched.forwards(stat)

    def forward_seconds(self, stat: str) -> float:
        """The median or best of every forward pass timed for this model."""
        timed = [t for t in (self.graph, self.prune, self.create, self.search, self.create_searched) if t]
        forwards = [f for t in timed for f in t.forwards_before + t.forwards_after]
        return statistics.median(forwards) if stat == "median" else min(forwards)

    def steps(self) -> list[tuple[str, Timing, float]]:
        """(what, timing, target in forward passes) of every step checked against a target."""
        return [("graph building", self.graph, GRAPH_TARGET),
                ("prune step (prune_channels)", self.prune, PRUNE_TARGET),
                ("prune step, whole call (create_prune_retrain_model)", self.create, PRUNE_TARGET)]


class Stopwatch:
    """Times steps against the model's forward pass.

    Each timed run of a step sits between two timed forward passes (see :meth:`Timing.forwards`). The first run
    of every step is a warm-up and is not kept.
    """

    def __init__(self, forward: Callable[[], object], repeats: int) -> None:
        self.forward = forward
        self.repeats = repeats

    @staticmethod
    def _seconds(step: Callable[[], object]) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    def time(self, step: Callable[[], object], setup: Callable[[], object] | None = None) -> Timing:
        """Time ``step`` (``setup`` runs untimed before each run) ``repeats`` times after one warm-up."""
        timing = Timing([], [], [])
        for run in range(self.repeats + 1):
            if setup is not None:
                setup()
            before = self._seconds(self.forward)
            step_s = self._seconds(step)
            after = self._seconds(self.forward)
            if run > 0:
                timing.runs.append(step_s)
                timing.forwards_before.append(before)
                timing.forwards_after.append(after)
        return timing


def random_keep(graph: ChannelGraph, seed: int = 0) -> dict[int, list[int]]:
    """For every prunable group, sorted kept channels after removing a random 30-50 % of them.

    Channels are removed in the group's atoms (whole attention heads, one unit from every block of a grouped
    conv), as the prune step requires; at least one atom is kept.
    """
    generator = torch.Generator().manual_seed(seed)
    keep = {}
    for group in graph.prunable_groups:
        fraction = 0.3 + 0.2 * torch.rand((), generator=generator).item()
        atoms = group.atoms(torch.rand(group.channels, generator=generator))  # random scores: a random order
        removed = min(len(atoms) - 1, round(len(atoms) * fraction))
        keep[group.id] = sorted(c for atom in atoms[removed:] for c in atom)
    return keep


def measure(name: str, repeats: int, workdir: Path) -> Measurement:
    """Build model ``name`` with random weights and time graph building and the prune step against its forward."""
    resident_before = peak_resident_bytes()
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x, labels = example(name)
    parameters = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def forward() -> None:
        with torch.no_grad():
            model(x)

    stopwatch = Stopwatch(forward, repeats)
    graph_timing = stopwatch.time(lambda: build_channel_graph(model, x))
    whole_job = time_whole_job(name, model, x, labels, stopwatch, workdir)
    # The peak of acps's own calls; the steps below deep-copy the model to time the prune step on its own.
    peak_bytes = peak_resident_bytes() - resident_before

    graph = build_channel_graph(model, x)
    keep = random_keep(graph)
    target = [model]  # the copy the next timed prune_channels call slices

    def fresh_copy() -> None:
        target[0] = copy.deepcopy(model)

    prune_timing = stopwatch.time(lambda: prune_channels(target[0], graph, keep), setup=fresh_copy)
    with torch.no_grad():  # the pruned copy must still run with the original output shape
        if [t.shape for t in tensors_in(target[0](x))] != [t.shape for t in tensors_in(model(x))]:
            raise RuntimeError(f"{name}: the pruned copy's output shape differs from the model's")
    del target[0]

    config = workdir / f"{name}_prune.cfg"
    config.write_text(PRUNE_ALL_CONFIG, encoding="utf-8")
    record = workdir / f"{name}_prune.record"
    create_timing = stopwatch.time(lambda: create_prune_retrain_model(model, x, config, record))
    return Measurement(name, parameters, graph_timing, prune_timing, create_timing, len(graph.prunable_groups),
                       len(graph.groups), weight_bytes, peak_bytes, *whole_job)


def time_whole_job(name: str, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
                   stopwatch: Stopwatch, workdir: Path) -> tuple[Timing | None, Timing | None]:
    """Time ``auto_channel_prune_search`` with next-token labels, then ``create_prune_retrain_model`` from the
    config it wrote (nothing without labels)."""
    if labels is None:
        return None, None
    search_config = workdir / f"{name}_search.cfg"
    search_config.write_text(SEARCH_CONFIG, encoding="utf-8")
    searched = workdir / f"{name}_searched.cfg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerLayerWidthsWarning)  # per-block widths: rebuilt from the record
        search = stopwatch.time(lambda: auto_channel_prune_search(model, search_config, [x, labels], searched))
        create = stopwatch.time(
            lambda: create_prune_retrain_model(model, x, searched, workdir / f"{name}_searched.record"))
    return search, create


def peak_resident_bytes() -> int:
    """The most memory this process has held resident so far (Linux and macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def measure_apart(name: str, repeats: int, workdir: Path, threads: int | None) -> Measurement:
    """:func:`measure` in a process of its own, so that its peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, initializer=_set_threads, initargs=(threads,)) as pool:
        return pool.apply(measure, (name, repeats, workdir))


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def profile_graph(name: str, top: int) -> str:
    """cProfile of one ``build_channel_graph`` call on ``name``: the ``top`` calls by cumulative, then own time."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x, _ = example(name)
    build_channel_graph(model, x)  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    build_channel_graph(model, x)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def table(rows: list[Measurement], stat: str) -> str:
    """A markdown table of the measurements: ms, and (in brackets) multiples of a forward pass."""
    header = ("| model | parameters | forward ms | graph build ms (x fwd) | prune_channels ms (x fwd) "
              "| create_prune_retrain_model ms (x fwd) | search + create ms (x fwd) | peak memory (x weights) "
              "| prunable / total groups |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        cells = [f"{t.seconds(stat) * 1e3:.0f} ({t.forwards(stat):.2f}x)" for _, t, _ in m.steps()]
        job = m.whole_job(stat)
        if job is not None and m.search is not None and m.create_searched is not None:
            seconds = m.search.seconds(stat) + m.create_searched.seconds(stat)
            cells.append(f"{seconds * 1e3:.0f} ({job:.2f}x: search {m.search.forwards(stat):.2f}x)")
        else:
            cells.append("-")
        lines.append(f"| {m.model} | {m.parameters / 1e6:.1f} M | {m.forward_seconds(stat) * 1e3:.0f} "
                     f"| {' | '.join(cells)} | {m.peak_bytes / 2**30:.2f} GiB ({m.memory:.2f}x) "
                     f"| {m.prunable_groups} / {m.groups} |")
    return "\n".join(lines)


def verdicts(rows: list[Measurement], stat: str) -> list[tuple[str, bool]]:
    """(line, passed) per model and target."""
    checks = []
    for m in rows:
        for what, timing, target in m.steps():
            ratio = timing.forwards(stat)
            passed = ratio < target
            checks.append((f"{'PASS' if passed else 'FAIL'}  {m.model}: {what} {ratio:.2f} forward passes "
                           f"(target < {target:g})", passed))
        job = m.whole_job(stat)
        if job is not None:
            checks.append((f"{'PASS' if job < WHOLE_JOB_TARGET else 'FAIL'}  {m.model}: search + create {job:.2f} "
                           f"forward passes (target < {WHOLE_JOB_TARGET:g})", job < WHOLE_JOB_TARGET))
            fits = m.memory <= MEMORY_TARGET
            checks.append((f"{'PASS' if fits else 'FAIL'}  {m.model}: peak memory {m.memory:.2f}x the weights "
                           f"(target <= {MEMORY_TARGET:g})", fits))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per step, after one warm-up (default 5)")
    parser.add_argument("--models", default="resnet152,vitb,vitb_torch",
                        help=f"comma-separated, from {', '.join(MODELS)} (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="median (default) or best of the runs; min suits a machine shared with other jobs")
    parser.add_argument("--profile", action="store_true",
                        help="also profile build_channel_graph once per model with cProfile")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names or args.repeats < 1:
        parser.error(f"--models takes names from {', '.join(MODELS)} (got {args.models!r}); --repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; {args.stat} of {args.repeats} runs after one warm-up, input 1x3x224x224 "
          "(llama1b: 1x128 tokens)",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="acps_bench_") as workdir:
        for name in names:
            start = time.perf_counter()
            rows.append(measure_apart(name, args.repeats, Path(workdir), args.threads))
            print(f"  {name}: measured in {time.perf_counter() - start:.0f} s (load average "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
    print()
    print(table(rows, args.stat))
    print()
    checks = verdicts(rows, args.stat)
    for line, _ in checks:
        print(line)
    if args.profile:
        for name in names:
            print(f"\n=== cProfile of build_channel_graph({name}) ===")
            print(profile_graph(name, top=30))
    return 0 if all(passed for _, passed in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
