"""Coverage of real architectures: one model of every timm vision family, pruned to 1.5x fewer FLOPs by acps and by
Torch-Pruning, side by side in one run.

For each model (random weights, built by ``testing/timm_models.py``; nothing is downloaded):

- acps: trace, search at ``compress_ratio: 1.5`` (``ascend_optimized: false``, the default methods, 8 calibration
  images with random labels), ``create_prune_retrain_model``, run;
- Torch-Pruning (``--no-tp`` leaves it out): ``MetaPruner`` with group L2 magnitude, the classifier ignored, timm's
  attention given as its documented hints (``num_heads`` per ``qkv`` Linear, ``prune_num_heads=True``), pruned in
  steps of 2 % of the channels until its own MAC count is 1.5x lower, then each attention module's ``num_heads``
  and ``head_dim`` set from the pruner, as its timm example does; run.

Printed per model and tool: the prunable channel groups, the FLOPs ratio reached (the FLOPs of one image before /
after, counted by ``torch.utils.flop_counter.FlopCounterMode``, the CPU attention kernel included), whether
attention heads were pruned (models with attention only), whether the pruned model ran with the original output
shape, and the seconds taken. "end to end" means it ran and reached at least 1.45x. A tool gets 120 s per
model; one that raises or runs out of time scores nothing there (the errors are listed). Totals at the end.

Usage::

    python bench/coverage.py [--models resnet18,vit_tiny_patch16_224,...] [--no-tp] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import acps_core
from acps_core.graph.build import build_channel_graph
from testing.timm_models import BY_MODEL, CASES, TimmCase, build, counted_flops, head_counts, images

TARGET = 1.5
#: Seconds each tool gets per model.
LIMIT_S = 120


@dataclass
class Outcome:
    groups: int | None = None
    ratio: float | None = None
    heads: bool | None = None  # None: the model has no attention heads
    ran: bool = False
    seconds: float = 0.0
    error: str | None = None

    @property
    def end_to_end(self) -> bool:
        return self.ran and self.ratio is not None and self.ratio >= TARGET - 0.05


def measure(model: nn.Module, pruned: nn.Module, x: torch.Tensor, before_heads: dict[str, int]) -> Outcome:
    outcome = Outcome()
    with torch.no_grad():
        expected = model(x)
        outcome.ran = pruned(x).shape == expected.shape
    outcome.ratio = counted_flops(model, x) / counted_flops(pruned, x)
    after = head_counts(pruned)
    outcome.heads = any(after.get(n, h) < h for n, h in before_heads.items()) if before_heads else None
    return outcome


def run_acps(case: TimmCase) -> Outcome:
    model = build(case)
    x = images(case, 8)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(folder)
        (path / "search.cfg").write_text(f"compress_ratio: {TARGET}\nascend_optimized: false\n")
        labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
        acps_core.auto_channel_prune_search(model, str(path / "search.cfg"), [x, labels], str(path / "prune.cfg"))
        pruned = acps_core.create_prune_retrain_model(model, x, path / "prune.cfg", path / "prune.record")
    seconds = time.perf_counter() - started
    outcome = measure(model, pruned, x[:1], head_counts(model))
    outcome.groups = len(build_channel_graph(model, x[:2]).prunable_groups)
    outcome.seconds = seconds
    return outcome


def run_tp(case: TimmCase) -> Outcome:
    import torch_pruning as tp

    model = build(case)
    x = images(case, 1)
    before_heads = head_counts(model)
    reference = copy.deepcopy(model)
    started = time.perf_counter()
    attention = {m: m for m in model.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)
                 and isinstance(getattr(m, "num_heads", None), int)}
    num_heads = {m.qkv: m.num_heads for m in attention}
    classifier: Any = model.get_classifier() if hasattr(model, "get_classifier") else None
    ignored = [m for m in ([classifier] if isinstance(classifier, nn.Module) else [])
               if any(True for _ in m.parameters())]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.8,
                                  iterative_steps=40, ignored_layers=ignored, num_heads=num_heads,
                                  prune_num_heads=bool(num_heads), head_pruning_ratio=0.8, global_pruning=False)
    groups = len(list(pruner.DG.get_all_groups(ignored_layers=ignored, root_module_types=pruner.root_module_types)))
    base = tp.utils.count_ops_and_params(model, x)[0]
    for _ in range(40):
        pruner.step()
        if base / max(tp.utils.count_ops_and_params(model, x)[0], 1) >= TARGET:
            break
    for module in attention:
        module.num_heads = pruner.num_heads[module.qkv]
        module.head_dim = module.qkv.out_features // (3 * module.num_heads)
    seconds = time.perf_counter() - started
    outcome = measure(reference, model.eval(), x, before_heads)
    outcome.groups = groups
    outcome.seconds = seconds
    return outcome


def _out_of_time(signum: int, frame: Any) -> None:
    raise TimeoutError(f"no result within {LIMIT_S} s")


def attempt(run: Any, case: TimmCase) -> Outcome:
    """One tool on one model, given at most ``LIMIT_S`` seconds."""
    previous = signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(LIMIT_S)
    try:
        return run(case)  # type: ignore[no-any-return]
    except Exception as exc:  # a tool that fails on a model scores nothing there
        return Outcome(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cells(outcome: Outcome) -> list[str]:
    if outcome.error is not None:
        return ["-", "-", "-", "no", "-"]
    heads = "-" if outcome.heads is None else ("yes" if outcome.heads else "no")
    return [str(outcome.groups), f"{outcome.ratio:.2f}x", heads, "yes" if outcome.end_to_end else "no",
            f"{outcome.seconds:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(c.model for c in CASES))
    parser.add_argument("--no-tp", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tools = [("acps", run_acps)] + ([] if args.no_tp else [("Torch-Pruning", run_tp)])
    header = ["model"] + [f"{tool} {column}" for tool, _ in tools
                          for column in ("groups", "FLOPs ratio", "heads", "end to end", "s")]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    totals = {tool: [0, 0, 0] for tool, _ in tools}  # end to end, heads pruned, attention models
    errors = []
    for name in args.models.split(","):
        case = BY_MODEL[name]
        row = [name]
        for tool, run in tools:
            outcome = attempt(run, case)
            row += cells(outcome)
            totals[tool][0] += outcome.end_to_end
            totals[tool][1] += bool(outcome.heads)
            totals[tool][2] += outcome.heads is not None
            if outcome.error:
                errors.append(f"{name}, {tool}: {outcome.error}")
        print("| " + " | ".join(row) + " |", flush=True)
    models = len(args.models.split(","))
    for tool, (done, heads, attention) in totals.items():
        print(f"\n{tool}: {done} of {models} models pruned end to end to >= {TARGET - 0.05:.2f}x fewer FLOPs; "
              f"heads pruned in {heads} of the {attention} models with attention heads it could see")
    for error in errors:
        print(f"error: {error}")


if __name__ == "__main__":
    main()
