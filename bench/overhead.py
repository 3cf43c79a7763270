"""What the search costs against one plain forward+backward pass over the same calibration data.

For a ResNet-50-sized CNN (bottleneck blocks [3, 4, 6, 3], 25.6 M parameters) and a ViT-B-sized transformer
(12 blocks of width 768, torch's ``nn.TransformerEncoderLayer``, 86 M parameters), built here with random weights,
on CPU, each measurement runs in a fresh process (so peak memory is that process's own):

- ``fwd+bwd``: one forward and backward pass of the cross-entropy over the calibration batch;
- ``search``: ``auto_channel_prune_search`` with the reference methods (TaylorLossSensitivity + GreedySearch,
  BitComplexity) at compress_ratio 1.5 over the same batch, one calibration pass; its scoring time (the
  sensitivity method, ``result.timings["scoring"]``) is apart, and the rest (tracing, the execution check, the
  search, writing) is the time "on top";
- ``random labels``: the same search with the labels of the reference's example, ``torch.randn(output.size())``,
  which make TaylorLossSensitivity fall back to its label-free score (the result's notes must say so).

Targets: scoring at most 1.3x the forward+backward (on both label kinds), the rest under 2 s, peak memory (max
RSS) at most 1.2x. Then
the scoring time for 1, 2 and 4 calibration passes and the search time at three depths (ResNet: 2, 6 and 12
blocks in its third stage; ViT: 4, 8 and 12 layers), which should grow linearly. Last, what ``calibration_data``
adds to ``create_prune_retrain_model`` (the BatchNorm correction, then the layer re-fit), in time and peak memory.

Usage::

    python bench/overhead.py [--models resnet50,vitb] [--batch 8] [--threads 2] [--repeat 1]
                             [--no-random-labels] [--no-scaling] [--no-create]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def build(name: str, depth: int | None) -> nn.Module:
    """``resnet50`` (``depth``: bottleneck blocks in its third stage, 6 by default) or ``vitb`` (``depth``:
    encoder layers, 12 by default)."""
    from graph_prune_speed import ResNet, VisionTransformer

    if name == "resnet50":
        return ResNet((3, 4, depth or 6, 3))
    return VisionTransformer(depth=depth or 12, torch_layers=True)


def measure(kind: str, name: str, batch: int, passes: int, depth: int | None, threads: int) -> dict:
    """Runs in its own process: one measurement."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(name, depth).eval()
    x = torch.randn(batch * passes, 3, 224, 224)
    y = torch.randint(0, 1000, (batch * passes,))
    if kind == "fwdbwd":
        start = time.perf_counter()
        for chunk_x, chunk_y in zip(x.split(batch), y.split(batch)):
            F.cross_entropy(model(chunk_x), chunk_y).backward()
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import acps_core as acps

    if kind.startswith("create"):
        return measure_create(kind, model, x, y)
    labels: torch.Tensor = y
    if kind == "search-random":  # the reference's example: torch.randn(output.size())
        with torch.no_grad():
            labels = torch.randn(x.shape[0], *model(x[:1]).shape[1:])
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "search.cfg"
        config.write_text(f"compress_ratio: 1.5\nascend_optimized: true\ntest_iteration: {passes}\n")
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = acps.auto_channel_prune_search(model, str(config), [x, labels],
                                                    str(Path(folder) / "prune.cfg"))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "scoring": result.timings["scoring"], "rest": seconds - result.timings["scoring"],
            "label_free": any("label-free" in note for note in result.notes),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_create(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """``create_prune_retrain_model`` after a search at 1.5x: ``create`` plain, ``create-stats`` with ``x`` as
    ``calibration_data`` and ``reconstruct=False``, ``create-refit`` with the layers re-fitted too."""
    import acps_core as acps

    with tempfile.TemporaryDirectory() as folder:
        config, pruned = Path(folder) / "search.cfg", Path(folder) / "prune.cfg"
        config.write_text("compress_ratio: 1.5\nascend_optimized: true\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acps.auto_channel_prune_search(model, str(config), [x, y], str(pruned),
                                           sensitivity="GroupMagnitudeSensitivity", search_alg="GlobalRankSearch")
        options = {"create": {}, "create-stats": {"calibration_data": x, "reconstruct": False},
                   "create-refit": {"calibration_data": x}}[kind]
        start = time.perf_counter()
        acps.create_prune_retrain_model(model, x[:1], pruned, Path(folder) / "prune.record", **options)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


#: How many fresh processes run each measurement (``--repeat``); each figure is the smallest of them, the one
#: least disturbed by other work on the machine.
REPEAT = 1


def in_process(kind: str, name: str, batch: int, passes: int, depth: int | None, threads: int) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'bench')!r}); import overhead; "
            f"print(json.dumps(overhead.measure({kind!r}, {name!r}, {batch}, {passes}, {depth!r}, {threads})))")
    runs = []
    for _ in range(REPEAT):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: min(run[key] for run in runs) for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,vitb", type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each measurement this many times and keep the smallest figures (a busy machine)")
    parser.add_argument("--no-random-labels", action="store_true",
                        help="skip the search with random output-shaped labels (the label-free fallback)")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--no-create", action="store_true", help="skip the table of create_prune_retrain_model")
    args = parser.parse_args(argv)
    global REPEAT
    REPEAT = max(1, args.repeat)
    print(f"torch {torch.__version__}, CPU, {args.threads} threads, calibration batch {args.batch} x 3x224x224"
          + (f", the smallest of {REPEAT} runs of each figure" if REPEAT > 1 else ""))
    print("\n| model | fwd+bwd s | search s | scoring s (x fwd+bwd) | rest s | peak MB fwd+bwd | peak MB search "
          "(x) |\n|---|---|---|---|---|---|---|")
    verdicts = []
    for name in args.models:
        base = in_process("fwdbwd", name, args.batch, 1, None, args.threads)
        found = in_process("search", name, args.batch, 1, None, args.threads)
        ratio = found["scoring"] / base["seconds"]
        rest = found["rest"]
        memory = found["rss_mb"] / base["rss_mb"]
        print(f"| {name} | {base['seconds']:.2f} | {found['seconds']:.2f} | {found['scoring']:.2f} ({ratio:.2f}x) | "
              f"{rest:.2f} | {base['rss_mb']:.0f} | {found['rss_mb']:.0f} ({memory:.2f}x) |", flush=True)
        verdicts += [(f"{name}: scoring {ratio:.2f}x a forward+backward (target <= 1.3x)", ratio <= 1.3),
                     (f"{name}: tracing, checks, search and writing {rest:.2f} s on top (target < 2 s)", rest < 2),
                     (f"{name}: peak memory {memory:.2f}x a forward+backward (target <= 1.2x)", memory <= 1.2)]
        if not args.no_random_labels:
            noise = in_process("search-random", name, args.batch, 1, None, args.threads)
            ratio = noise["scoring"] / base["seconds"]
            rest = noise["rest"]
            memory = noise["rss_mb"] / base["rss_mb"]
            print(f"| {name}, random labels | {base['seconds']:.2f} | {noise['seconds']:.2f} | {noise['scoring']:.2f} "
                  f"({ratio:.2f}x) | {rest:.2f} | {base['rss_mb']:.0f} | {noise['rss_mb']:.0f} ({memory:.2f}x) |",
                  flush=True)
            verdicts += [(f"{name}, random labels: the label-free fallback was taken", noise["label_free"]),
                         (f"{name}, random labels: scoring {ratio:.2f}x a forward+backward (target <= 1.3x)",
                          ratio <= 1.3)]
        if not args.no_scaling:
            passes = {p: in_process("search", name, args.batch, p, None, args.threads) for p in (1, 2, 4)}
            print(f"|   {name}: scoring with 1 / 2 / 4 calibration passes: "
                  + " / ".join(f"{passes[p]['scoring']:.2f} s" for p in (1, 2, 4)) + " | | | | | | |")
            depths = (2, 6, 12) if name == "resnet50" else (4, 8, 12)
            deep = {d: in_process("search", name, args.batch, 1, d, args.threads) for d in depths}
            print(f"|   {name}: search at depth {' / '.join(map(str, depths))}: "
                  + " / ".join(f"{deep[d]['seconds']:.2f} s" for d in depths) + " | | | | | | |")
    if not args.no_create:
        print("\nThe cost of calibration_data: create_prune_retrain_model after a search at 1.5x (GroupMagnitude + "
              "GlobalRank), plain, with the calibration batch correcting the BatchNorm statistics only "
              "(reconstruct=False), and re-fitting the layers that read removed channels too (the default)\n")
        print("| model | plain s | statistics s | re-fit s | peak MB plain | peak MB statistics | peak MB re-fit |\n"
              "|---|---|---|---|---|---|---|")
        for name in args.models:
            runs = [in_process(kind, name, args.batch, 1, None, args.threads)
                    for kind in ("create", "create-stats", "create-refit")]
            print(f"| {name} | " + " | ".join(f"{r['seconds']:.2f}" for r in runs) + " | "
                  + " | ".join(f"{r['rss_mb']:.0f}" for r in runs) + " |", flush=True)
    print()
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
