"""Hugging Face decoders built from small configs (random weights, nothing downloaded): the heads of their attention
(multi-head and grouped-query, eager and SDPA) and their MLPs are pruned whole and exactly, the cost is what a FLOP
counter counts, and a search at a target runs through create and restore with a language model's token labels."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.graph.build import build_channel_graph
from acps_core.graph.model import ChannelGraph
from acps_core.graph.verify import verify_groups
from acps_core.layers import (
    SplitAttentionAdapter,
    TransposedLinearAdapter,
    adapter_for,
    prune_grouped_query_attention,
)
from testing.flops import counted_macs, graph_macs
from testing.zoo import pruned_and_masked, random_keep

transformers = pytest.importorskip("transformers", reason="the transformers package is not installed")

VOCAB, HIDDEN, HEADS, HEAD_DIM = 96, 64, 4, 16
#: (name, config class, key/value heads, attention implementation, input and output embeddings tied)
CASES = [
    ("llama-mha-eager", "LlamaConfig", 4, "eager", False),
    ("llama-gqa-eager-tied", "LlamaConfig", 2, "eager", True),
    ("llama-gqa-sdpa", "LlamaConfig", 2, "sdpa", False),
    ("qwen2-gqa-sdpa-tied", "Qwen2Config", 2, "sdpa", True),
    ("mistral-gqa-eager", "MistralConfig", 2, "eager", False),
    ("gemma-gqa-eager-tied", "GemmaConfig", 2, "eager", True),  # its RMS norms scale by 1 + weight
    ("qwen3-gqa-sdpa-tied", "Qwen3Config", 2, "sdpa", True),  # RMS norms over the head width on q and k
]


class Logits(nn.Module):
    """A Hugging Face model returning its logits alone (what the masking helpers compare)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm(x).logits
        return logits


def causal_lm(config_name: str, kv_heads: int, attention: str, seed: int = 0, tied: bool = False,
              layers: int = 2) -> nn.Module:
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=kv_heads, head_dim=HEAD_DIM, max_position_embeddings=64,
        attn_implementation=attention, use_cache=False, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norm gains, as after training
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def ids(count: int = 2, tokens: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, tokens), generator=torch.Generator().manual_seed(0))


def attention_groups(graph: ChannelGraph) -> list:
    return [g for g in graph.groups if g.producers and g.producers[0].endswith("self_attn")]


@pytest.mark.parametrize(("name", "config", "kv_heads", "attention", "tied"), CASES, ids=[c[0] for c in CASES])
def test_heads_mlp_and_hidden_width_are_pruned_and_pruned_equals_masked(name, config, kv_heads, attention,
                                                                         tied) -> None:
    model = Logits(causal_lm(config, kv_heads, attention, tied=tied))
    x = ids()
    layer = model.lm.model.layers[0]
    assert isinstance(adapter_for(layer.self_attn), SplitAttentionAdapter)
    graph = build_channel_graph(model, x)
    heads = attention_groups(graph)
    assert len(heads) == 2 and all(g.prunable for g in heads)
    assert {g.unit for g in heads} == {HEADS // kv_heads * HEAD_DIM}  # one key/value group at a time
    mlp = [g for g in graph.groups if g.producers[:2] == ["lm.model.layers.0.mlp.gate_proj",
                                                          "lm.model.layers.0.mlp.up_proj"]]
    assert len(mlp) == 1 and mlp[0].prunable
    # The residual stream: the token embedding, every o_proj and down_proj; every RMS norm follows it.
    hidden = next(g for g in graph.groups if "lm.model.embed_tokens" in g.producers)
    assert hidden.prunable and len(hidden.producers) == 5
    assert {u.layer for u in hidden.followers} >= {"lm.model.norm", "lm.model.layers.1.post_attention_layernorm"}
    assert any(u.layer == "lm.lm_head" for u in hidden.consumers)
    assert verify_groups(model, graph, x) == []

    keep = random_keep(graph, seed=3)
    assert all(g.id in keep for g in heads)
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    attention_module = pruned.lm.model.layers[0].self_attn
    kept_groups = len(keep[heads[0].id]) // (HEADS // kv_heads * HEAD_DIM)
    assert attention_module.k_proj.out_features == kept_groups * HEAD_DIM
    assert attention_module.q_proj.out_features == kept_groups * HEADS // kv_heads * HEAD_DIM
    width = len(keep[hidden.id])
    lm = pruned.lm
    assert lm.model.embed_tokens.embedding_dim == width and lm.lm_head.weight.shape == (VOCAB, width)
    assert lm.model.norm.weight.shape == (width,) and attention_module.q_proj.in_features == width
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied  # a tied head stays tied

    # The cost the search uses is what a FLOP counter counts (eager attention: its products are plain matmuls).
    if attention == "eager":
        kept = {g: len(channels) for g, channels in keep.items()}
        assert graph_macs(graph, {}) == pytest.approx(counted_macs(model, x), rel=1e-6)
        assert graph_macs(graph, kept) == pytest.approx(counted_macs(pruned, x), rel=1e-6)


@pytest.fixture
def query_heads():
    """Grouped-query attention pruned by query heads inside its groups, for one test."""
    prune_grouped_query_attention("query_heads")
    yield
    prune_grouped_query_attention("kv_groups")


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_query_heads_go_alike_in_every_group_and_the_key_value_heads_stay(kv_heads: int, request) -> None:
    if kv_heads == 2:  # multi-query attention (one key/value head) is pruned this way without asking
        request.getfixturevalue("query_heads")
    model = Logits(causal_lm("LlamaConfig", kv_heads, "eager"))
    x = ids()
    graph = build_channel_graph(model, x)
    heads = attention_groups(graph)
    assert all(g.prunable and g.unit == HEAD_DIM and g.aligned == kv_heads for g in heads)
    assert verify_groups(model, graph, x) == []
    keep = random_keep(graph, seed=5)
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    attention_module = pruned.lm.model.layers[0].self_attn
    kept_heads = len(keep[heads[0].id]) // HEAD_DIM
    assert attention_module.k_proj.out_features == kv_heads * HEAD_DIM  # every key/value head stays
    assert attention_module.num_key_value_groups == kept_heads // kv_heads < HEADS // kv_heads


def test_the_grouped_query_setting_is_checked() -> None:
    with pytest.raises(acps.ArgumentError, match="kv_groups"):
        prune_grouped_query_attention("heads")


def test_search_create_and_restore_with_token_labels(tmp_path: Path) -> None:
    model = causal_lm("LlamaConfig", 2, "sdpa")
    x = ids(4)
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100  # the next token at every position; none after the last
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.25\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, labels],
                                            str(tmp_path / "prune.cfg"), sensitivity="GroupTaylorSensitivity")
    assert result.target_reached
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    widths = [(layer.self_attn.q_proj.out_features, layer.mlp.up_proj.out_features) for layer in pruned.model.layers]
    assert widths != [(HEADS * HEAD_DIM, 96)] * 2
    with torch.no_grad():
        counted = counted_macs(Logits(model), x) / counted_macs(Logits(pruned), x)
        logits = pruned(x).logits
    assert logits.shape == (4, 12, VOCAB)
    assert counted == pytest.approx(result.achieved_ratio, rel=0.05)  # (SDPA's products: not in the counter)
    onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    path = acps.save_prune_retrain_model(Logits(pruned), tmp_path / "pruned.onnx", x[:2], input_names=["ids"],
                                         dynamic_axes={"ids": {0: "batch"}})
    (exported,) = onnxruntime.InferenceSession(str(path)).run(None, {"ids": x[:3].numpy()})
    torch.testing.assert_close(torch.from_numpy(exported), logits[:3], rtol=1e-4, atol=1e-5)
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    restored = acps.restore_prune_retrain_model(causal_lm("LlamaConfig", 2, "sdpa", seed=1), x,
                                                tmp_path / "prune.record", tmp_path / "prune.cfg",
                                                tmp_path / "tuned.pth")
    with torch.no_grad():
        torch.testing.assert_close(restored(x).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_search_prune_and_refit_in_their_own_precision(tmp_path: Path,
                                                                             dtype: torch.dtype) -> None:
    model = causal_lm("LlamaConfig", 2, "sdpa").to(dtype)
    x = ids(4)
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(model, tmp_path / "search.cfg", [x, labels], tmp_path / "prune.cfg")
    assert result.target_reached
    # The hidden width too: its RMSNorm is proven on a float32 copy, and the check by execution allows the
    # rounding of the half-precision dtype.
    hidden = result.layers["model.embed_tokens"]
    assert hidden.kept < hidden.total
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record",
                                             calibration_data=[x, labels])
    assert {p.dtype for p in pruned.parameters()} == {dtype}
    with torch.no_grad():
        logits = pruned(x).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_a_bert_encoder_has_its_heads_mlp_and_hidden_width_pruned_exactly() -> None:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                     num_attention_heads=HEADS, intermediate_size=96, max_position_embeddings=64,
                                     num_labels=3)
    torch.manual_seed(0)
    model = Logits(transformers.BertForSequenceClassification(config)).eval()
    x = ids()
    graph = build_channel_graph(model, x)
    prefix = "lm.bert.encoder.layer.0"
    heads = next(g for g in graph.groups if f"{prefix}.attention.self.query" in g.producers)
    assert heads.prunable and heads.unit == HIDDEN // HEADS  # traced function by function: q, k and v together
    assert {f"{prefix}.attention.self.key", f"{prefix}.attention.self.value"} <= set(heads.producers)
    hidden = next(g for g in graph.groups if "lm.bert.embeddings.word_embeddings" in g.producers)
    assert hidden.prunable and {"lm.bert.embeddings.position_embeddings",
                                f"{prefix}.output.dense"} <= set(hidden.producers)
    assert verify_groups(model, graph, x) == []
    keep = random_keep(graph, seed=2)
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    assert pruned.lm.bert.encoder.layer[0].attention.self.query.out_features == len(keep[heads.id])


def test_albert_with_one_layer_shared_by_every_block_loses_heads_mlp_and_hidden_width(tmp_path: Path) -> None:
    config = transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=HIDDEN, num_hidden_layers=3,
                                       num_attention_heads=HEADS, intermediate_size=96, max_position_embeddings=64,
                                       num_labels=3)
    torch.manual_seed(0)
    model = Logits(transformers.AlbertForSequenceClassification(config)).eval()
    x = ids(4)
    graph = build_channel_graph(model, x)
    assert verify_groups(model, graph, x) == []
    assert [g.producers for g in graph.groups if not g.prunable] == [["lm.classifier"]]
    layer = "lm.albert.encoder.albert_layer_groups.0.albert_layers.0"
    assert {n: graph.layers[n].calls for n in (f"{layer}.attention.query", f"{layer}.ffn")} == {
        f"{layer}.attention.query": 3, f"{layer}.ffn": 3}  # one module called by every block
    heads = next(g for g in graph.groups if f"{layer}.attention.query" in g.producers)
    assert heads.unit == HIDDEN // HEADS
    keep = random_keep(graph, seed=4)
    out, expected, _ = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)

    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, torch.randint(0, 3, (4,))],
                                            str(tmp_path / "prune.cfg"))
    with pytest.warns(acps.PerLayerWidthsWarning, match="restore_prune_retrain_model"):  # its config is stale
        pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert result.target_reached and pruned.lm.config.hidden_size == HIDDEN
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    torch.manual_seed(1)
    fresh = Logits(transformers.AlbertForSequenceClassification(config)).eval()
    restored = acps.restore_prune_retrain_model(fresh, x, tmp_path / "prune.record", tmp_path / "prune.cfg",
                                                tmp_path / "tuned.pth")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), pruned(x), rtol=0, atol=0)


ENCODERS = {  # family -> (config class, model class, the MLP's first layer in block 0)
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", "roberta.encoder.layer.0.intermediate.dense"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   "distilbert.transformer.layer.0.ffn.lin1"),
}


@pytest.mark.parametrize("family", list(ENCODERS))
def test_roberta_and_distilbert_lose_heads_mlp_and_hidden_width_exactly(family: str) -> None:
    config_name, model_name, mlp = ENCODERS[family]
    sizes = ({"dim": HIDDEN, "n_layers": 2, "n_heads": HEADS, "hidden_dim": 96} if family == "distilbert" else
             {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": HEADS, "intermediate_size": 96})
    config = getattr(transformers, config_name)(vocab_size=VOCAB, max_position_embeddings=64, num_labels=3, **sizes)
    torch.manual_seed(0)
    model = Logits(getattr(transformers, model_name)(config)).eval()
    x = ids()
    graph = build_channel_graph(model, x)
    groups = {g.name: g for g in graph.groups}
    heads = [g for g in graph.prunable_groups if g.unit == HIDDEN // HEADS]
    assert len(heads) == 2  # one per block, in whole heads
    assert groups[f"lm.{mlp}"].prunable
    hidden = next(g for g in graph.groups if any(p.endswith("embeddings.word_embeddings") for p in g.producers))
    assert hidden.prunable and hidden.channels == HIDDEN
    assert verify_groups(model, graph, x) == []
    keep = random_keep(graph, seed=3)
    out, expected, _ = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)


def test_uniform_widths_go_into_the_config_and_save_pretrained_loads_back(tmp_path: Path) -> None:
    from acps_core.prune.model_config import sync_config
    from acps_core.prune.slicing import prune_channels

    model = causal_lm("LlamaConfig", 2, "eager", tied=True)
    x = ids()
    graph = build_channel_graph(Logits(model), x)
    keep = {}
    for group in graph.prunable_groups:  # the same channels go in every block: widths stay uniform
        unit = group.unit
        keep[group.id] = [c for c in range(group.channels) if c // unit % 2 == 0 or group.channels // unit < 2]
    wrapped = Logits(model)
    prune_channels(wrapped, graph, keep)
    assert sync_config(model) is None
    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.intermediate_size) == (32, 2, 1, HEAD_DIM, 48)
    model.save_pretrained(tmp_path / "pruned")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)  # float rounding


def test_a_search_with_uniform_widths_saves_with_save_pretrained_and_loads_back(tmp_path: Path) -> None:
    model = causal_lm("LlamaConfig", 2, "sdpa", layers=3)
    x = ids(4, 16)
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(model, tmp_path / "search.cfg", [x, labels], tmp_path / "prune.cfg",
                                            uniform_widths=True)
    assert result.target_reached
    assert any("model.layers.#.self_attn (3 blocks)" in note for note in result.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", acps.PerLayerWidthsWarning)
        pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    widths = {(layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features,
               layer.mlp.up_proj.out_features) for layer in pruned.model.layers}
    assert len(widths) == 1 and widths != {(HEADS * HEAD_DIM, 2 * HEAD_DIM, 96)}
    config = pruned.config
    assert {(config.num_attention_heads * HEAD_DIM, config.num_key_value_heads * HEAD_DIM,
             config.intermediate_size)} == widths
    # The hidden width is a multiple of the heads kept (transformers refuses to save the config otherwise).
    assert config.hidden_size == pruned.model.embed_tokens.embedding_dim < HIDDEN
    assert config.hidden_size % config.num_attention_heads == 0
    pruned.save_pretrained(tmp_path / "pruned")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, pruned(x).logits, rtol=1e-5, atol=1e-6)
        assert counted_macs(Logits(model), x) / counted_macs(Logits(loaded), x) == pytest.approx(
            result.achieved_ratio, rel=0.05)


def test_a_config_that_would_rebuild_other_shapes_is_named_and_left_alone() -> None:
    from acps_core.prune.model_config import rebuild_mismatch

    model = causal_lm("LlamaConfig", 2, "eager")
    assert rebuild_mismatch(model, model.config) is None
    model.config.intermediate_size = 80
    assert "model.layers.0.mlp.gate_proj.weight (96, 64) (the config builds (80, 64))" in str(
        rebuild_mismatch(model, model.config))


def test_a_config_that_cannot_state_the_widths_is_left_exactly_as_it_was() -> None:
    from acps_core.prune.model_config import sync_config
    from acps_core.prune.slicing import prune_channels

    config = transformers.PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=HEADS, num_key_value_heads=HEADS, use_cache=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    x = ids()
    graph = build_channel_graph(Logits(model), x)
    keep = {g.id: list(range(0, g.channels, 2)) for g in graph.prunable_groups if g.name.endswith("mlp.fc1")}
    prune_channels(Logits(model), graph, keep)  # Phi's fc1/fc2: a width the config reads as intermediate_size
    before = model.config.to_dict()
    assert "fc1.weight (48, 64) (the config builds (96, 64))" in str(sync_config(model))
    assert model.config.to_dict() == before  # head_dim, written to try, is taken back out


def test_per_layer_widths_leave_the_config_alone_and_say_how_to_rebuild(tmp_path: Path) -> None:
    model = causal_lm("LlamaConfig", 2, "eager")
    x = ids(4)
    (tmp_path / "prune.cfg").write_text("".join(
        f'override_layer_configs {{ layer_name: "model.layers.0.mlp.{name}" prune_config {{ filter_pruner {{ '
        'balanced_l2_norm_filter_prune { prune_ratio: 0.5 ascend_optimized: false } } } }\n'
        for name in ("gate_proj", "up_proj")))
    before = model.config.intermediate_size
    with pytest.warns(acps.PerLayerWidthsWarning, match="intermediate_size"):
        pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert pruned.config.intermediate_size == before == model.config.intermediate_size
    assert pruned.model.layers[0].mlp.up_proj.out_features == 48


def test_phi_attention_with_a_dense_out_projection_and_qk_norms_loses_heads() -> None:
    config = transformers.PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=HEADS, num_key_value_heads=2, qk_layernorm=True,
                                    max_position_embeddings=64, attn_implementation="eager", use_cache=False)
    torch.manual_seed(0)
    model = Logits(transformers.AutoModelForCausalLM.from_config(config).eval())
    x = ids()
    attention = model.lm.model.layers[0].self_attn
    assert isinstance(adapter_for(attention), SplitAttentionAdapter)
    graph = build_channel_graph(model, x)
    heads = attention_groups(graph)
    assert len(heads) == 2 and all(g.prunable and g.unit == 2 * HEAD_DIM for g in heads)
    assert verify_groups(model, graph, x) == []
    keep = random_keep(graph, seed=1)
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    pruned_attention = pruned.lm.model.layers[0].self_attn
    assert pruned_attention.dense.in_features == pruned_attention.q_proj.out_features < HIDDEN
    assert pruned_attention.q_layernorm.weight.shape == (HEAD_DIM,)  # shared by every head: kept whole


def test_gpt2_with_its_transposed_linears_loses_heads_mlp_and_hidden_width() -> None:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager", use_cache=False)
    torch.manual_seed(0)
    model = Logits(transformers.GPT2LMHeadModel(config).eval())
    x = ids()
    block = model.lm.transformer.h[0]
    assert isinstance(adapter_for(block.mlp.c_fc), TransposedLinearAdapter)  # Conv1D, recognised by its parts
    graph = build_channel_graph(model, x)
    heads = next(g for g in graph.groups if g.producers == ["lm.transformer.h.0.attn"])
    hidden = next(g for g in graph.groups if "lm.transformer.wte" in g.producers)
    assert heads.prunable and heads.unit == HIDDEN // HEADS and hidden.prunable
    assert verify_groups(model, graph, x) == []
    keep = random_keep(graph, seed=1)
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    attention = pruned.lm.transformer.h[0].attn
    assert attention.num_heads * attention.head_dim == attention.split_size == attention.c_proj.nx < HIDDEN
    assert pruned.lm.lm_head.weight is pruned.lm.transformer.wte.weight
    kept = {g: len(channels) for g, channels in keep.items()}
    assert graph_macs(graph, kept) == pytest.approx(counted_macs(pruned, x), rel=1e-6)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_hugging_face_vision_transformers_lose_heads_exactly(family: str) -> None:
    torch.manual_seed(0)
    if family == "vit":
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=2,
                                        num_attention_heads=HEADS, intermediate_size=96, num_labels=3)
        model = Logits(transformers.ViTForImageClassification(config).eval())
    else:  # window attention with a relative-position bias table per head
        config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                         window_size=4, num_labels=3)
        model = Logits(transformers.SwinForImageClassification(config).eval())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = build_channel_graph(model, x)
    heads = [g for g in graph.groups if g.unit > 1]
    assert len(heads) == 2 and all(g.prunable for g in heads)
    assert verify_groups(model, graph, x) == []
    keep = {g.id: list(range(g.unit, g.channels)) for g in heads}  # the first head of every attention goes
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    if family == "swin":
        attention = pruned.lm.swin.encoder.layers[1].blocks[0].attention
        assert isinstance(adapter_for(attention), SplitAttentionAdapter)
        assert attention.num_attention_heads == 3
        assert attention.relative_position_bias.relative_position_bias_table.shape[1] == 3


def test_towers_built_from_one_config_object_sync_it_only_when_they_agree() -> None:
    from acps_core.prune.model_config import sync_config
    from acps_core.prune.slicing import prune_channels

    class DualEncoder(nn.Module):
        def __init__(self, config: object) -> None:
            super().__init__()
            self.query, self.document = transformers.LlamaModel(config), transformers.LlamaModel(config)

        def forward(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            scores: torch.Tensor = (self.query(q).last_hidden_state.mean(1)
                                    * self.document(d).last_hidden_state.mean(1)).sum(-1)
            return scores

    x = ids()
    for query_share, expected in ((0.5, 48), (0.75, None)):
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96,
                                          num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                                          head_dim=HEAD_DIM, attn_implementation="eager", use_cache=False)
        torch.manual_seed(0)
        model = DualEncoder(config).eval()
        graph = build_channel_graph(model, (x, x))
        keep = {}
        for group in graph.prunable_groups:  # uniform in each tower; the towers alike or not
            atoms = group.channels // group.unit
            share = query_share if group.name.startswith("query") else 0.5
            keep[group.id] = list(range(max(1, int(atoms * share)) * group.unit))
        prune_channels(model, graph, keep)
        why_not = sync_config(model)
        if expected is None:  # one config cannot state both towers: left as it was, and said so
            assert config.intermediate_size == 96 and "intermediate_size" in why_not
        else:
            assert why_not is None and config.intermediate_size == expected
