"""The check by execution: groups whose trial pruning breaks the model or changes its result are left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.errors import GraphError
from acps_core.graph.build import build_channel_graph
from acps_core.graph.verify import verify_groups


class CountsChannels(nn.Module):
    """Divides by its channel count: no trace shows it, and pruning would silently change the result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.other = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        y = self.conv(x)
        y = y / y.shape[1]
        return self.head(torch.cat([y, self.other(x)], 1).mean((2, 3)))


class HuggingFaceStyleAttention(nn.Module):
    """Reads x.size() and then splits the heads with a constant head count (the transformers pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.query, self.key, self.value = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def split(self, x):
        return x.view(x.size()[:-1] + (4, 4)).transpose(1, 2)  # noqa: RUF005 - the pattern as written there

    def forward(self, x):
        x = self.embed(x)
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        context = (q @ k.transpose(-2, -1) / 2).softmax(-1) @ v
        x = x + self.out(context.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return self.head(x.mean(1))


def test_a_group_whose_count_is_used_as_a_value_is_left_alone_and_the_others_kept() -> None:
    model = CountsChannels().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = build_channel_graph(model, x)
    assert graph.layers["conv"].prunable  # the trace alone cannot see it
    assert verify_groups(model, graph, x) == ["conv"]
    assert "trial" in graph.layers["conv"].reason and "changed by up to" in graph.layers["conv"].reason
    assert graph.layers["other"].prunable


def test_constant_head_counts_after_a_size_query_leave_the_heads_alone() -> None:
    model = HuggingFaceStyleAttention().eval()
    x = torch.randn(2, 5, 6)
    graph = build_channel_graph(model, x)
    verify_groups(model, graph, x)
    assert not graph.layers["query"].prunable and "invalid" in graph.layers["query"].reason
    assert graph.layers["embed"].prunable


def test_the_search_never_prunes_what_the_trial_rejects(tmp_path) -> None:
    model = CountsChannels().eval()
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.3\nascend_optimized: false\n")
    x = torch.randn(4, 3, 8, 8)
    result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, torch.randint(0, 4, (4,))],
                                            str(tmp_path / "prune.cfg"))
    assert result.layers["conv"].kept == 16 and result.layers["conv"].status == "unprunable"
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    with torch.no_grad():
        assert pruned(x).shape == (4, 4)


def test_create_refuses_a_hand_written_config_that_would_change_the_result(tmp_path) -> None:
    (tmp_path / "prune.cfg").write_text("""
override_layer_configs {
  layer_name: "conv"
  prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 ascend_optimized: false } } }
}
""")
    with pytest.raises(GraphError, match="changes what the model computes"):
        acps.create_prune_retrain_model(CountsChannels().eval(), torch.randn(2, 3, 8, 8), tmp_path / "prune.cfg",
                                        tmp_path / "prune.record")
    assert not (tmp_path / "prune.record").exists()


def test_transformer_encoder_layer_heads_prune_and_run_on_the_fused_path(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0),
                          nn.Flatten(), nn.Linear(32 * 5, 3)).eval()
    x = torch.randn(4, 5, 6)
    graph = build_channel_graph(model, x)
    verify_groups(model, graph, x)
    heads = graph.group(graph.layers["1.self_attn"].out_group)
    assert heads.prunable and heads.unit == 8
    pruned = copy.deepcopy(model)
    acps.prune.prune_channels(pruned, graph, {heads.id: list(range(16))})
    with torch.no_grad():  # eval + no_grad is where TransformerEncoderLayer takes its fused kernel
        assert pruned(x).shape == (4, 3)
    assert pruned[1].self_attn.num_heads == 2


def test_create_accepts_keyword_inputs(tmp_path) -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)
            self.fc = nn.Linear(16, 2)

        def forward(self, *, image):
            return self.fc(self.conv(image).mean((2, 3)))

    (tmp_path / "prune.cfg").write_text(
        "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 "
        "ascend_optimized: false } } }\nregular_prune_skip_layers: \"fc\"\n")
    pruned = acps.create_prune_retrain_model(Keyword().eval(), {"image": torch.randn(2, 3, 8, 8)},
                                             tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert pruned.conv.out_channels == 8
