"""The battery for silently wrong results: a config or record that does not fit the model is an error naming what
does not fit, and a wrapped model (DataParallel, DistributedDataParallel, torch.compile) is searched and pruned
through the module inside, so no config ever names a layer that no plain model has."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core._util.checkpoints import load_weights
from acps_core.errors import ConfigError, DataError
from acps_core.prune.calls import read_record
from tests.support.model_snapshot import ModelSnapshot
from tests.support.write_worker import data, model


def search(folder: Path, net: nn.Module, name: str = "prune.cfg") -> acps.SearchResult:
    (folder / "search.cfg").write_text("compress_ratio: 1.6\nascend_optimized: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acps.auto_channel_prune_search(net, str(folder / "search.cfg"), data(), str(folder / name),
                                              sensitivity="GroupMagnitudeSensitivity", search_alg="GlobalRankSearch")


def create(folder: Path, net: nn.Module, config: str = "prune.cfg") -> nn.Module:
    return acps.create_prune_retrain_model(net, data()[0][:2], folder / config, folder / "p.record")


def _write(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder / name


CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "a layer the model does not have": (
        'override_layer_configs { layer_name: "conv3" prune_config { filter_pruner { balanced_l2_norm_filter_prune '
        "{ prune_ratio: 0.5 } } } }\n",
        ('bad.cfg:1: override_layer_configs names layer "conv3"', "did you mean 'conv2' or 'conv1'")),
    "a skipped layer the model does not have": (
        'regular_prune_skip_layers: "features.0"\nprune_config { filter_pruner { balanced_l2_norm_filter_prune '
        "{ prune_ratio: 0.3 } } }\n",
        ('bad.cfg:1: regular_prune_skip_layers names layer "features.0"', "model.named_modules() names")),
    "names written for nn.DataParallel": (
        'override_layer_configs { layer_name: "module.conv1" prune_config { filter_pruner { '
        "balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } } }\n",
        ('names layer "module.conv1"', "written for the model wrapped in nn.DataParallel",
         "this model calls it 'conv1'")),
    "names written for torch.compile": (
        'regular_prune_skip_layers: "_orig_mod.conv2"\n',
        ('names layer "_orig_mod.conv2"', "wrapped in torch.compile")),
    "a type the model does not have": (
        'override_layer_types { layer_type: "Conv3d" prune_config { filter_pruner { '
        "balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } } }\n",
        ('names layer type "Conv3d"', "types present: Conv2d, Linear")),
    "a ratio for the output layer, which cannot be pruned": (
        'override_layer_configs { layer_name: "fc" prune_config { filter_pruner { balanced_l2_norm_filter_prune '
        "{ prune_ratio: 0.5 } } } }\n",
        ('override_layer_configs entry for "fc": this layer cannot be pruned', "move the layer to skip_layers")),
    "several problems at once": (
        'regular_prune_skip_layers: "a"\nregular_prune_skip_layers: "b"\n',
        ('names layer "a"', 'also: line 2: regular_prune_skip_layers names layer "b"')),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_config_that_does_not_fit_the_model_is_an_error_not_a_silent_prune(tmp_path: Path, name: str) -> None:
    text, words = CONFIGS[name]
    _write(tmp_path, "bad.cfg", text)
    net = model()
    snapshot = ModelSnapshot.take(net)
    with pytest.raises(ConfigError) as info:
        create(tmp_path, net, "bad.cfg")
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    snapshot.assert_same(net)
    assert not (tmp_path / "p.record").exists()


def test_the_dataparallel_case_end_to_end_is_refused_not_pruned_through_the_global_ratio(tmp_path: Path) -> None:
    """Before: a config whose names were module.* applied to the plain model pruned layers the search skipped."""
    result = search(tmp_path, model())
    text = (tmp_path / "prune.cfg").read_text()
    assert result.layers["conv1"].kept < 16 or result.layers["conv2"].kept < 24
    # what an older version wrote for nn.DataParallel(model): every name with the prefix
    for layer in ("conv1", "conv2", "bn", "fc"):
        text = text.replace(f'"{layer}"', f'"module.{layer}"')
    _write(tmp_path, "dp.cfg", text)
    with pytest.raises(ConfigError, match=r"written for the model wrapped in nn\.DataParallel"):
        create(tmp_path, model(), "dp.cfg")


WRAPPERS: dict[str, Any] = {
    "nn.DataParallel": lambda net: nn.DataParallel(net),
    "torch.compile": lambda net: torch.compile(net),
    "torch.compile of nn.DataParallel": lambda net: torch.compile(nn.DataParallel(net)),
}


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_a_wrapped_model_is_searched_and_pruned_under_its_own_names(tmp_path: Path, name: str) -> None:
    plain = search(tmp_path, model(), "plain.cfg")
    wrapped_model = WRAPPERS[name](model())
    wrapped = search(tmp_path, wrapped_model, "wrapped.cfg")
    assert wrapped.kept_channels == plain.kept_channels
    assert set(wrapped.layers) == set(plain.layers) == {"conv1", "conv2", "fc"}
    assert "acps worked on the module inside" in wrapped.notes[0]
    assert name.split(" of ")[0].removeprefix("nn.") in wrapped.notes[0]
    config = (tmp_path / "wrapped.cfg").read_text()
    assert "module." not in config and "_orig_mod" not in config
    # the config fits the plain model, and pruning the wrapped model gives the plain module, pruned alike
    pruned_plain = create(tmp_path, model(), "wrapped.cfg")
    pruned_wrapped = create(tmp_path, WRAPPERS[name](model()), "wrapped.cfg")
    assert type(pruned_wrapped) is type(pruned_plain)
    x = data()[0]
    with torch.no_grad():
        torch.testing.assert_close(pruned_wrapped(x), pruned_plain(x))


def test_distributed_data_parallel_is_unwrapped_too(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model())
        result = search(tmp_path, ddp)
        assert set(result.layers) == {"conv1", "conv2", "fc"}
        assert "DistributedDataParallel" in result.notes[0]
        pruned = create(tmp_path, ddp)
        assert isinstance(pruned, nn.Module) and not isinstance(pruned, nn.parallel.DistributedDataParallel)
    finally:
        dist.destroy_process_group()


RECORDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "an index beyond the layer's channels": ("[0, 99]", ("removes channel 99 of layer \"conv2\"", "only 24")),
    "a negative index": ("[-1, 3]", ("negative channel index -1",)),
    "a repeated index": ("[3, 3, 4]", ("repeated channel indices [3]",)),
    "every channel": (str(list(range(24))), ("removes all 24 output channels",)),
}


def _record(folder: Path, indices: str) -> Path:
    return _write(folder, "bad.record", '# a record\nprune_record {\n  producer { name: "conv2" attr { name: '
                                        f'"prune_index" type: INTS ints: {indices} }} }}\n}}\n')


@pytest.mark.parametrize("name", list(RECORDS))
def test_a_record_with_indices_that_do_not_fit_is_an_error(tmp_path: Path, name: str) -> None:
    indices, words = RECORDS[name]
    search(tmp_path, model())
    record = _record(tmp_path, indices)
    with pytest.raises(ConfigError) as info:
        acps.prune.replay_prune_record(model(), data()[0][:2], record)
    assert "bad.record" in str(info.value)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


@pytest.mark.parametrize("name", list(RECORDS))
def test_a_selection_file_with_indices_that_do_not_fit_is_an_error(tmp_path: Path, name: str) -> None:
    indices, words = RECORDS[name]
    search(tmp_path, model())
    selection = tmp_path / "prune.cfg.selection"
    header = "".join(line + "\n" for line in selection.read_text().splitlines() if line.startswith("#"))
    selection.write_text(header + '\nprune_record {\n  producer { name: "conv2" attr { name: "prune_index" type: '
                         f"INTS ints: {indices} }} }}\n}}\n")
    with pytest.raises(ConfigError) as info:
        create(tmp_path, model())
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_a_record_listing_one_layer_twice_with_other_indices_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, "twice.record", 'prune_record { producer { name: "conv2" attr { name: "prune_index" type: INTS '
                                     'ints: [1] } } }\nprune_record { producer { name: "conv2" attr { name: '
                                     '"prune_index" type: INTS ints: [2] } } }\n')
    with pytest.raises(ConfigError, match=r"twice\.record:1: .*a second, different prune_index list"):
        read_record(tmp_path / "twice.record")


def test_weights_saved_from_a_wrapped_model_load_into_the_plain_one(tmp_path: Path) -> None:
    trained = model()
    with torch.no_grad():
        trained.conv1.weight.add_(1.0)
    torch.save(nn.DataParallel(trained).state_dict(), tmp_path / "dp.pth")
    torch.save({"epoch": 3, "state_dict": torch.compile(trained).state_dict()}, tmp_path / "compiled.pth")
    for name in ("dp.pth", "compiled.pth"):
        fresh = model()
        load_weights(fresh, tmp_path / name, "--weights")
        assert torch.equal(fresh.conv1.weight, trained.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match=r"other\.pth' does not fit the model \(conv1\.weight: file \(1,\) vs "):
        load_weights(model(), tmp_path / "other.pth", "--weights")
