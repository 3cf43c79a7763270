"""Every architecture of the zoo: the channel groups found, random pruning against masking, create -> restore, and
the search end to end.

The equivalence of the physically pruned model with the unpruned model whose removed channels are masked is the
check that catches a wrong coupling: a layer pruned with the wrong group, a follower sliced at the wrong offset,
a consumer reading the wrong columns. It runs in float64 so that any difference is a real one.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.graph.build import build_channel_graph
from acps_core.graph.masking import masked_channels
from acps_core.graph.model import ChannelGraph
from acps_core.prune.calls import read_record
from acps_core.prune.reconstruction import MIN_ROWS_PER_KEPT, reconstructible
from acps_core.prune.slicing import prune_channels
from testing.models import recalibrate_in_order
from testing.zoo import CASES, CLASSES, ZooCase, pruned_and_masked, random_keep
from tests.support.model_snapshot import ModelSnapshot

BATCH = 6

#: acps bugs this zoo has found and not yet fixed, by case and test (each a strict xfail, so it shows up as soon
#: as acps is fixed). The five it found first (shared weights, subclasses with their own forward, a width read from
#: x.shape, a parameter shared by two groups) are fixed.
KNOWN_BUGS: dict[str, dict[str, str]] = {}


def cases(test: str) -> list[object]:
    """The zoo's case names for ``pytest.mark.parametrize``, with the known bugs of ``test`` marked."""
    params: list[object] = []
    for name in CASES:
        reason = KNOWN_BUGS.get(name, {}).get(test)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The models are tiny: threads only add synchronisation (depthwise float64 convs slow down a hundredfold on
    a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def traced(name: str) -> tuple[ZooCase, nn.Module, torch.Tensor, ChannelGraph]:
    case = CASES[name]
    model = case.build()
    x = case.inputs(BATCH)
    return case, model, x, build_channel_graph(model, x)


def group_of(graph: ChannelGraph, producer: str):
    found = [g for g in graph.groups if producer in g.producers]
    assert len(found) == 1, f"{producer} produces {len(found)} groups"
    return found[0]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tied_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs of (module.param) names that are the same tensor."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}")
    return sorted((names[0], other) for names in owners.values() for other in names[1:])


# ----------------------------------------------------------------------------------------------------------------
# The groups found
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", cases("groups"))
def test_groups_found_are_the_expected_producer_sets(name) -> None:
    case, _, _, graph = traced(name)
    found = sorted(sorted(g.producers) for g in graph.groups)
    assert found == sorted(sorted(p) for p in case.groups)


@pytest.mark.parametrize("name", cases("prunable"))
def test_prunable_layers_and_the_reasons_for_the_others(name) -> None:
    case, _, _, graph = traced(name)
    explain = graph.explain()
    assert set(explain) == set(graph.layers)
    for layer, info in graph.layers.items():
        if layer in case.blocked:
            assert not info.prunable, f"{layer} should be left alone: {explain[layer]}"
            for word in case.blocked[layer]:
                assert word in explain[layer], f"{layer}: expected '{word}' in: {explain[layer]}"
        else:
            assert info.prunable, f"{layer} should be prunable: {explain[layer]}"
            assert explain[layer].startswith("prunable (group ")
    for group in graph.groups:
        expected = not set(group.producers) & set(case.blocked)
        assert group.prunable == expected, f"group {group.producers}: {group.reasons}"
    assert len(graph.prunable_groups) == case.prunable_groups
    assert case.prunable_groups > 0


@pytest.mark.parametrize("name", cases("structure"))
def test_units_blocks_and_alignment_of_the_prunable_groups(name) -> None:
    case, _, _, graph = traced(name)
    for group in graph.prunable_groups:
        units = {case.unit[p] for p in group.producers if p in case.unit} or {1}
        blocks = {case.blocks[p] for p in group.producers if p in case.blocks} or {1}
        aligned = {case.aligned[p] for p in group.producers if p in case.aligned} or {1}
        assert (group.unit, group.blocks, group.aligned) == (units.pop(), blocks.pop(), aligned.pop()), group.producers
        assert group.channels % group.atom == 0


@pytest.mark.parametrize("name", cases("uses"))
def test_followers_and_consumers_sit_where_expected(name) -> None:
    case, _, _, graph = traced(name)
    for producer, followers in case.followers.items():
        assert {u.layer for u in group_of(graph, producer).followers} == followers, producer
    for producer, consumers in case.consumers.items():
        found = {(u.layer, u.offset, u.block) for u in group_of(graph, producer).consumers}
        assert found == consumers, producer
    # A depthwise conv follows the group of its input: its output channels are that group's.
    for layer, info in graph.layers.items():
        if info.geometry is not None and info.geometry.depthwise and info.out_group is not None:
            assert layer in {u.layer for u in graph.group(info.out_group).followers}


def test_chunk_halves_are_consumed_at_their_own_ranges() -> None:
    _, _, _, graph = traced("csp_chunk")
    stem = group_of(graph, "stem.conv")
    spans = {u.layer: (u.start, u.stop) for u in stem.consumers}
    assert spans == {"part.conv": (4, 8), "fuse.conv": (0, 4)}


# ----------------------------------------------------------------------------------------------------------------
# Random pruning against masking
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", cases("equivalence"))
def test_pruned_model_computes_what_the_masked_model_computes(name, seed) -> None:
    _, model, x, graph = traced(name)
    keep = random_keep(graph, seed)
    assert keep, "every zoo model has something to prune"
    with torch.no_grad():
        original = model(x)
    out, expected, _ = pruned_and_masked(model, x, graph, keep)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The masking hooks are gone again.
    with torch.no_grad():
        torch.testing.assert_close(model(x), original, rtol=0, atol=0)


@pytest.mark.parametrize("name", cases("equivalence_one_group"))
def test_each_group_alone_prunes_to_what_masking_computes(name) -> None:
    """One group at a time: a wrong coupling cannot hide behind another group's removals."""
    _, model, x, graph = traced(name)
    keep = random_keep(graph, 7)
    for group_id, kept in keep.items():
        pruned = copy.deepcopy(model)
        prune_channels(pruned, graph, {group_id: kept})
        with masked_channels(model, graph, {group_id: kept}), torch.no_grad():
            expected = model(x)
        producers = graph.group(group_id).producers
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, p=producers: f"group {p}: {m}")


@pytest.mark.parametrize("name", cases("parameters"))
def test_pruning_lowers_the_parameter_count(name) -> None:
    _, model, _, graph = traced(name)
    pruned = copy.deepcopy(model)
    prune_channels(pruned, graph, random_keep(graph, 0))
    assert parameter_count(pruned) < parameter_count(model)


@pytest.mark.parametrize("name", cases("tied"))
def test_shared_parameters_stay_shared_after_pruning(name) -> None:
    _, model, _, graph = traced(name)
    tied = tied_parameters(model)
    pruned = copy.deepcopy(model)
    prune_channels(pruned, graph, random_keep(graph, 0))
    assert tied_parameters(pruned) == tied


# ----------------------------------------------------------------------------------------------------------------
# The search, create and restore
# ----------------------------------------------------------------------------------------------------------------

def labels_for(case: ZooCase, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    if case.output == "classes":
        return torch.randint(0, CLASSES, (x.shape[0],), generator=generator)
    with torch.no_grad():
        out = model(x)
    return out + 0.5 * torch.randn(out.shape, generator=generator, dtype=out.dtype)


def search(tmp_path: Path, case: ZooCase, model: nn.Module, x: torch.Tensor) -> acps.SearchResult:
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.3\nascend_optimized: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", acps.PruneTargetWarning)
        return acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, labels_for(case, model, x)],
                                              str(tmp_path / "prune.cfg"))


def out_channels(module: nn.Module) -> int:
    """A layer's output channels; for multi-head attention the width of its heads."""
    if isinstance(module, nn.MultiheadAttention) or isinstance(getattr(module, "head_dim", None), int):
        return int(module.num_heads * module.head_dim)
    return int(getattr(module, "out_features", getattr(module, "out_channels", -1)))


@pytest.mark.parametrize("name", cases("search"))
def test_search_then_create_then_restore(tmp_path, name) -> None:
    case, model, x, graph = traced(name)
    result = search(tmp_path, case, model, x)
    assert (tmp_path / "prune.cfg").is_file()
    assert set(result.layers) == set(graph.layers)
    for layer, report in result.layers.items():
        if not graph.layers[layer].prunable:
            assert report.kept == report.total, layer
    assert result.cost_after < result.cost_before, "the search removed nothing"

    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "prune.record")
    for layer, report in result.layers.items():
        if report.total and graph.layers[layer].geometry is not None and not graph.layers[layer].geometry.depthwise:
            assert out_channels(pruned.get_submodule(layer)) == report.kept, layer
    ids = {g.name: g.id for g in graph.groups}
    keep = {ids[group]: kept for group, kept in result.kept_channels.items()}
    with masked_channels(model, graph, keep), torch.no_grad():
        expected = model(x)
    with torch.no_grad():
        out = pruned(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    with torch.no_grad():  # stands in for fine-tuning
        for param in pruned.parameters():
            param.mul_(1.01)
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    fresh = case.build(seed=5)
    restored = acps.restore_prune_retrain_model(fresh, x, tmp_path / "prune.record", tmp_path / "prune.cfg",
                                                tmp_path / "tuned.pth")
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    assert {k: v.shape for k, v in restored.state_dict().items()} == shapes
    with torch.no_grad():
        torch.testing.assert_close(restored(x), pruned(x), rtol=0, atol=0)


WITH_BATCHNORM = [name for name, case in CASES.items()
                  if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in case.build().modules())]


@pytest.mark.parametrize("reconstruct", [False, True])
@pytest.mark.parametrize("name", WITH_BATCHNORM)
def test_corrected_norms_equal_a_recalibration_of_the_pruned_model(tmp_path, name, reconstruct) -> None:
    # With running statistics that are the batch's own, correcting them for the pruning on that batch must give
    # the pruned model's own statistics on it, norm by norm in forward order: whatever the architecture. With the
    # layers re-fitted in the same pass, each norm must see its input after the re-fits before it.
    case, model, x, _ = traced(name)
    recalibrate_in_order(model, x)
    search(tmp_path, case, model, x)
    corrected = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "a.record",
                                                calibration_data=x, reconstruct=reconstruct)
    if reconstruct:
        expected = recalibrate_in_order(copy.deepcopy(corrected), x)
    else:
        stale = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "b.record")
        expected = recalibrate_in_order(stale, x)
    assert expected, "no BatchNorm is called exactly once"
    norms = dict(corrected.named_modules())
    for norm_name, (mean, variance) in expected.items():
        torch.testing.assert_close(norms[norm_name].running_mean, mean, rtol=1e-5, atol=1e-5, msg=norm_name)
        torch.testing.assert_close(norms[norm_name].running_var, variance, rtol=1e-4, atol=1e-5, msg=norm_name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reconstruction_fits_every_refitted_layer_at_least_as_well_as_plain_pruning(tmp_path, name) -> None:
    # Whatever the architecture: the layers that read removed channels are re-fitted, the user's model is left
    # alone, and a re-fitted Linear or pointwise conv computes, from the pruned model's input, at least as close
    # to what it computed in the unpruned model as its plainly pruned weight does (the least-squares fit is
    # regularised towards plain pruning, so it can only gain on the calibration batch).
    case, model, x, graph = traced(name)
    search(tmp_path, case, model, x)
    snapshot = ModelSnapshot.take(model)
    refitted = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "a.record",
                                               calibration_data=x)
    plain = acps.create_prune_retrain_model(model, x, tmp_path / "prune.cfg", tmp_path / "b.record",
                                            calibration_data=x, reconstruct=False)
    snapshot.assert_same(model)
    plain_weights = dict(plain.named_parameters())
    changed = {n.rpartition(".")[0] for n, p in refitted.named_parameters() if not torch.equal(p, plain_weights[n])}
    changed -= {n for n, m in refitted.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    # Every Conv/Linear that lost inputs, except a MultiheadAttention's out projection (it is applied as a
    # function, never called as a module, so its input cannot be seen) and a layer called more than once (its
    # calls read different inputs).
    attention = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    lost_inputs = {n for n, m in model.named_modules() if reconstructible(m) and n not in attention
                   and m.weight.shape[1] != refitted.get_submodule(n).weight.shape[1]
                   and (n not in graph.layers or graph.layers[n].calls == 1)}
    # ... that sees at least as many positions as it keeps input channels (else it is left as pruned).
    seen = layer_inputs(refitted, sorted(lost_inputs), x)
    lost_inputs = {n for n in lost_inputs if n in seen and positions(seen[n], refitted.get_submodule(n))
                   >= MIN_ROWS_PER_KEPT * refitted.get_submodule(n).weight.shape[1]}
    assert changed == lost_inputs
    pointwise = [n for n in sorted(changed) if isinstance(refitted.get_submodule(n), nn.Linear) or (
        isinstance(refitted.get_submodule(n), nn.Conv2d) and refitted.get_submodule(n).kernel_size == (1, 1)
        and refitted.get_submodule(n).stride == (1, 1))]
    inputs_unpruned, inputs_refitted = layer_inputs(model, pointwise, x), layer_inputs(refitted, pointwise, x)
    removed_outputs = read_record(tmp_path / "b.record")
    for layer in pointwise:
        module = refitted.get_submodule(layer)
        with torch.no_grad():
            target = model.get_submodule(layer)(inputs_unpruned[layer])
        kept = [c for c in range(target.shape[-1 if isinstance(module, nn.Linear) else 1])
                if c not in removed_outputs.get(layer, [])]
        target = target[..., kept] if isinstance(module, nn.Linear) else target[:, kept]
        with torch.no_grad():
            error_refitted = (refitted.get_submodule(layer)(inputs_refitted[layer]) - target).pow(2).sum()
            error_plain = (plain.get_submodule(layer)(inputs_refitted[layer]) - target).pow(2).sum()
        assert error_refitted <= error_plain * (1 + 1e-6) + 1e-9, layer


def positions(x: torch.Tensor, layer: nn.Module) -> int:
    """How many positions a layer's input holds: all but the channel dimension (a Linear's last, a Conv's 2nd)."""
    return x.numel() // (x.shape[-1] if isinstance(layer, nn.Linear) else x.shape[1])


def layer_inputs(model: nn.Module, layers: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The first positional input of each named layer on one forward pass of ``x``."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, args[0].detach())) for name in layers]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen
