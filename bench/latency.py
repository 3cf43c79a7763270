"""Cost that matches the hardware: predicted against measured speedup.

Part 1, on this machine's device (CPU here; CUDA when ``--device cuda``). For three architectures built from the
test zoo's blocks at CPU-friendly sizes (a ResNet of basic blocks, a MobileNetV2 of inverted residuals and a
VGG-style conv chain, random weights, input 1x3x64x64), at each target (1.5x and 2x):

- search with ``MeasuredLatency`` (latency tables timed on the device, cached), prune with
  ``create_prune_retrain_model``, and compare the speedup the search predicted with the one measured: the median
  latency of ``--runs`` forward passes of the original and the pruned model, timed alternately in one run;
- search at the same target with ``BitComplexity`` (the reference's cost), prune, and time that model too.

Targets: the measured speedup of the MeasuredLatency result within 15 % of the predicted one, and its measured
latency lower than the BitComplexity result's. The table also shows the measured speedup against the one asked
for (the target), which differs from the prediction where the search says the target cannot be reached.

``--models`` also takes timm architectures as ``timm:<name>`` (random weights, 100 classes, at the model's own
input size, e.g. ``timm:resnet18``; needs ``timm``).

Part 2: ``AscendLatency``'s predicted time of a few ResNet-50 convs (Ascend 910 figures, fp16, batch 1) at channel
counts around fractal boundaries: the staircase the search sees.

Both searches use the same sensitivity and search methods (``--sensitivity``, ``--search``), on random
calibration data (latency does not depend on the weights), with ``ascend_optimized: false``.

Usage::

    python bench/latency.py [--models resnet,mobilenetv2,vgg,timm:resnet18] [--targets 1.5,2] [--runs 60] [--threads 2]
                            [--device cpu|cuda] [--cache DIR] [--no-ascend-table]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import acps_core
from acps_core.graph.build import build_channel_graph
from acps_gain_ascend import AscendLatency, MeasuredLatency
from testing.zoo import BasicBlock, ConvBNAct, MBConv


def resnet() -> nn.Module:
    return nn.Sequential(ConvBNAct(3, 64, 3, 2), BasicBlock(64, 64), BasicBlock(64, 128, 2), BasicBlock(128, 128),
                         BasicBlock(128, 256, 2), BasicBlock(256, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(256, 100))


def mobilenetv2() -> nn.Module:
    return nn.Sequential(ConvBNAct(3, 32, 3, 2), MBConv(32, 24, 6, 2), MBConv(24, 24, 6), MBConv(24, 48, 6, 2),
                         MBConv(48, 48, 6), MBConv(48, 96, 6, 2), MBConv(96, 96, 6), ConvBNAct(96, 640, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(640, 100))


def vgg() -> nn.Module:
    return nn.Sequential(ConvBNAct(3, 64, 3), nn.MaxPool2d(2), ConvBNAct(64, 128, 3), nn.MaxPool2d(2),
                         ConvBNAct(128, 192, 3), ConvBNAct(192, 192, 3), nn.MaxPool2d(2), ConvBNAct(192, 256, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 100))


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet": resnet, "mobilenetv2": mobilenetv2, "vgg": vgg}
#: The zoo models' input side; a timm model (``timm:<name>``) takes its own default input size.
ZOO_SIZE = 64


def build(name: str) -> tuple[nn.Module, int]:
    """The model ``name`` (a zoo model of :data:`MODELS`, or ``timm:<name>``: timm's architecture with random
    weights, nothing downloaded) and its input side."""
    if not name.startswith("timm:"):
        return MODELS[name](), ZOO_SIZE
    import timm

    model = timm.create_model(name[len("timm:"):], pretrained=False, num_classes=100)
    return model, int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def latencies(models: list[nn.Module], x: torch.Tensor, runs: int) -> list[float]:
    """Median milliseconds of one forward pass of each model, timed alternately (so drift hits all alike)."""
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for model in models:
            for _ in range(5):
                model(x)
        for _ in range(runs):
            for index, model in enumerate(models):
                start = time.perf_counter()
                model(x)
                if x.device.type == "cuda":
                    torch.cuda.synchronize()
                times[index].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def search_and_prune(model: nn.Module, x: torch.Tensor, target: float, gain: object, args: argparse.Namespace,
                     folder: Path, tag: str) -> tuple[nn.Module, float, float]:
    """(pruned model, predicted speedup, search seconds)."""
    config = folder / f"search_{tag}.cfg"
    config.write_text(f"compress_ratio: {target}\nascend_optimized: false\n")
    labels = torch.randint(0, 100, (x.shape[0],))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = acps_core.auto_channel_prune_search(model, config, [x, labels], folder / f"prune_{tag}.cfg",
                                                     sensitivity=args.sensitivity, search_alg=args.search, gain=gain)
    seconds = time.perf_counter() - start
    pruned = acps_core.create_prune_retrain_model(model, x[:1], folder / f"prune_{tag}.cfg",
                                                  folder / f"prune_{tag}.record")
    return pruned.eval(), result.cost_before / result.cost_after, seconds


def measured_part(args: argparse.Namespace) -> tuple[list[str], list[tuple[str, bool]]]:
    lines = ["| model | target | predicted (MeasuredLatency) | measured | error | measured against the target | "
             "measured, BitComplexity result | original ms | MeasuredLatency result ms | BitComplexity result ms | "
             "search s (first / cached) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    device = torch.device(args.device)
    for name in args.models:
        torch.manual_seed(0)
        built, side = build(name)
        model = built.to(device).eval()
        x = torch.randn(8, 3, side, side, device=device)
        one = x[:1]
        for target in args.targets:
            with tempfile.TemporaryDirectory() as workdir:
                folder = Path(workdir)
                cache = args.cache or folder / "latency"
                first = MeasuredLatency(cache_dir=cache)
                pruned, predicted, seconds = search_and_prune(model, x, target, first, args, folder, "measured")
                again = MeasuredLatency(cache_dir=cache)
                _, _, cached_seconds = search_and_prune(model, x, target, again, args, folder, "again")
                baseline, _, _ = search_and_prune(model, x, target, "BitComplexity", args, folder, "bits")
            original_ms, pruned_ms, baseline_ms = latencies([model, pruned, baseline], one, args.runs)
            measured = original_ms / pruned_ms
            error = measured / predicted - 1
            lines.append(f"| {name} | {target:g}x | {predicted:.2f}x | {measured:.2f}x | {100 * error:+.1f} % | "
                         f"{100 * (measured / target - 1):+.1f} % | {original_ms / baseline_ms:.2f}x | "
                         f"{original_ms:.2f} | {pruned_ms:.2f} | "
                         f"{baseline_ms:.2f} | {seconds:.1f} / {cached_seconds:.1f} |")
            print(lines[-1], file=sys.stderr, flush=True)
            verdicts.append((f"{name} {target:g}x: measured speedup {measured:.2f}x within 15 % of the predicted "
                             f"{predicted:.2f}x ({100 * error:+.1f} %)", abs(error) <= 0.15))
            verdicts.append((f"{name} {target:g}x: MeasuredLatency result {pruned_ms:.2f} ms faster than the "
                             f"BitComplexity result {baseline_ms:.2f} ms", pruned_ms < baseline_ms))
    return lines, verdicts


class ResNet50Convs(nn.Module):
    """The convs whose staircase part 2 shows: ResNet-50 stage shapes at 224x224 input."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1_conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.layer2_conv2 = nn.Conv2d(128, 128, 3, padding=1)
        self.layer3_conv2 = nn.Conv2d(256, 256, 3, padding=1)
        self.layer4_conv2 = nn.Conv2d(512, 512, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def ascend_part() -> list[str]:
    shapes = {"layer1_conv2": (64, 56), "layer2_conv2": (128, 28), "layer3_conv2": (256, 14), "layer4_conv2": (512, 7)}
    estimator = AscendLatency("Ascend910")
    lines = ["", "AscendLatency (Ascend910, fp16, batch 1): predicted microseconds of ResNet-50's 3x3 convs at output "
             "channel counts around 16-channel fractal boundaries (inputs at the full count):", ""]
    offsets = (-17, -16, -15, -1, 0)
    lines.append("| layer | " + " | ".join(f"out {o:+d}" for o in offsets) + " |")
    lines.append("|---|" + "---|" * len(offsets))
    for name, (channels, size) in shapes.items():
        layer = nn.Conv2d(channels, channels, 3, padding=1)
        graph = build_channel_graph(nn.Sequential(layer, nn.ReLU(), nn.Conv2d(channels, 8, 1)).eval(),
                                    torch.randn(1, channels, size, size))
        geometry = graph.layers["0"].geometry
        cells = [f"{channels + o}: {estimator.layer_cost(geometry, channels, channels + o):.2f}" for o in offsets]
        lines.append(f"| {name} ({channels}x{size}x{size}) | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet,mobilenetv2,vgg", type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--targets", default="1.5,2", type=lambda s: [float(t) for t in s.split(",") if t])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, help="latency table cache folder (default: a fresh one per run)")
    parser.add_argument("--sensitivity", default="TaylorLossSensitivity")
    parser.add_argument("--search", default="GreedySearch")
    parser.add_argument("--no-ascend-table", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; "
          f"methods {args.sensitivity} + {args.search}")
    lines, verdicts = measured_part(args)
    print("\n".join(lines))
    if not args.no_ascend_table:
        print("\n".join(ascend_part()))
    print()
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
