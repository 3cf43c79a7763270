"""T5 built from small configs (random weights, nothing downloaded): its relative position bias is computed by the
first block of a stack and added in every block, so the heads of all the blocks of a stack go together; its MLPs
and its tied hidden width are pruned too, and a T5 encoder searched with uniform widths saves and loads back."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.graph.build import build_channel_graph
from acps_core.graph.verify import verify_groups
from acps_core.layers import SplitAttentionAdapter, adapter_for
from testing.flops import counted_macs
from testing.zoo import pruned_and_masked, random_keep

transformers = pytest.importorskip("transformers", reason="the transformers package is not installed")

VOCAB, HIDDEN, HEADS, HEAD_DIM = 96, 64, 4, 16


def t5_config(attention: str, layers: int = 2) -> object:
    return transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_DIM, d_ff=96, num_layers=layers,
                                 num_decoder_layers=layers, num_heads=HEADS, relative_attention_num_buckets=8,
                                 tie_word_embeddings=True, use_cache=False, attn_implementation=attention)


def t5(attention: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(t5_config(attention)).eval()


def ids(count: int = 2, tokens: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, tokens), generator=torch.Generator().manual_seed(0))


class T5Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.t5 = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.t5(input_ids=x, decoder_input_ids=x).logits
        return logits


def search_t5(model: nn.Module, x: torch.Tensor, tmp_path: Path, ratio: float, **options: bool
              ) -> acps.SearchResult:
    """Search the logits of ``model`` at ``ratio`` on random next tokens; the config goes to prune.cfg."""
    (tmp_path / "search.cfg").write_text(f"compress_ratio: {ratio}\nascend_optimized: false\n")
    labels = torch.randint(0, VOCAB, tuple(x.shape), generator=torch.Generator().manual_seed(1))
    return acps.auto_channel_prune_search(T5Logits(model), tmp_path / "search.cfg", [x, labels],
                                          tmp_path / "prune.cfg", **options)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_t5_heads_go_together_across_the_blocks_that_share_a_position_bias(attention: str) -> None:
    model = T5Logits(t5(attention))
    x = ids()
    assert isinstance(adapter_for(model.t5.encoder.block[0].layer[0].SelfAttention), SplitAttentionAdapter)
    graph = build_channel_graph(model, x)
    heads = {g.producers[0]: g for g in graph.groups if g.producers[0].endswith("Attention")}
    # One group per stack and kind: the first block makes the bias (or, for cross-attention, a zero bias of its
    # head count) that the second block adds.
    assert {name: group.producers for name, group in heads.items()} == {
        f"t5.{stack}.block.0.layer.{i}.{kind}": [f"t5.{stack}.block.{b}.layer.{i}.{kind}" for b in (0, 1)]
        for stack, i, kind in (("encoder", 0, "SelfAttention"), ("decoder", 0, "SelfAttention"),
                               ("decoder", 1, "EncDecAttention"))}
    assert all(g.prunable and g.unit == HEAD_DIM and g.channels == HEADS * HEAD_DIM for g in heads.values())
    hidden = next(g for g in graph.groups if "t5.encoder.embed_tokens" in g.producers)
    # One tied weight: the encoder's and decoder's embeddings, the head, and the shared embedding no forward calls.
    assert hidden.prunable and "t5.decoder.embed_tokens" in hidden.producers
    assert {"t5.encoder.block.0.layer.1.DenseReluDense.wi", "t5.decoder.block.1.layer.2.DenseReluDense.wi"} <= {
        g.name for g in graph.prunable_groups}
    assert verify_groups(model, graph, x) == []

    keep = random_keep(graph, seed=1)
    out, expected, pruned = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    encoder_heads = len(keep[heads["t5.encoder.block.0.layer.0.SelfAttention"].id]) // HEAD_DIM
    assert encoder_heads < HEADS
    first, second = (pruned.t5.encoder.block[b].layer[0].SelfAttention for b in (0, 1))
    assert first.n_heads == second.n_heads == encoder_heads and second.inner_dim == encoder_heads * HEAD_DIM
    assert first.relative_attention_bias.weight.shape == (8, encoder_heads) == (
        8, first.relative_attention_bias.embedding_dim)
    cross_heads = len(keep[heads["t5.decoder.block.0.layer.1.EncDecAttention"].id]) // HEAD_DIM
    assert pruned.t5.decoder.block[0].layer[1].EncDecAttention.n_heads == cross_heads  # sizes its zero bias
    shared = pruned.t5.shared
    assert shared.embedding_dim == len(keep[hidden.id]) == shared.weight.shape[1]
    assert shared.weight is pruned.t5.encoder.embed_tokens.weight is pruned.t5.decoder.embed_tokens.weight
    assert shared.weight is pruned.t5.lm_head.weight
    with torch.no_grad():  # another length: the pruned bias table makes the bias afresh
        assert pruned(ids(3, 7)).shape == (3, 7, VOCAB)


def test_a_per_head_tensor_no_attention_layer_made_keeps_the_heads_and_says_why() -> None:
    class GivenBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = transformers.models.t5.modeling_t5.T5Attention(t5_config("sdpa"))
            self.bias = nn.Parameter(torch.randn(1, HEADS, 12, 12))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.attention(x, position_bias=self.bias)[0]
            return out

    model = GivenBias().eval()
    graph = build_channel_graph(model, torch.randn(2, 12, HIDDEN))
    heads = next(g for g in graph.groups if g.producers == ["attention"])
    assert not heads.prunable and "one slice per head (shape [1, 4, 12, 12])" in heads.reasons[0]


def test_a_t5_encoder_searched_with_uniform_widths_saves_with_save_pretrained_and_loads_back(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(t5_config("sdpa", layers=3)).eval()
    x = ids(4, 16)

    class Pooled(nn.Module):  # a sentence embedding, as a T5 encoder is used
        def __init__(self, encoder: nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled: torch.Tensor = self.encoder(input_ids=x).last_hidden_state.mean(dim=1)
            return pooled

    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(Pooled(model), tmp_path / "search.cfg", [x, torch.randn(4, HIDDEN)],
                                            tmp_path / "prune.cfg", uniform_widths=True)
    assert result.target_reached
    with warnings.catch_warnings():
        warnings.simplefilter("error", acps.PerLayerWidthsWarning)
        pruned = acps.create_prune_retrain_model(Pooled(model), x, tmp_path / "prune.cfg",
                                                 tmp_path / "prune.record").encoder
    attention = [block.layer[0].SelfAttention for block in pruned.encoder.block]
    widths = {(a.n_heads, a.q.out_features, block.layer[1].DenseReluDense.wi.out_features)
              for a, block in zip(attention, pruned.encoder.block)}
    assert len(widths) == 1
    ((heads, _, intermediate),) = widths
    assert (heads, intermediate) != (HEADS, 96)
    assert (pruned.config.num_heads, pruned.config.d_ff, pruned.config.d_kv) == (heads, intermediate, HEAD_DIM)
    pruned.save_pretrained(tmp_path / "pruned")
    loaded = transformers.T5EncoderModel.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).last_hidden_state, pruned(input_ids=x).last_hidden_state,
                                   rtol=1e-5, atol=1e-6)
        assert counted_macs(Pooled(model), x) / counted_macs(Pooled(loaded), x) == pytest.approx(
            result.achieved_ratio, rel=0.05)


def test_an_encoder_decoder_searched_per_block_is_created_and_restored_from_its_record(tmp_path: Path) -> None:
    model, x = t5(), ids(4)
    result = search_t5(model, x, tmp_path, 1.3)
    assert result.target_reached
    with pytest.warns(acps.PerLayerWidthsWarning, match="num_attention_heads"):  # T5's config has one count
        pruned = acps.create_prune_retrain_model(T5Logits(model), x, tmp_path / "prune.cfg",
                                                 tmp_path / "prune.record")
    heads = {stack: {block.layer[0].SelfAttention.n_heads for block in getattr(pruned.t5, stack).block}
             for stack in ("encoder", "decoder")}
    assert all(len(counts) == 1 for counts in heads.values())  # one bias per stack: every block alike
    with torch.no_grad():
        logits = pruned(x)
        assert counted_macs(T5Logits(model), x) / counted_macs(pruned, x) == pytest.approx(
            result.achieved_ratio, rel=0.05)
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    with pytest.warns(acps.PerLayerWidthsWarning):
        restored = acps.restore_prune_retrain_model(T5Logits(t5(seed=1)), x, tmp_path / "prune.record",
                                                    tmp_path / "prune.cfg", tmp_path / "tuned.pth")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), logits, rtol=0, atol=0)


def test_umt5_cross_attention_reads_the_encoder_output_as_its_keys_and_values() -> None:
    config = transformers.UMT5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_DIM, d_ff=96, num_layers=2,
                                     num_decoder_layers=2, num_heads=HEADS, relative_attention_num_buckets=8,
                                     use_cache=False)
    torch.manual_seed(0)
    model = T5Logits(transformers.UMT5ForConditionalGeneration(config).eval())
    x = ids()
    graph = build_channel_graph(model, x)  # its cross-attention takes encoder_hidden_states=
    hidden = next(g for g in graph.groups if "t5.encoder.embed_tokens" in g.producers)
    assert hidden.prunable
    heads = [g for g in graph.groups if g.producers[0].endswith("Attention")]
    assert len(heads) == 6 and all(g.prunable for g in heads)  # a bias table in every block: a group each
    assert verify_groups(model, graph, x) == []
    out, expected, _ = pruned_and_masked(model, x, graph, random_keep(graph, seed=2))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)


def test_a_per_head_bias_in_another_layout_keeps_the_heads_with_the_reason() -> None:
    config = transformers.LongT5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_DIM, d_ff=96, num_layers=2,
                                       num_decoder_layers=2, num_heads=HEADS, relative_attention_num_buckets=8,
                                       use_cache=False, encoder_attention_type="local", local_radius=4)
    torch.manual_seed(0)
    model = T5Logits(transformers.LongT5ForConditionalGeneration(config).eval())
    x = ids()
    graph = build_channel_graph(model, x)
    # The local attention returns (batch, blocks, heads, block, 3 * block) scores: its first block's heads stay.
    first = next(g for g in graph.groups if g.producers == ["t5.encoder.block.0.layer.0.LocalSelfAttention"])
    assert not first.prunable and "may hold one slice per head (shape [2, 3, 4, 5, 15])" in first.reasons[0]
    decoder = next(g for g in graph.groups if g.producers[0] == "t5.decoder.block.0.layer.0.SelfAttention")
    assert decoder.prunable  # the decoder's attention is T5's
    assert verify_groups(model, graph, x) == []


def test_an_encoder_decoder_searched_with_uniform_widths_keeps_one_head_count_and_saves(tmp_path: Path) -> None:
    model, x = t5(), ids(4)
    result = search_t5(model, x, tmp_path, 1.4, uniform_widths=True)
    assert result.target_reached
    # One config field, one count: the encoder's, the decoder's and the cross-attention's heads are one set.
    assert any("t5.t5.encoder.block.#.layer.0.SelfAttention + " in note or
               "t5.encoder.block.#.layer.0.SelfAttention + " in note for note in result.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", acps.PerLayerWidthsWarning)
        pruned = acps.create_prune_retrain_model(T5Logits(model), x, tmp_path / "prune.cfg",
                                                 tmp_path / "prune.record").t5
    attention = [module for name, module in pruned.named_modules() if name.endswith("Attention")]
    mlps = [module.wi for name, module in pruned.named_modules() if name.endswith("DenseReluDense")]
    assert len({a.n_heads for a in attention}) == 1 and len({wi.out_features for wi in mlps}) == 1
    assert (pruned.config.num_heads, pruned.config.d_ff) == (attention[0].n_heads, mlps[0].out_features) != (
        HEADS, 96)
    pruned.save_pretrained(tmp_path / "pruned")
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(T5Logits(loaded)(x), T5Logits(pruned)(x), rtol=1e-4, atol=1e-5)


def test_syncing_the_config_folds_the_decoder_output_scale_into_its_final_norm() -> None:
    from acps_core.prune.model_config import sync_config
    from acps_core.prune.slicing import prune_channels

    model = T5Logits(t5())
    x = ids()
    graph = build_channel_graph(model, x)
    keep = {g.id: list(range(g.channels - g.unit)) for g in graph.prunable_groups}  # one atom less: uniform
    prune_channels(model, graph, keep)
    assert model.t5.model_dim == HIDDEN  # what its logits are scaled by: the width it was built with
    with torch.no_grad():
        before = model(x)
    assert sync_config(model) is None
    assert model.t5.model_dim == model.t5.config.d_model == HIDDEN - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
