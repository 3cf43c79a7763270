"""The public call end to end on plain chains: the config it writes, the target it reaches, what it leaves alone."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from google.protobuf import text_format
from torch import nn

import acps_core as acps
from acps_core.config.prune_config import parse_prune_config
from acps_core.config.selection import selection_path
from acps_core.errors import ArgumentError, ConfigError, DataError, GraphError, OutputPathError, PluginError
from acps_core.proto import retrain_config_pb2, scale_offset_record_pb2
from testing.models import ConvChain, pooled_chain, randomize_norms
from tests.support.model_snapshot import ModelSnapshot


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def chain() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(ConvChain(size=8))


@pytest.fixture
def data() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)]


def search(tmp_path: Path, model: nn.Module, data, config: str, **kwargs) -> acps.SearchResult:
    cfg = write(tmp_path / "search.cfg", config)
    return acps.auto_channel_prune_search(model, str(cfg), data, str(tmp_path / "prune.cfg"), **kwargs)


def test_writes_a_config_the_schema_parses_with_one_entry_per_pruned_layer(tmp_path, chain, data) -> None:
    result = search(tmp_path, chain, data, "compress_ratio: 2\nascend_optimized: true\n")
    parsed = text_format.Parse((tmp_path / "prune.cfg").read_text(), retrain_config_pb2.AMCTRetrainConfig())
    ratios = {e.layer_name: e.prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio
              for e in parsed.override_layer_configs}
    pruned = {name for name, layer in result.layers.items() if layer.kept < layer.total}
    assert pruned and set(ratios) == pruned
    for name, ratio in ratios.items():
        layer = result.layers[name]
        assert ratio == pytest.approx(1 - layer.kept / layer.total, abs=1e-6)
        assert layer.kept % 16 == 0
    # Everything else is listed as skipped, so the placeholder global ratio never applies.
    assert set(parsed.regular_prune_skip_layers) == set(result.layers) - pruned
    assert parsed.prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio == pytest.approx(0.3)


@pytest.mark.parametrize("ratio", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("aligned", [True, False])
def test_lands_on_the_target_within_one_alignment_step(tmp_path, chain, data, ratio, aligned) -> None:
    result = search(tmp_path, chain, data, f"compress_ratio: {ratio}\nascend_optimized: {str(aligned).lower()}\n")
    assert result.target_reached
    assert result.cost_after <= result.cost_before / ratio
    # Undoing one step (16 channels when aligned, 1 otherwise) of any one pruned group must exceed the budget:
    # otherwise the search removed more than it had to.
    from acps_core.graph.build import build_channel_graph
    from acps_core.search.problem import CostModel
    from acps_gain_ascend import BitComplexity

    graph = build_channel_graph(chain.eval(), data[0])
    cost_model = CostModel(graph, BitComplexity())
    ids = {g.name: g.id for g in graph.groups}
    kept = {ids[name]: len(idx) for name, idx in result.kept_channels.items()}
    assert cost_model.cost(kept) == pytest.approx(result.cost_after)
    step = 16 if aligned else 1
    budget = result.cost_before / ratio
    for group_id, count in kept.items():
        grown = dict(kept)
        grown[group_id] = min(count + step, graph.group(group_id).channels)
        assert cost_model.cost(grown) > budget


def test_model_is_left_exactly_as_found(tmp_path, chain, data) -> None:
    chain.train()
    chain.conv1.weight.requires_grad_(False)
    chain.fc1.weight.grad = torch.ones_like(chain.fc1.weight)
    chain.conv2.register_forward_hook(lambda *args: None)
    snapshot = ModelSnapshot.take(chain)
    search(tmp_path, chain, data, "compress_ratio: 2\n")
    snapshot.assert_same(chain)


def test_model_is_left_exactly_as_found_when_the_call_fails(tmp_path, chain, data) -> None:
    chain.fc2.weight.grad = torch.zeros_like(chain.fc2.weight)
    snapshot = ModelSnapshot.take(chain)

    class Failing(acps.SensitivityBase):
        def get_sensitivity(self, search_records):
            self.model.train()
            self.model(self.input_data[0]).sum().backward()  # BatchNorm statistics and .grad change
            with torch.no_grad():
                self.model.conv1.weight.mul_(0)
            self.model.conv2.bias = nn.Parameter(torch.zeros(64))
            raise RuntimeError("plugin bug")

    with pytest.raises(PluginError, match="plugin bug"):
        search(tmp_path, chain, data, "compress_ratio: 2\n", sensitivity=Failing())
    snapshot.assert_same(chain)
    assert not (tmp_path / "prune.cfg").exists()


def test_selection_file_holds_the_channels_the_search_removed(tmp_path, chain, data) -> None:
    result = search(tmp_path, chain, data, "compress_ratio: 2\nascend_optimized: false\n")
    record = text_format.Parse(selection_path(tmp_path / "prune.cfg").read_text(),
                               scale_offset_record_pb2.ScaleOffsetRecord())
    removed = {}
    for prune in record.prune_record:
        for producer in prune.producer:
            attrs = {a.name: a for a in producer.attr}
            removed[producer.name] = list(attrs["prune_index"].ints)
    assert set(removed) == set(result.kept_channels)
    for name, kept in result.kept_channels.items():
        total = result.layers[name].total
        assert sorted(removed[name] + kept) == list(range(total))
    assert "prune.cfg.selection" in (tmp_path / "prune.cfg").read_text().splitlines()[1]


def test_search_prefers_removing_channels_the_loss_does_not_use(tmp_path, data) -> None:
    torch.manual_seed(0)
    model = pooled_chain(width=32)
    with torch.no_grad():  # half of the first conv's channels are dead (all-zero filters and BN scale)
        model[0].weight[16:] = 0
        model[0].bias[16:] = 0
        model[1].weight[16:] = 0
        model[1].bias[16:] = 0
    x = torch.randn(16, 3, 12, 12)
    result = search(tmp_path, model, [x, torch.randint(0, 10, (16,))],
                    "compress_ratio: 1.3\nascend_optimized: false\n")
    removed = set(range(32)) - set(result.kept_channels.get("0", range(32)))
    assert removed and removed <= set(range(16, 32))


def test_test_iteration_above_one_runs_and_splits_the_batch(tmp_path, chain, data) -> None:
    seen = []

    class Recording(acps.SensitivityBase):
        def get_sensitivity(self, search_records):
            seen.extend((data.shape[0], label.shape[0]) for data, label in self.calibration_batches())
            for record in search_records:
                record.sensitivity = torch.ones(record.channels)

    search(tmp_path, chain, data, "compress_ratio: 2\ntest_iteration: 3\n", sensitivity=Recording())
    assert seen == [(5, 5), (6, 6), (5, 5)]  # 16 samples in 3 consecutive passes
    result = search(tmp_path, chain, data, "compress_ratio: 2\ntest_iteration: 4\n")
    assert result.target_reached


def test_labels_equal_to_outputs_fall_back_to_a_label_free_score_and_say_so(tmp_path, chain, data) -> None:
    with torch.no_grad():
        labels = chain.eval()(data[0])
    result = search(tmp_path, chain, [data[0], labels], "compress_ratio: 2\nascend_optimized: false\n")
    assert any("label-free" in note for note in result.notes)
    assert result.target_reached


def test_random_labels_as_in_the_reference_example_are_noticed(tmp_path, chain, data) -> None:
    result = search(tmp_path, chain, [data[0], torch.randn(16, 10)], "compress_ratio: 1.5\n")
    assert result.target_reached
    assert any("look unrelated" in note and "label-free" in note for note in result.notes)


def test_output_shaped_labels_that_follow_the_outputs_use_the_l1_loss(tmp_path, chain, data) -> None:
    with torch.no_grad():
        targets = chain.eval()(data[0]) + 0.3 * torch.randn(16, 10, generator=torch.Generator().manual_seed(2))
    result = search(tmp_path, chain, [data[0], targets], "compress_ratio: 1.5\n")
    assert result.target_reached and not result.notes


def test_override_layers_keep_the_users_settings(tmp_path, chain, data) -> None:
    override = write(tmp_path / "override.cfg", """
override_layer_configs {
  layer_name: "conv2"
  prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 ascend_optimized: false } } }
}
skip_layers: "conv1"
""")
    result = search(tmp_path, chain, data,
                    f"compress_ratio: 2\nascend_optimized: false\noverride_prune_cfg: '{override.name}'\n")
    assert result.layers["conv1"].kept == 32 and result.layers["conv1"].status == "skip"
    assert result.layers["conv2"].kept == 32 and result.layers["conv2"].status == "override"
    cfg = parse_prune_config(tmp_path / "prune.cfg")
    assert list(cfg.skip_layers) == ["conv1"]
    names = [e.layer_name for e in cfg.override_layer_configs]
    assert names.count("conv2") == 1
    assert "conv1" not in names
    assert result.target_reached


def test_override_naming_a_missing_layer_is_a_config_error(tmp_path, chain, data) -> None:
    override = write(tmp_path / "override.cfg", 'skip_layers: "conv9"\n')
    with pytest.raises(ConfigError, match="conv9"):
        search(tmp_path, chain, data, f"compress_ratio: 2\noverride_prune_cfg: '{override}'\n")


def test_override_for_an_unprunable_layer_is_a_config_error(tmp_path, chain, data) -> None:
    override = write(tmp_path / "override.cfg", """
override_layer_configs {
  layer_name: "fc2"
  prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } }
}
""")
    with pytest.raises(ConfigError, match=r"fc2.*output"):
        search(tmp_path, chain, data, f"compress_ratio: 2\noverride_prune_cfg: '{override}'\n")


def test_search_space_emptied_by_overrides_is_a_config_error(tmp_path, chain, data) -> None:
    override = write(tmp_path / "override.cfg", 'skip_layer_types: "Conv2d"\nskip_layer_types: "Linear"\n')
    with pytest.raises(ConfigError, match="search space is empty"):
        search(tmp_path, chain, data, f"compress_ratio: 2\noverride_prune_cfg: '{override}'\n")


def test_search_space_empty_because_layers_are_too_small_to_align(tmp_path, data) -> None:
    model = pooled_chain(width=16)  # every group has 16 channels: no 16-channel step can be removed
    with pytest.raises(ConfigError, match="ascend_optimized: false"):
        search(tmp_path, model, [torch.randn(4, 3, 12, 12), torch.randn(4, 10)], "compress_ratio: 2\n")


def test_model_without_prunable_layer_is_a_graph_error(tmp_path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(GraphError, match=r"no prunable channel group.*model's output"):
        search(tmp_path, model, [torch.randn(4, 3, 2, 2), torch.randn(4, 3)], "compress_ratio: 2\n")


def test_unreachable_target_warns_and_says_so(tmp_path, chain, data) -> None:
    with pytest.warns(acps.PruneTargetWarning, match="cannot be reached"):
        result = search(tmp_path, chain, data, "compress_ratio: 50\nmax_prune_ratio: 0.5\n")
    assert not result.target_reached
    assert (tmp_path / "prune.cfg").exists()


@pytest.mark.parametrize(("labels", "words"), [
    (torch.randn(16, 7), "label shape [16, 7] does not fit the model output shape [16, 10]"),
    (torch.full((16,), 12), "outside [0, 10)"),
])
def test_labels_that_do_not_fit_the_output_are_a_data_error(tmp_path, chain, data, labels, words) -> None:
    with pytest.raises(DataError) as info:
        search(tmp_path, chain, [data[0], labels], "compress_ratio: 2\n")
    assert words in str(info.value)


@pytest.mark.parametrize(("input_data", "words"), [
    (torch.randn(4, 3, 8, 8), "must be a list [data, label]"),
    ([torch.randn(4, 3, 8, 8)], "of length 1"),
    ([torch.randn(4, 3, 8, 8), torch.randn(3, 10)], "same batch size"),
    ([torch.full((4, 3, 8, 8), float("nan")), torch.randn(4, 10)], "NaN or Inf"),
    ([torch.randn(0, 3, 8, 8), torch.randn(0, 10)], "empty"),
    (["images", torch.randn(4, 10)], "must be a tensor"),
])
def test_bad_input_data_is_a_data_error(tmp_path, chain, input_data, words) -> None:
    with pytest.raises(DataError) as info:
        search(tmp_path, chain, input_data, "compress_ratio: 2\n")
    assert words in str(info.value)


def test_fewer_samples_than_passes_is_a_data_error(tmp_path, chain) -> None:
    with pytest.raises(DataError, match="test_iteration is 8 but input_data holds only 4 samples"):
        search(tmp_path, chain, [torch.randn(4, 3, 8, 8), torch.randn(4, 10)], "compress_ratio: 2\ntest_iteration: 8\n")


def test_wrong_argument_types_name_the_parameter(tmp_path, chain, data) -> None:
    with pytest.raises(ArgumentError, match=r"model must be a torch\.nn\.Module"):
        search(tmp_path, "not a model", data, "compress_ratio: 2\n")
    with pytest.raises(TypeError, match="search_alg"):
        search(tmp_path, chain, data, "compress_ratio: 2\n", search_alg=42)
    with pytest.raises(PluginError, match="TaylorLossSensitivity"):
        search(tmp_path, chain, data, "compress_ratio: 2\n", sensitivity="NoSuchMethod")


def test_output_path_that_is_a_directory_fails_before_any_work(tmp_path, chain, data) -> None:
    cfg = write(tmp_path / "search.cfg", "compress_ratio: 2\n")
    with pytest.raises(OutputPathError, match="output_cfg"):
        acps.auto_channel_prune_search(chain, str(cfg), data, str(tmp_path))


def test_bad_sensitivity_scores_are_a_plugin_error_naming_the_method(tmp_path, chain, data) -> None:
    class NaNScores(acps.SensitivityBase):
        def get_sensitivity(self, search_records):
            for record in search_records:
                record.sensitivity = torch.full((record.channels,), float("nan"))

    class WrongLength(acps.SensitivityBase):
        def get_sensitivity(self, search_records):
            for record in search_records:
                record.sensitivity = torch.ones(3)

    with pytest.raises(PluginError, match="NaNScores gave NaN"):
        search(tmp_path, chain, data, "compress_ratio: 2\n", sensitivity=NaNScores())
    with pytest.raises(PluginError, match="WrongLength gave 3 scores"):
        search(tmp_path, chain, data, "compress_ratio: 2\n", sensitivity=WrongLength())


def test_search_returning_unaligned_or_uncoupled_masks_is_rejected(tmp_path, chain, data) -> None:
    class Unaligned(acps.SearchChannelBase):
        def channel_prune_search(self, graph_info, search_records, prune_config):
            record = search_records[0]
            return {record.producers[0]: [1] * (record.channels - 3) + [0] * 3}

    with pytest.raises(acps.SearchError, match="allowed counts"):
        search(tmp_path, chain, data, "compress_ratio: 2\nascend_optimized: true\n", search_alg=Unaligned())


def test_reference_style_search_class_sees_reference_shaped_arguments(tmp_path, chain, data) -> None:
    seen = {}

    class ReferenceStyle(acps.SearchChannelBase):
        def channel_prune_search(self, graph_info, search_records, prune_config):
            compress_ratio, _ascend_optimized, _max_prune_ratio = prune_config
            seen.update(ratio=compress_ratio, layer=dict(graph_info["conv2"]), n=len(search_records))
            record = search_records[0]
            return {p: [1] * 16 + [0] * (record.channels - 16) for p in record.producers}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = search(tmp_path, chain, data, "compress_ratio: 1.1\n", search_alg=ReferenceStyle())
    assert seen["ratio"] == pytest.approx(1.1)
    assert set(seen["layer"]) == {"cin", "cout", "ori_cout", "bitops"}
    assert seen["layer"]["ori_cout"] == 64
    assert result.layers["conv1"].kept == 16


def test_methods_that_do_not_use_the_default_loss_accept_any_labels(tmp_path, chain, data) -> None:
    class FilterNorm(acps.SensitivityBase):
        def get_sensitivity(self, search_records):
            for record in search_records:
                weight = self.model.get_submodule(record.producers[0]).weight
                record.sensitivity = weight.detach().abs().flatten(1).sum(dim=1)

    result = search(tmp_path, chain, [data[0], torch.zeros(16, 3)], "compress_ratio: 1.5\n", sensitivity=FilterNorm())
    assert result.target_reached


def test_reports_beside_the_config_explain_every_layer(tmp_path, chain, data) -> None:
    import json

    result = search(tmp_path, chain, data, "compress_ratio: 2\n")
    report = json.loads((tmp_path / "prune.cfg.report.json").read_text())
    by_name = {layer["name"]: layer for layer in report["layers"]}
    assert set(by_name) == set(result.layers)
    assert "model's output" in by_name["fc2"]["reason"]
    markdown = (tmp_path / "prune.cfg.report.md").read_text()
    assert all(name in markdown for name in result.layers)


def test_a_dataloader_gives_one_batch_per_pass(tmp_path, chain) -> None:
    seen = []

    class Recording(acps.SensitivityBase):
        def get_sensitivity(self, search_records):
            seen.extend(data.shape[0] for data, _ in self.calibration_batches())
            for record in search_records:
                record.sensitivity = torch.ones(record.channels)

    generator = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(20, 3, 8, 8, generator=generator),
                                             torch.randint(0, 10, (20,), generator=generator))
    loader = torch.utils.data.DataLoader(dataset, batch_size=6)
    search(tmp_path, chain, loader, "compress_ratio: 2\ntest_iteration: 3\n", sensitivity=Recording())
    assert seen == [6, 6, 6]
    result = search(tmp_path, chain, loader, "compress_ratio: 2\ntest_iteration: 4\n")
    assert result.target_reached


def test_a_dataloader_with_too_few_batches_is_a_data_error(tmp_path, chain) -> None:
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    with pytest.raises(DataError, match="yields only 2 batches"):
        search(tmp_path, chain, loader, "compress_ratio: 2\ntest_iteration: 3\n")


class _DictOutput(nn.Module):
    """Returns what Hugging Face and detection models return: a dict (or tuple) holding the logits."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.fc(torch.relu(self.conv2(torch.relu(self.conv(x)))).mean((2, 3)))
        probabilities = logits.softmax(dim=1)
        if self.form == "dict":
            return {"probabilities": probabilities, "logits": logits}
        if self.form == "first tensor":
            return {"scores": logits, "probabilities": probabilities}
        if self.form == "tensor":
            return logits
        return (logits, probabilities)


@pytest.mark.parametrize(("form", "where"), [("dict", "its 'logits' entry"),
                                             ("first tensor", "its first tensor entry 'scores'"),
                                             ("tuple", "its first element")])
def test_a_model_returning_a_dict_or_tuple_searches_with_class_labels_and_says_what_it_scored(
        tmp_path: Path, form: str, where: str) -> None:
    torch.manual_seed(0)
    model = _DictOutput(form).eval()
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [images, labels],
                                            str(tmp_path / "prune.cfg"))
    assert result.target_reached
    assert any(where in note and "with the labels" in note for note in result.notes), result.notes
    # the decision is that of the cross-entropy of the logits, as for the model returning the logits alone
    plain = _DictOutput("tensor").eval()
    plain.load_state_dict(model.state_dict())
    reference = acps.auto_channel_prune_search(plain, str(tmp_path / "search.cfg"), [images, labels],
                                               str(tmp_path / "plain.cfg"))
    assert result.kept_channels == reference.kept_channels and not reference.notes
