"""AscendLatency (fractal staircase) and MeasuredLatency (tables timed on the device, cached)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.errors import ArgumentError
from acps_core.graph.build import build_channel_graph
from acps_core.methods.registry import get_registry
from acps_core.search.problem import CostModel
from acps_gain_ascend import CHIPS, AscendLatency, MeasuredLatency


def conv_geometry(cin: int = 64, cout: int = 64, size: int = 28, dtype: torch.dtype = torch.float32, **kwargs):
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, **kwargs), nn.ReLU(), nn.Conv2d(cout, 4, 1))
    model = model.to(dtype) if dtype.is_floating_point else model
    graph = build_channel_graph(model.eval(), torch.randn(2, cin, size, size, dtype=model[0].weight.dtype))
    return graph.layers["0"].geometry


def test_ascend_staircase_steps_exactly_at_the_16_channel_fractals() -> None:
    geometry = conv_geometry(64, 96)
    estimator = AscendLatency("Ascend910", overhead_us=0.0)
    costs = {c: estimator.layer_cost(geometry, 64, c) for c in range(33, 97)}
    for c in range(34, 97):
        same_fractal = (c - 1) // 16 == (c - 2) // 16  # ceil16(c) == ceil16(c - 1)
        assert (costs[c] == costs[c - 1]) == same_fractal, c
    # removing 3 channels from 67 saves a whole fractal; removing 3 from 64 saves nothing
    assert estimator.layer_cost(geometry, 64, 64) < estimator.layer_cost(geometry, 64, 67)
    assert estimator.layer_cost(geometry, 64, 61) == estimator.layer_cost(geometry, 64, 64)
    # the input side is padded the same way
    assert estimator.layer_cost(geometry, 49, 64) == estimator.layer_cost(geometry, 64, 64)
    assert estimator.layer_cost(geometry, 48, 64) < estimator.layer_cost(geometry, 49, 64)


def test_ascend_int8_pads_the_input_channels_to_32() -> None:
    geometry = conv_geometry(64, 64)
    geometry.weight_dtype = torch.int8
    estimator = AscendLatency("Ascend910", overhead_us=0.0, bandwidth_gbs=1e9)  # compute-bound
    assert estimator.layer_cost(geometry, 33, 64) == estimator.layer_cost(geometry, 64, 64)
    assert estimator.layer_cost(geometry, 32, 64) < estimator.layer_cost(geometry, 33, 64)
    assert estimator.layer_cost(geometry, 64, 49) == estimator.layer_cost(geometry, 64, 64)  # outputs still 16


def test_ascend_time_is_the_larger_of_compute_and_memory_plus_the_overhead() -> None:
    geometry = conv_geometry(64, 64, size=56)
    estimator = AscendLatency("Ascend310")
    total, compute, memory = estimator.layer_time(geometry, 64, 64)
    assert total == pytest.approx(max(compute, memory) + CHIPS["Ascend310"].overhead_us)
    padded_macs = 56 * 56 * 64 * 64 * 9  # all counts already multiples of 16
    assert compute == pytest.approx(padded_macs / (8e12 / 2) * 1e6)
    slower = AscendLatency("Ascend310", bandwidth_gbs=1.0)
    assert slower.layer_time(geometry, 64, 64)[2] > memory and slower.layer_cost(geometry, 64, 64) > total


def test_ascend_depthwise_runs_on_the_vector_unit_and_bad_chips_are_refused() -> None:
    geometry = conv_geometry(64, 64, groups=64)
    estimator = AscendLatency("AtlasA2", overhead_us=0.0, bandwidth_gbs=1e9)
    assert geometry.depthwise
    assert estimator.layer_cost(geometry, 50, 50) == estimator.layer_cost(geometry, 64, 64)
    assert estimator.layer_cost(geometry, 48, 48) < estimator.layer_cost(geometry, 49, 49)
    with pytest.raises(ArgumentError, match="unknown Ascend chip 'Ascend999'; known: Ascend910"):
        AscendLatency("Ascend999")
    with pytest.raises(ArgumentError, match="unknown option 'tflops' \\(did you mean 'fp16_tflops'\\?\\)"):
        AscendLatency("Ascend910", tflops=1.0)


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 67, 3, padding=1)
        self.b = nn.Conv2d(67, 75, 3, padding=1)
        self.c = nn.Conv2d(75, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


@pytest.mark.parametrize("search", ["GreedySearch", "KnapsackSearch", "GlobalRankSearch"])
def test_the_search_cuts_on_fractal_boundaries_and_never_spends_a_channel_for_nothing(tmp_path, search) -> None:
    torch.manual_seed(0)
    model = Wide().eval()
    x = torch.randn(8, 3, 16, 16)
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.6\nascend_optimized: false\n")
    estimator = AscendLatency("Ascend310", overhead_us=0.0, bandwidth_gbs=1e9)
    result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, torch.randint(0, 10, (8,))],
                                            str(tmp_path / "prune.cfg"), search_alg=search, gain=estimator)
    assert result.cost_after <= result.cost_before / 1.6
    for name in ("a", "b", "c"):
        kept = result.layers[name].kept
        # every removed channel saved cost: the kept count sits at a fractal boundary (or is the full count)
        assert kept == result.layers[name].total or kept % 16 == 0, (name, kept)


# MeasuredLatency --------------------------------------------------------------------------------------------------

class FakeTimer:
    """Latency = in x out channels (a bilinear surface), counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: nn.Module, x) -> float:
        self.calls += 1
        layer = module if isinstance(module, (nn.Conv2d, nn.Linear)) else None
        if layer is None:
            return 1.0  # the whole model or a tiny op
        cin = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
        cout = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        return cin * cout / 1000.0


def measured(tmp_path, timer=None, **kwargs) -> MeasuredLatency:
    estimator = MeasuredLatency(**{"cache_dir": tmp_path / "cache", "measure_rest": False, **kwargs})
    estimator.timer = timer or FakeTimer()
    return estimator


def test_measured_tables_cover_the_grid_and_interpolate_between_points(tmp_path) -> None:
    geometry = conv_geometry(64, 96, size=8)
    estimator = measured(tmp_path)
    estimator.prepare([geometry])
    table = estimator.tables["0"]
    assert table.ins == [8, 16, 32, 48, 64] and table.outs == [12, 24, 48, 72, 96]
    assert estimator.layer_cost(geometry, 64, 96) == pytest.approx(64 * 96 / 1000)
    assert estimator.layer_cost(geometry, 40, 60) == pytest.approx(40 * 60 / 1000)  # bilinear is exact here
    assert estimator.layer_cost(geometry, 4, 6) == estimator.layer_cost(geometry, 8, 12)  # below the grid: flat
    assert estimator.timer.calls == 25


def test_measured_tables_are_cached_per_geometry_and_remeasured_when_the_key_changes(tmp_path) -> None:
    geometry = conv_geometry(32, 32, size=8)
    first = measured(tmp_path)
    first.prepare([geometry])
    assert first.measured == 1
    files = list((tmp_path / "cache").glob("Conv2d-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["channels"] == [32, 32]
    again = measured(tmp_path)
    again.prepare([geometry])
    assert again.measured == 0 and again.timer.calls == 0
    assert again.layer_cost(geometry, 20, 20) == first.layer_cost(geometry, 20, 20)
    other = measured(tmp_path, repeats=3)  # a different protocol is a different table
    other.prepare([geometry])
    assert other.measured == 1
    files[0].write_text("{ not json")  # a corrupt file is measured again and rewritten
    broken = measured(tmp_path)
    broken.prepare([geometry])
    assert broken.measured == 1 and json.loads(files[0].read_text())["key"]["channels"] == [32, 32]


def test_measured_noise_cannot_make_a_smaller_layer_slower(tmp_path) -> None:
    values = iter([5.0, 1.0, 2.0, 7.0] * 20)
    estimator = measured(tmp_path, timer=lambda module, x: next(values), grid=(0.5, 1.0), cache_dir=False)
    geometry = conv_geometry(16, 16, size=8)
    estimator.prepare([geometry])
    assert estimator.tables["0"].values == [[5.0, 5.0], [5.0, 7.0]]


def test_measured_latency_really_times_layers_and_leaves_the_model_alone(tmp_path) -> None:
    torch.manual_seed(0)
    model = Wide().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    # A small target: how much of a tiny model's time pruning can remove depends on the machine's load.
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.1\nascend_optimized: false\n")
    estimator = MeasuredLatency(warmup=1, repeats=3, grid=(0.5, 1.0), cache_dir=tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", acps.PruneTargetWarning)
        result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), [x, torch.randint(0, 10, (4,))],
                                                str(tmp_path / "prune.cfg"), gain=estimator)
    assert result.cost_unit == "ms (measured)" and result.methods["gain"].startswith("MeasuredLatency")
    assert estimator.measured == 4 and estimator.model_ms > 0
    assert all(t.values[-1][-1] > 0 for t in estimator.tables.values())
    # The layers' tables plus the rest the whole model's timing leaves: the model's measured latency.
    layers = sum(t.values[-1][-1] for t in estimator.tables.values())
    assert result.cost_before == pytest.approx(max(layers, estimator.model_ms), rel=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training


def test_cost_estimators_are_registered_by_name() -> None:
    registry = get_registry(refresh=True)
    for name, cls in (("AscendLatency", AscendLatency), ("MeasuredLatency", MeasuredLatency)):
        info = registry.get("gain", name)
        assert info.cls is cls and info.distribution == "acps-gain-estimators"


def test_cost_model_adds_the_fixed_cost_before_and_after() -> None:
    class Fixed(AscendLatency):
        def fixed_cost(self) -> float:
            return 100.0

    model = Wide().eval()
    graph = build_channel_graph(model, torch.randn(2, 3, 16, 16))
    plain, fixed = CostModel(graph, AscendLatency("Ascend910")), CostModel(graph, Fixed("Ascend910"))
    assert fixed.full_cost == pytest.approx(plain.full_cost + 100.0)
    group = graph.layers["a"].out_group
    assert fixed.saving({}, group, 32) == pytest.approx(plain.saving({}, group, 32))


def test_ascend_prices_attention_and_token_linears_in_fractals_too() -> None:
    model = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0).eval()
    graph = build_channel_graph(nn.Sequential(nn.Linear(6, 32), model, nn.Linear(32, 3)).eval(),
                                torch.randn(2, 20, 6))
    estimator = AscendLatency("Ascend310", overhead_us=0.0, bandwidth_gbs=1e9)
    attention = graph.layers["1.self_attn"].geometry
    linear = graph.layers["1.linear1"].geometry
    assert attention.kind == "MultiheadAttention" and linear.input_shape == (1, 20, 32)
    # 20 tokens are padded to 32 rows; the heads' width steps at multiples of 16
    assert estimator.layer_cost(attention, 32, 17) == estimator.layer_cost(attention, 32, 32)
    assert estimator.layer_cost(attention, 32, 16) < estimator.layer_cost(attention, 32, 17)
    assert estimator.layer_cost(linear, 32, 64) == pytest.approx(32 * 64 * 32 / (8e12 / 2) * 1e6)


@pytest.mark.parametrize(("layer", "shape"), [
    (nn.Conv2d(3, 8, 7), (3, 8, 8)),                                   # no padding: a 2x2 output
    (nn.ConvTranspose2d(8, 16, 2, 2), (8, 1, 1)),
    (nn.ConvTranspose2d(8, 16, 4, 1, 0), (8, 1, 1)),                   # DCGAN's first layer
    (nn.ConvTranspose2d(8, 16, 3, 2, 1, output_padding=1), (8, 5, 5)),
    (nn.Conv1d(4, 8, 3, stride=2, padding=1), (4, 9)),
    (nn.Conv3d(2, 4, 3, padding=1), (2, 4, 4, 4)),
])
def test_the_standalone_layer_does_the_work_of_the_traced_one(layer, shape) -> None:
    from acps_gain_ascend.measured import _standalone

    with torch.no_grad():
        traced = layer(torch.randn(1, *shape)).shape
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(traced.numel(), 2)).eval()
    geometry = build_channel_graph(model, torch.randn(2, *shape)).layers["0"].geometry
    module, x = _standalone(geometry, geometry.in_channels, geometry.out_channels, 1)
    with torch.no_grad():
        assert module(x).shape == traced


def test_ascend_counts_a_transposed_convs_larger_output_in_its_memory_traffic() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(64, 64, 2, 2), nn.ReLU(), nn.Conv2d(64, 4, 1)).eval()
    geometry = build_channel_graph(model, torch.randn(2, 64, 14, 14)).layers["0"].geometry
    _, _, memory = AscendLatency("Ascend910").layer_time(geometry, 64, 64)
    elements = 64 * 14 * 14 + 64 * 28 * 28 + 64 * 64 * 4  # input, the 28x28 output, weights
    assert memory == pytest.approx(elements * 2 / 1200e9 * 1e6)


class SlowTables(FakeTimer):
    """Layers timed ``factor`` times slower than the whole model allows (a busy machine), the whole model 1 ms."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def __call__(self, module: nn.Module, x) -> float:
        value = super().__call__(module, x)
        return value * self.factor if isinstance(module, (nn.Conv2d, nn.Linear)) else value


def test_stale_cached_tables_are_timed_again_and_fresh_disagreeing_ones_warned_about(tmp_path) -> None:
    torch.manual_seed(0)
    model = Wide().eval()
    x = torch.randn(1, 3, 8, 8)
    geometries = [layer.geometry for layer in build_channel_graph(model, x).layers.values()]
    busy = measured(tmp_path, timer=SlowTables(1000.0), measure_rest=True)
    busy.prepare(geometries)  # timed on a busy machine: the tables add up to far more than the model's 1 ms
    with pytest.warns(UserWarning, match="machine was probably busy"):
        busy.observe_model(model, x)
    stored = [json.loads(f.read_text()) for f in (tmp_path / "cache").glob("*.json")]
    assert stored and all("spread" in data for data in stored)

    quiet = measured(tmp_path, timer=SlowTables(1e-3), measure_rest=True)
    quiet.prepare(geometries)
    assert quiet.measured == 0 and len(quiet.cached) == len(geometries)  # the busy tables, from the cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timed again, the tables agree with the model: no warning
        quiet.observe_model(model, x)
    assert quiet.measured == len(geometries) and not quiet.cached
    full = sum(quiet.tables[g.name].at(g.in_channels, g.out_channels) for g in geometries)
    assert full <= quiet.model_ms
    again = measured(tmp_path, timer=SlowTables(1e-3), measure_rest=True)
    again.prepare(geometries)  # the cache now holds the quiet tables
    assert again.measured == 0
    assert all(again.tables[g.name].values == quiet.tables[g.name].values for g in geometries)


def test_the_spread_of_the_repeats_is_recorded_with_the_table(tmp_path) -> None:
    estimator = MeasuredLatency(cache_dir=tmp_path / "cache", measure_rest=False, repeats=8, warmup=1,
                                grid=(0.5, 1.0))
    geometry = conv_geometry(8, 8, size=4)
    estimator.prepare([geometry])
    spread = estimator.tables[geometry.name].spread
    assert spread is not None and spread >= 0
    data = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert data["spread"] == spread
