"""The prune step: create from a config, restore from a record, export to ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from torch import nn

import acps_core as acps
from acps_core.config.selection import selection_path
from acps_core.errors import ConfigError, DataError
from acps_core.proto import scale_offset_record_pb2
from acps_core.prune.calls import create_prune_retrain_model, read_record, restore_prune_retrain_model
from acps_core.prune.onnx import save_prune_retrain_model
from testing.models import ConvChain, assert_pruned_matches_search, randomize_norms
from tests.support.model_snapshot import ModelSnapshot


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(ConvChain(size=8)).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def searched(tmp_path: Path, model: nn.Module, x: torch.Tensor, ratio: float = 2.0) -> tuple[Path, acps.SearchResult]:
    config = tmp_path / "search.cfg"
    config.write_text(f"compress_ratio: {ratio}\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(model, str(config), [x, torch.randint(0, 10, (6,))],
                                            str(tmp_path / "prune.cfg"))
    return tmp_path / "prune.cfg", result


def test_pruned_model_computes_what_the_masked_model_computes(tmp_path, model, x) -> None:
    config, result = searched(tmp_path, model, x)
    pruned = create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    assert_pruned_matches_search(model, pruned, x, result)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_the_users_model_is_not_modified(tmp_path, model, x) -> None:
    config, _ = searched(tmp_path, model, x)
    snapshot = ModelSnapshot.take(model)
    create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    snapshot.assert_same(model)


def test_removes_exactly_the_channels_the_search_chose(tmp_path, model, x) -> None:
    config, result = searched(tmp_path, model, x)
    create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    removed = read_record(tmp_path / "prune.record")
    for name, kept in result.kept_channels.items():
        assert sorted(removed[name] + kept) == list(range(result.layers[name].total))
        assert not set(removed[name]) & set(kept)


def test_a_selection_with_the_older_fingerprint_is_compared_in_its_own_kind(tmp_path, model, x) -> None:
    import warnings

    from acps_core.config.selection import FINGERPRINT_LINE, weights_fingerprint

    config, _ = searched(tmp_path, model, x)
    selection = selection_path(config)
    text = selection.read_text()
    current = weights_fingerprint(model)
    older = weights_fingerprint(model, like="0123456789abcdef")  # 32-bit sums, as files written earlier hold
    assert current.startswith("2-") and f"{FINGERPRINT_LINE}{current}" in text
    assert older != current.removeprefix("2-") and len(older) == 16
    selection.write_text(text.replace(current, older))
    with warnings.catch_warnings():
        warnings.simplefilter("error", acps.WeightsChangedWarning)
        create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] += 1.0  # other weights: both kinds notice
    with pytest.warns(acps.WeightsChangedWarning, match=f"says {older}"):
        create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    selection.write_text(text)
    with pytest.warns(acps.WeightsChangedWarning, match=f"says {current}"):
        create_prune_retrain_model(model, x, config, tmp_path / "prune.record")


def test_without_a_selection_file_picks_the_largest_filter_norms(tmp_path, model, x) -> None:
    config, result = searched(tmp_path, model, x)
    selection_path(config).unlink()
    create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    removed = read_record(tmp_path / "prune.record")
    norms = model.conv2.weight.detach().flatten(1).norm(dim=1)
    kept = sorted(set(range(64)) - set(removed["conv2"]))
    assert len(kept) == result.layers["conv2"].kept
    assert sorted(torch.topk(norms, len(kept)).indices.tolist()) == kept


def test_an_edited_ratio_falls_back_to_filter_norms_with_the_new_count(tmp_path, model, x) -> None:
    config = tmp_path / "prune.cfg"
    config.write_text("""
override_layer_configs {
  layer_name: "conv2"
  prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.25 ascend_optimized: false } } }
}
""")
    pruned = create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    assert pruned.conv2.out_channels == 48 and pruned.bn2.num_features == 48 and pruned.conv3.in_channels == 48
    assert pruned.conv1.out_channels == 32


def test_reference_ascend_rounding_keeps_multiples_of_16(tmp_path, model, x) -> None:
    config = tmp_path / "prune.cfg"
    config.write_text("""
prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: true } } }
regular_prune_skip_layers: "fc2"
""")
    pruned = create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    # 64 * 0.7 = 44.8 -> 45 -> rounded up to 48; 32 * 0.7 = 22.4 -> 22 -> 32 (nothing pruned)
    assert pruned.conv2.out_channels == 48 and pruned.conv1.out_channels == 32
    assert pruned.fc1.out_features == 48 and pruned.fc2.out_features == 10


def test_record_is_the_reference_format_with_consumer_ranges(tmp_path, model, x) -> None:
    config, _ = searched(tmp_path, model, x)
    create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    record = text_format.Parse((tmp_path / "prune.record").read_text(), scale_offset_record_pb2.ScaleOffsetRecord())
    fc1 = [node for prune in record.prune_record for node in prune.consumer if node.name == "fc1"]
    attrs = {a.name: a for a in fc1[0].attr}
    assert attrs["type"].s == b"Gemm" and attrs["begin"].i == 0 and attrs["end"].i == 64 * 16
    assert len(attrs["prune_index"].ints) % 16 == 0


def test_restore_replays_the_record_and_loads_the_fine_tuned_weights(tmp_path, model, x) -> None:
    config, _ = searched(tmp_path, model, x)
    pruned = create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    with torch.no_grad():  # stands in for fine-tuning
        for param in pruned.parameters():
            param.add_(0.01)
    torch.save({"model": pruned.state_dict(), "epoch": 3}, tmp_path / "tuned.pth")
    fresh = ConvChain(size=8).eval()
    restored = restore_prune_retrain_model(fresh, x, tmp_path / "prune.record", config, tmp_path / "tuned.pth",
                                           state_dict_name="model")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), pruned(x))
    assert fresh.conv2.out_channels == 64  # the fresh model itself is left alone


def test_restore_onto_another_architecture_is_a_config_error(tmp_path, model, x) -> None:
    config, _ = searched(tmp_path, model, x)
    create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 36, 10))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="no channel group"):
        restore_prune_retrain_model(other, x, tmp_path / "prune.record", config, tmp_path / "other.pth")


def test_restore_with_a_checkpoint_of_other_shapes_is_a_data_error(tmp_path, model, x) -> None:
    config, _ = searched(tmp_path, model, x)
    create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    torch.save(model.state_dict(), tmp_path / "unpruned.pth")
    with pytest.raises(DataError, match="does not fit the pruned model"):
        restore_prune_retrain_model(ConvChain(size=8), x, tmp_path / "prune.record", config, tmp_path / "unpruned.pth")


class Payload:
    """An arbitrary object: unpickling it would run code; weights_only loading refuses it."""


def test_restore_never_unpickles_arbitrary_objects(tmp_path, model, x) -> None:
    config, _ = searched(tmp_path, model, x)
    create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    torch.save({"state": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(DataError, match="not loaded because unpickling them could run code"):
        restore_prune_retrain_model(ConvChain(size=8), x, tmp_path / "prune.record", config, tmp_path / "evil.pth")


def test_coupled_producers_with_different_ratios_are_a_config_error(tmp_path, x) -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 16, 1)
            self.b = nn.Conv2d(3, 16, 1)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, inp):
            return self.head(self.a(inp) + self.b(inp)).mean((2, 3))

    config = tmp_path / "prune.cfg"
    config.write_text("""
override_layer_configs { layer_name: "a" prune_config { filter_pruner { balanced_l2_norm_filter_prune {
  prune_ratio: 0.5 ascend_optimized: false } } } }
override_layer_configs { layer_name: "b" prune_config { filter_pruner { balanced_l2_norm_filter_prune {
  prune_ratio: 0.25 ascend_optimized: false } } } }
""")
    with pytest.raises(ConfigError, match="a keeps 8, b keeps 12"):
        create_prune_retrain_model(Residual(), x, config, tmp_path / "prune.record")


def test_export_to_onnx_runs_in_onnxruntime_with_the_same_outputs(tmp_path, model, x) -> None:
    import onnxruntime

    config, _ = searched(tmp_path, model, x)
    pruned = create_prune_retrain_model(model, x, config, tmp_path / "prune.record")
    path = save_prune_retrain_model(pruned, tmp_path / "pruned", x, input_names=["x"], output_names=["y"],
                                    dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    assert path == tmp_path / "pruned.onnx"
    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, pruned(x).numpy(), rtol=1e-4, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
