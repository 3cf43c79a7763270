"""Uniform widths across repeated blocks: tied groups keep one count, each member its own best channels, and the
cost the search sees is the whole set's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.errors import ArgumentError
from acps_core.search.problem import Decision, SearchRecord
from acps_core.search.ties import block_pattern, repeated_blocks, tie_records, untie_decision


class Stack(nn.Module):
    """Residual MLP blocks of one width; block ``loud`` has larger weights, so its channels matter more."""

    def __init__(self, blocks: int = 4, width: int = 16, hidden: int = 32, loud: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width)) for _ in range(blocks))
        self.head = nn.Linear(width, 4)
        with torch.no_grad():
            self.blocks[loud][2].weight.mul_(8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        out: torch.Tensor = self.head(x)
        return out


def record(group_id: int, name: str, scores: list[float], unit: int = 1) -> SearchRecord:
    channels = len(scores)
    return SearchRecord(group_id, name, [name], [], [], channels, list(range(channels, 0, -unit)),
                        sensitivity=torch.tensor(scores), unit=unit)


def test_block_pattern_replaces_whole_index_components_only() -> None:
    assert block_pattern("model.layers.12.mlp.gate_proj") == "model.layers.#.mlp.gate_proj"
    assert block_pattern("stages.0.blocks.3.conv_dw") == "stages.#.blocks.#.conv_dw"
    assert block_pattern("0.conv") == "#.conv"
    assert block_pattern("layer1.conv2") == "layer1.conv2"  # digits inside a name are not an index


def test_repeated_blocks_are_alike_children_not_the_layers_of_one_block() -> None:
    model = Stack()
    model.blocks.append(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 16)))  # a narrower odd one out
    repeated = repeated_blocks(model)
    assert repeated == {"blocks.0", "blocks.1", "blocks.2", "blocks.3"}
    assert block_pattern("blocks.2.0", repeated) == "blocks.#.0"
    assert block_pattern("blocks.4.0", repeated) == "blocks.4.0"


def test_a_first_block_with_a_parameter_of_its_own_is_still_one_of_the_repeated_blocks() -> None:
    model = Stack()
    model.blocks[0].register_parameter("bias_table", nn.Parameter(torch.zeros(8, 4)))  # as T5's first block
    assert repeated_blocks(model) == {"blocks.0", "blocks.1", "blocks.2", "blocks.3"}
    model.blocks[1][0] = nn.Linear(16, 24)  # a shared parameter of another shape: the odd one out
    assert repeated_blocks(model) == {"blocks.0", "blocks.2", "blocks.3"}


def test_blocks_that_only_share_some_parameters_are_not_alike() -> None:
    model = Stack(blocks=2)
    model.blocks.append(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv1d(32, 16, 1)))  # same first layer only
    model.blocks.append(nn.Sequential(nn.Identity()))  # no parameters: alike to nothing
    model.blocks.append(nn.Sequential(nn.Identity()))
    assert repeated_blocks(model) == {"blocks.0", "blocks.1"}


def test_a_set_of_twins_searches_as_one_record_whose_loss_is_the_sum_of_theirs() -> None:
    twins = [record(0, "blocks.0.fc", [4, 1, 3, 2, 8, 7], unit=2), record(1, "blocks.1.fc", [1, 9, 9, 9, 0, 2], unit=2),
             record(2, "blocks.2.fc", [5, 5, 0, 1, 2, 2], unit=2)]
    alone = record(3, "head", [1.0, 2.0])
    view, ties = tie_records([*twins, alone])
    assert ties.sets == {0: [0, 1, 2]}
    assert [r.group_id for r in view] == [0, 3] and view[1] is alone
    for kept in (6, 4, 2):
        assert view[0].lost(kept) == pytest.approx(sum(twin.lost(kept) for twin in twins))
    assert twins[0].lost(4) == 5.0  # the member itself is untouched: its own least sensitive head (4 + 1)
    decision = untie_decision(Decision({0: [0, 1]}), ties, [*twins, alone])
    # One count, each member's own best head: the largest one of each.
    assert decision.keep == {0: [4, 5], 1: [2, 3], 2: [0, 1]}


def test_groups_of_other_widths_or_outside_blocks_are_not_tied() -> None:
    records = [record(0, "blocks.0.fc", [1.0] * 4), record(1, "blocks.1.fc", [1.0] * 6),
               record(2, "blocks.2.fc", [1.0] * 4), record(3, "stem", [1.0] * 4), record(4, "head", [1.0] * 4)]
    view, ties = tie_records(records)
    assert ties.sets == {0: [0, 2]}
    assert [r.group_id for r in view] == [0, 1, 3, 4]


def write_config(tmp_path: Path, ratio: float) -> Path:
    path = tmp_path / "search.cfg"
    path.write_text(f"compress_ratio: {ratio}\nascend_optimized: false\n")
    return path


def hidden_widths(model: nn.Module) -> list[int]:
    return [block[0].out_features for block in model.blocks]


@pytest.mark.parametrize("search_alg", ["GreedySearch", "KnapsackSearch"])
def test_uniform_widths_give_every_block_the_same_width_at_the_target(tmp_path: Path, search_alg: str) -> None:
    model = Stack()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    labels = model(x).detach() + 0.1 * torch.randn(32, 4, generator=torch.Generator().manual_seed(2))
    config = write_config(tmp_path, 1.6)
    free = acps.auto_channel_prune_search(model, config, [x, labels], tmp_path / "free.cfg", search_alg=search_alg)
    tied = acps.auto_channel_prune_search(model, config, [x, labels], tmp_path / "tied.cfg", search_alg=search_alg,
                                          uniform_widths=True)
    assert free.target_reached and tied.target_reached
    free_widths = hidden_widths(acps.create_prune_retrain_model(model, x, tmp_path / "free.cfg",
                                                                tmp_path / "free.record"))
    pruned = acps.create_prune_retrain_model(model, x, tmp_path / "tied.cfg", tmp_path / "tied.record")
    widths = hidden_widths(pruned)
    assert len(set(free_widths)) > 1  # left free, the loud block keeps more than the others
    assert len(set(widths)) == 1 and widths[0] < 32
    assert any("uniform_widths: 4 groups" in note and "blocks.#.0 (4 blocks)" in note for note in tied.notes)
    # The reported cost is the pruned model's, and each block kept its own best channels, not the same ones.
    assert tied.achieved_ratio == pytest.approx(1.6, rel=0.05)
    keeps = {tuple(tied.kept_channels[f"blocks.{b}.0"]) for b in range(4)}
    assert len(keeps) > 1


def test_uniform_widths_must_be_a_bool(tmp_path: Path) -> None:
    model = Stack()
    x = torch.randn(8, 16)
    with pytest.raises(ArgumentError, match="uniform_widths must be True or False, got 'yes'"):
        acps.auto_channel_prune_search(model, write_config(tmp_path, 1.5), [x, model(x).detach()],
                                       tmp_path / "p.cfg", uniform_widths="yes")
    assert not (tmp_path / "p.cfg").exists()


def test_a_global_rank_counts_the_channels_every_member_of_a_set_loses() -> None:
    from acps_core.graph.build import build_channel_graph
    from acps_core.search.problem import CostModel, GraphInfo, PruneSearchConfig, allowed_kept_counts, masks_to_decision
    from acps_gain_ascend import BitComplexity
    from acps_search_greedy import GlobalRankSearch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), Stack(loud=0)).eval()  # the residual stream gets a producer
    graph = build_channel_graph(model, torch.randn(4, 16))
    cost_model = CostModel(graph, BitComplexity())
    records = [SearchRecord.for_group(g, allowed_kept_counts(g.channels, False, 0.9, g.atom))
               for g in graph.prunable_groups]
    for r in records:  # the blocks' hidden channels matter half as much as the residual stream's, one by one
        r.sensitivity = torch.full((r.channels,), 1.0 if r.name.startswith("1.blocks") else 2.0)
    view, ties = tie_records(records, repeated_blocks(model))
    info = GraphInfo(graph, cost_model, {}, cost_model.full_cost / 1.3, ties)
    masks = GlobalRankSearch().channel_prune_search(info, view, PruneSearchConfig(1.3, False, 0.9))
    keep = untie_decision(masks_to_decision(masks, view, "GlobalRankSearch"), ties, records).keep
    names = {graph.group(g).name for g in keep}
    assert names == {f"1.blocks.{b}.0" for b in range(4)}  # the cheaper channels go, in every block alike
