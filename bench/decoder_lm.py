"""Pruning a decoder language model: held-out perplexity before and after, without fine-tuning and with it.

No pretrained causal language model installs offline, so the script trains one: a Llama-architecture decoder
built with ``transformers`` (grouped-query attention with 8 query / 2 key-value heads of 32, rotary embeddings,
RMSNorm, a SwiGLU MLP; hidden 256, 4 layers, 2.9 M parameters) on bytes of the English documentation that ships
with Python (``pydoc_data.topics``, about 465 kB): the first 90 % trains, the last 10 % is held out. Training
(``--train-steps`` AdamW steps of 16 windows of 128 bytes) takes a few minutes on a CPU; the weights are cached
(``--cache``) and reused.

At each target (``--targets``: times fewer parameters), from the same trained model:

- ``acps magnitude + re-fit``: ``auto_channel_prune_search`` with ``GroupMagnitudeSensitivity`` and
  ``GlobalRankSearch`` (acps's recommendation for a model used without fine-tuning), the cost being the
  parameter count (a gain estimator defined here), then ``create_prune_retrain_model`` with ``calibration_data``;
- ``acps Taylor``: ``GroupTaylorSensitivity`` + ``GlobalRankSearch`` (the recommendation for a model that will be
  fine-tuned), pruned without ``calibration_data``;
- ``TP magnitude``: Torch-Pruning's LLM recipe (its ``examples/LLMs/prune_llm.py``): ``BasePruner`` with
  ``GroupMagnitudeImportance(p=2, group_reduction="mean")``, one ``pruning_ratio`` for the hidden and MLP widths
  and the heads (``num_heads`` hints for q/k/v, ``prune_num_heads=True``, ``prune_head_dims=False``,
  ``round_to=4``, the ``lm_head`` ignored), then the head counts set on the attention modules as the recipe
  does. The ratio is bisected until the parameters fall to the target.

Both acps runs search on ``--calibration`` windows of the training text with next-token labels. Every pruned
model's held-out perplexity is measured as pruned, then after the same short fine-tune (``--finetune-steps`` AdamW
steps on the training text, the same seed and batches for every model).

Usage::

    python bench/decoder_lm.py [--targets 1.25,1.5,2] [--train-steps 1000] [--finetune-steps 60]
                               [--calibration 32] [--threads 2] [--cache PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# This script's folder comes first on the path and its transformers.py (another benchmark) would shadow the
# transformers package: the repository root goes in its place.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import acps_core as acps  # noqa: E402 (after the path fix above)
from acps_core.graph.model import LayerGeometry  # noqa: E402
from acps_core.methods.bases import GainEstimatorBase  # noqa: E402

WINDOW = 128
BATCH = 16
CONFIG = {"vocab_size": 256, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": WINDOW,
          "tie_word_embeddings": False, "use_cache": False, "attn_implementation": "sdpa"}


class ParameterCost(GainEstimatorBase):
    """Cost = the weights of each layer at the given widths: the search's target is a parameter count."""

    unit = "parameters"

    def layer_cost(self, layer: LayerGeometry, in_channels: int, out_channels: int) -> float:
        if layer.kind == "MultiheadAttention":  # its q, k and v projections (the out projection is a layer)
            return layer.projection_rows * in_channels * out_channels
        return float(in_channels * out_channels * math.prod(layer.kernel_size) // layer.groups)


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes of Python's English documentation topics, in key order: (first 90 %, last 10 %)."""
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n\n".join(topics[key] for key in sorted(topics)).encode()), dtype=torch.long)
    split = len(data) * 9 // 10
    return data[:split], data[split:]


def windows(data: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random windows of ``data``: inputs and next-byte labels."""
    starts = torch.randint(0, len(data) - WINDOW - 1, (count,), generator=generator)
    rows = torch.stack([data[s:s + WINDOW + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def train(model: nn.Module, data: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    """AdamW on random windows, linear warm-up then cosine decay."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    for _ in range(steps):
        x, y = windows(data, BATCH, generator)
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, count: int = 96) -> float:
    """exp of the mean next-byte cross-entropy over ``count`` consecutive windows of ``data``."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, min(count * WINDOW, len(data) - WINDOW - 1), WINDOW):
        x, y = data[start:start + WINDOW][None], data[start + 1:start + WINDOW + 1][None]
        total += float(F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="sum"))
        tokens += y.numel()
    return math.exp(total / tokens)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trained_model(cache: Path, steps: int, train_data: torch.Tensor) -> nn.Module:
    """The trained model: from the cache when it holds one of this configuration, else trained and cached."""
    import transformers

    config = transformers.LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    key = repr(sorted(CONFIG.items())) + f" steps={steps}"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key:
            model.load_state_dict(saved["state"])
            return model.eval()
    started = time.perf_counter()
    train(model, train_data, steps, 3e-3, seed=0)
    print(f"trained {parameters(model) / 1e6:.2f} M parameters for {steps} steps in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "state": model.state_dict()}, cache)
    return model.eval()


def acps_pruned(model: nn.Module, target: float, sensitivity: str, refit: bool, calibration: list[torch.Tensor],
                workdir: Path) -> nn.Module:
    """acps's search at ``target`` times fewer parameters, then the prune step (with the re-fit if ``refit``)."""
    config = workdir / "search.cfg"
    config.write_text(f"compress_ratio: {target}\nascend_optimized: false\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-block widths: the config keeps its old sizes
        acps.auto_channel_prune_search(model, config, calibration, workdir / "prune.cfg", sensitivity=sensitivity,
                                       search_alg="GlobalRankSearch", gain=ParameterCost())
        pruned: nn.Module = acps.create_prune_retrain_model(
            model, calibration[0], workdir / "prune.cfg", workdir / "prune.record",
            calibration_data=calibration if refit else None)
    return pruned


def tp_pruned(model: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning's LLM recipe at one ``pruning_ratio`` on a copy (see the module docs)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    config = pruned.config
    num_heads: dict[nn.Module, int] = {}
    for name, module in pruned.named_modules():
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = config.num_attention_heads
            num_heads[module.k_proj] = config.num_key_value_heads
            num_heads[module.v_proj] = config.num_key_value_heads
    with contextlib.redirect_stdout(io.StringIO()):  # its notes on the norms' weights, once per call
        pruner = tp.pruner.BasePruner(
            pruned, example_inputs=example,
            importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"), global_pruning=False,
            output_transform=lambda out: out.logits, pruning_ratio=ratio, ignored_layers=[pruned.lm_head],
            num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4)
        for group in pruner.step(interactive=True):
            group.prune()
    config.hidden_size = pruned.lm_head.in_features
    for name, module in pruned.named_modules():
        if name.endswith("self_attn"):
            module.num_heads = module.q_proj.out_features // module.head_dim
            module.num_key_value_groups = module.num_heads // (module.k_proj.out_features // module.head_dim)
            config.num_attention_heads = module.num_heads
            config.num_key_value_heads = module.k_proj.out_features // module.head_dim
        elif name.endswith("mlp"):
            config.intermediate_size = module.gate_proj.out_features
    return pruned.eval()


def tp_at(model: nn.Module, target: float, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning's recipe with the smallest ``pruning_ratio`` (bisected) that brings the parameters down to
    ``target`` times fewer."""
    goal = parameters(model) / target
    low, high = 0.0, 0.9
    best = tp_pruned(model, high, example)
    for _ in range(10):
        middle = (low + high) / 2
        candidate = tp_pruned(model, middle, example)
        if parameters(candidate) <= goal:
            high, best = middle, candidate
        else:
            low = middle
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--targets", default="1.25,1.5,2", help="times fewer parameters (default 1.25,1.5,2)")
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--calibration", type=int, default=32, help="windows the searches and the re-fit see")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "acps-bench" / "decoder_lm.pt")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    train_data, held_out = corpus()
    model = trained_model(args.cache, args.train_steps, train_data)
    calibration = list(windows(train_data, args.calibration, torch.Generator().manual_seed(1)))
    base = perplexity(model, held_out)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {parameters(model) / 1e6:.2f} M "
          f"parameters, held-out perplexity {base:.3f} (bytes); fine-tune {args.finetune_steps} steps", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="acps_decoder_") as workdir:
        for target in targets:
            runs = {"acps magnitude + re-fit": lambda t=target: acps_pruned(
                        model, t, "GroupMagnitudeSensitivity", True, calibration, Path(workdir)),
                    "acps Taylor": lambda t=target: acps_pruned(
                        model, t, "GroupTaylorSensitivity", False, calibration, Path(workdir)),
                    "TP magnitude": lambda t=target: tp_at(model, t, calibration[0][:1])}
            for method, run in runs.items():
                started = time.perf_counter()
                pruned = run()
                seconds = time.perf_counter() - started
                as_pruned = perplexity(pruned, held_out)
                train(pruned, train_data, args.finetune_steps, 5e-4, seed=2)
                tuned = perplexity(pruned, held_out)
                ratio = parameters(model) / parameters(pruned)
                rows.append((target, method, ratio, as_pruned, tuned, seconds))
                print(f"  {target:g}x {method}: {ratio:.3f}x fewer parameters, perplexity {as_pruned:.3f} -> "
                      f"{tuned:.3f} after fine-tuning ({seconds:.0f} s)", flush=True)

    print()
    print("| target | method | parameters fewer | held-out perplexity, pruned | after fine-tuning | seconds |")
    print("|---:|---|---:|---:|---:|---:|")
    print(f"| - | unpruned | 1.00x | {base:.3f} | - | - |")
    for target, method, ratio, as_pruned, tuned, seconds in rows:
        print(f"| {target:g}x | {method} | {ratio:.3f}x | {as_pruned:.3f} | {tuned:.3f} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
