"""TaylorLossSensitivity: |sum(w * dL/dw)| over every parameter tied to a channel, accumulated over passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acps_core.errors import ArgumentError
from acps_core.graph.build import build_channel_graph
from acps_core.methods.registry import get_registry
from acps_core.search.problem import SearchRecord
from acps_sensitivity_taylor import TaylorLossSensitivity


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def records_for(graph) -> list[SearchRecord]:
    return [SearchRecord.for_group(g, [g.channels]) for g in graph.prunable_groups]


def scored_records(method, model, data, label, test_iteration) -> list[SearchRecord]:
    """Every group's record, scored by ``method`` over ``test_iteration`` calibration passes."""
    graph = build_channel_graph(model, data)
    method.setup_initialization((model, graph), [data, label], test_iteration)
    records = records_for(graph)
    method.get_sensitivity(records)
    return records


def score(model, data, label, test_iteration=1, **kwargs) -> dict[str, torch.Tensor]:
    graph = build_channel_graph(model, data)
    method = TaylorLossSensitivity(**kwargs)
    method.setup_initialization((model, graph), [data, label], test_iteration)
    records = records_for(graph)
    method.get_sensitivity(records)
    return {r.name: r.sensitivity for r in records}, method


def hand_scores(model, data, label, loss_fn) -> torch.Tensor:
    """The first group's score computed by hand: producer conv, its BN, and the consumer conv's columns."""
    params = [model[0].weight, model[0].bias, model[1].weight, model[1].bias, model[3].weight]
    loss = loss_fn(model(data), label)
    grads = torch.autograd.grad(loss, params)
    w0, b0, g1, b1, w3 = (p.detach() * g for p, g in zip(params, grads))
    total = w0.sum(dim=(1, 2, 3)) + b0 + g1 + b1 + w3.sum(dim=(0, 2, 3))
    return total.double().abs()


def test_scores_match_the_first_order_taylor_term_over_the_whole_group() -> None:
    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    scores, _ = score(model, data, label)
    expected = hand_scores(model, data, label, F.cross_entropy)
    torch.testing.assert_close(scores["0"], expected, rtol=1e-4, atol=1e-7)


def related_labels(model: nn.Module, data: torch.Tensor) -> torch.Tensor:
    """Regression targets that follow the model's outputs (plus noise), as real labels do."""
    with torch.no_grad():
        return model(data) + 0.1 * torch.randn(data.shape[0], 5, generator=torch.Generator().manual_seed(3))


def test_default_loss_for_output_shaped_labels_is_the_references_l1() -> None:
    model = tiny_model()
    data = torch.randn(8, 3, 8, 8)
    label = related_labels(model, data)
    scores, method = score(model, data, label)
    assert not method.notes
    torch.testing.assert_close(scores["0"], hand_scores(model, data, label, F.l1_loss), rtol=1e-4, atol=1e-7)


def test_random_output_shaped_labels_fall_back_to_label_free_scores() -> None:
    model = tiny_model()
    data = torch.randn(8, 3, 8, 8)
    scores, method = score(model, data, torch.randn(8, 5, generator=torch.Generator().manual_seed(4)))
    assert method.notes and "look unrelated" in method.notes[0]
    with torch.no_grad():
        label = model(data)
    label_free, _ = score(model, data, label)  # the zero-loss fallback scores the same way
    torch.testing.assert_close(scores["0"], label_free["0"])


def test_passes_accumulate_absolute_scores_of_each_part_of_the_batch() -> None:
    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    scores, _ = score(model, data, label, test_iteration=2)
    expected = (hand_scores(model, data[:4], label[:4], F.cross_entropy)
                + hand_scores(model, data[4:], label[4:], F.cross_entropy))
    torch.testing.assert_close(scores["0"], expected, rtol=1e-4, atol=1e-7)


def test_a_user_loss_replaces_the_default() -> None:
    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randn(8, 5)  # random labels are the user's call with their loss

    def squared(output, target):
        return ((output - target) ** 2).mean()

    scores, _ = score(model, data, label, loss_func=squared)
    torch.testing.assert_close(scores["0"], hand_scores(model, data, label, squared), rtol=1e-4, atol=1e-7)


def test_frozen_layers_are_scored_like_trainable_ones() -> None:
    model = tiny_model()
    data, label = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    trainable, _ = score(model, data, label)
    for param in model.parameters():
        param.requires_grad_(False)
    frozen, _ = score(model, data, label)
    assert bool(trainable["0"].any())
    torch.testing.assert_close(frozen["0"], trainable["0"])


def test_zero_loss_falls_back_to_output_change_scores_and_notes_it() -> None:
    model = tiny_model()
    data = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        label = model(data)
    scores, method = score(model, data, label)
    assert method.notes and "label-free" in method.notes[0]
    assert int((scores["0"] > 0).sum()) >= 4  # channels ReLU does not silence change the output
    # A dead channel (zero filter, zero BN scale and shift) changes nothing and scores 0.
    with torch.no_grad():
        model[0].weight[2] = 0
        model[0].bias[2] = 0
        model[1].weight[2] = 0
        model[1].bias[2] = 0
        label = model(data)
    scores, _ = score(model, data, label)
    assert scores["0"][2] == pytest.approx(0.0, abs=1e-12)
    assert scores["0"][2] < scores["0"].max()


def test_registered_by_name_from_its_distribution() -> None:
    info = get_registry(refresh=True).get("sensitivity", "TaylorLossSensitivity")
    assert info.cls is TaylorLossSensitivity
    assert info.distribution == "acps-sensitivity-methods"


def test_fisher_squares_each_pass_instead_of_taking_its_absolute_value() -> None:
    from acps_sensitivity_taylor import FisherSensitivity

    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    records = scored_records(FisherSensitivity(), model, data, label, 2)
    first = hand_scores(model, data[:4], label[:4], F.cross_entropy)
    second = hand_scores(model, data[4:], label[4:], F.cross_entropy)
    torch.testing.assert_close(records[0].sensitivity, first ** 2 + second ** 2, rtol=1e-4, atol=1e-10)


def test_normalized_taylor_divides_each_group_by_its_mean() -> None:
    from acps_sensitivity_taylor import NormalizedTaylorSensitivity

    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    plain, _ = score(model, data, label)
    records = scored_records(NormalizedTaylorSensitivity(), model, data, label, 1)
    normalized = {r.name: r.sensitivity for r in records}
    torch.testing.assert_close(normalized["0"], plain["0"] / plain["0"].mean())
    assert float(normalized["0"].mean()) == pytest.approx(1.0)


def elementwise_hand_scores(model, data, label) -> torch.Tensor:
    """The first group's sum of |w * dL/dw| over each of its weights, computed by hand."""
    params = [model[0].weight, model[0].bias, model[1].weight, model[1].bias, model[3].weight]
    grads = torch.autograd.grad(F.cross_entropy(model(data), label), params)
    w0, b0, g1, b1, w3 = ((p.detach() * g).abs() for p, g in zip(params, grads))
    return (w0.sum(dim=(1, 2, 3)) + b0 + g1 + b1 + w3.sum(dim=(0, 2, 3))).double()


def test_group_taylor_sums_each_weights_absolute_term_over_the_passes_then_divides_by_the_mean() -> None:
    from acps_sensitivity_taylor import GroupTaylorSensitivity

    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    records = scored_records(GroupTaylorSensitivity(terms="all"), model, data, label, 2)
    raw = elementwise_hand_scores(model, data[:4], label[:4]) + elementwise_hand_scores(model, data[4:], label[4:])
    torch.testing.assert_close(records[0].sensitivity, raw / raw.mean(), rtol=1e-4, atol=1e-8)
    # Terms of opposite sign add up instead of cancelling: above the signed sum's absolute value everywhere
    signed = hand_scores(model, data[:4], label[:4], F.cross_entropy) + hand_scores(
        model, data[4:], label[4:], F.cross_entropy)
    assert bool((raw >= signed - 1e-9).all()) and bool((raw > 1.5 * signed).any())


def test_group_taylor_median_normalisation_divides_by_the_groups_median() -> None:
    from acps_sensitivity_taylor import GroupTaylorSensitivity

    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    records = scored_records(GroupTaylorSensitivity(normalize="median", terms="all"), model, data, label, 1)
    raw = elementwise_hand_scores(model, data, label)
    torch.testing.assert_close(records[0].sensitivity, raw / raw.median(), rtol=1e-4, atol=1e-8)
    with pytest.raises(ArgumentError, match="'mean' or 'median'"):
        GroupTaylorSensitivity(normalize="max")


def depthwise_model() -> nn.Sequential:
    """conv -> BN -> depthwise conv (with bias) -> BN -> conv -> Linear: one group with every kind of term."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5))
    with torch.no_grad():
        for norm in (model[1], model[4]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    return model.eval()


def test_group_taylor_terms_are_by_default_the_dense_layers_weights_alone() -> None:
    from acps_sensitivity_taylor import GroupTaylorSensitivity

    model = depthwise_model()
    data, label = torch.randn(8, 3, 10, 10), torch.randint(0, 5, (8,))
    dense = scored_records(GroupTaylorSensitivity(), model, data, label, 1)[0].sensitivity  # the default
    every = scored_records(GroupTaylorSensitivity(terms="all"), model, data, label, 1)[0].sensitivity
    params = [model[0].weight, model[6].weight]  # the producer's filters and the consumer's columns
    grads = torch.autograd.grad(F.cross_entropy(model(data), label), params)
    produced, consumed = ((p.detach() * g).abs() for p, g in zip(params, grads))
    raw = (produced.sum(dim=(1, 2, 3)) + consumed.sum(dim=(0, 2, 3))).double()
    torch.testing.assert_close(dense, raw / raw.mean(), rtol=1e-4, atol=1e-8)
    # the biases, the norms and the depthwise filters count in "all" and change the ranking
    assert not torch.allclose(dense, every, rtol=1e-2)
    with pytest.raises(ArgumentError, match="'all' or 'dense'"):
        GroupTaylorSensitivity(terms="weights")


def test_group_taylor_dense_terms_keep_every_term_of_a_group_without_a_dense_weight() -> None:
    from acps_sensitivity_taylor import GroupTaylorSensitivity

    torch.manual_seed(0)
    # group 0: a grouped conv read by a grouped conv, so no dense weight is tied to its channels
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    data, label = torch.randn(8, 4, 12, 12), torch.randint(0, 3, (8,))
    dense = scored_records(GroupTaylorSensitivity(terms="dense"), model, data, label, 1)
    every = scored_records(GroupTaylorSensitivity(terms="all"), model, data, label, 1)
    assert dense[0].producers == ["0"] and float(dense[0].sensitivity.sum()) > 0
    torch.testing.assert_close(dense[0].sensitivity, every[0].sensitivity)
    # the next group has a dense consumer ("4"), so only its columns count there
    assert not torch.allclose(dense[1].sensitivity, every[1].sensitivity, rtol=1e-2)


def test_balanced_l2_norm_is_the_producers_filter_norm_over_the_group_mean() -> None:
    from acps_sensitivity_taylor import BalancedL2NormSensitivity

    model = tiny_model()
    data = torch.randn(4, 3, 8, 8)
    graph = build_channel_graph(model, data)
    method = BalancedL2NormSensitivity()
    method.setup_initialization((model, graph), [data, torch.randint(0, 5, (4,))], 1)
    records = records_for(graph)
    method.get_sensitivity(records)
    weight, bias = model[0].weight.detach().double(), model[0].bias.detach().double()
    norms = (weight.flatten(1).pow(2).sum(1) + bias.pow(2)).sqrt()
    torch.testing.assert_close(records[0].sensitivity, norms / norms.mean())


def test_every_method_of_the_distribution_is_registered_by_name() -> None:
    names = {m.name for m in get_registry(refresh=True).methods("sensitivity")
             if m.distribution == "acps-sensitivity-methods"}
    assert names == {"TaylorLossSensitivity", "NormalizedTaylorSensitivity", "FisherSensitivity",
                     "BalancedL2NormSensitivity", "OutputChangeSensitivity", "GroupMagnitudeSensitivity",
                     "GroupTaylorSensitivity", "MeasuredSensitivity"}


def test_output_change_ignores_the_labels_and_equals_the_label_free_fallback() -> None:
    from acps_sensitivity_taylor import OutputChangeSensitivity

    model = tiny_model()
    data = torch.randn(8, 3, 8, 8)
    graph = build_channel_graph(model, data)
    results = []
    for label in (torch.randint(0, 5, (8,)), torch.randn(8, 5)):
        method = OutputChangeSensitivity()
        method.setup_initialization((model, graph), [data, label], 2)
        records = records_for(graph)
        method.get_sensitivity(records)
        results.append(records[0].sensitivity)
    torch.testing.assert_close(results[0], results[1])
    with torch.no_grad():
        own = model(data)
    fallback, _ = score(model, data, own, test_iteration=2)  # zero loss: Taylor falls back to the same score
    torch.testing.assert_close(results[0], fallback["0"])


def hand_label_free_scores(model, data, seed=0) -> torch.Tensor:
    """The first group's label-free score of one pass, from the module docs: the samples split into
    min(8, ceil(N / 2)) consecutive chunks, each sample projected on its own random direction, each chunk's term
    squared."""
    from acps_sensitivity_taylor.taylor import _generator

    params = [model[0].weight, model[0].bias, model[1].weight, model[1].bias, model[3].weight]
    samples = data.shape[0]
    chunks = min(8, -(-samples // 2))
    bounds = [k * samples // chunks for k in range(chunks + 1)]
    total = torch.zeros(6, dtype=torch.float64)
    for start, stop in zip(bounds, bounds[1:]):
        output = model(data[start:stop])
        directions = torch.stack([torch.randn(5, generator=_generator(seed, 0, n)) for n in range(start, stop)])
        grads = torch.autograd.grad((output * directions).sum() / samples, params)
        w0, b0, g1, b1, w3 = (p.detach() * g for p, g in zip(params, grads))
        term = (w0.sum(dim=(1, 2, 3)) + b0 + g1 + b1 + w3.sum(dim=(0, 2, 3))).double()
        total += term.pow(2)
    return total.sqrt()


def test_label_free_scores_project_each_sample_on_its_own_direction_in_eight_chunks() -> None:
    from acps_sensitivity_taylor import OutputChangeSensitivity

    model = tiny_model()
    data = torch.randn(19, 3, 8, 8)  # 8 chunks of 2 and 3 samples
    records = scored_records(OutputChangeSensitivity(), model, data, torch.randint(0, 5, (19,)), 1)
    torch.testing.assert_close(records[0].sensitivity, hand_label_free_scores(model, data), rtol=1e-4, atol=1e-9)
    few = data[:5]  # 3 chunks: 1, 2 and 2 samples
    records = scored_records(OutputChangeSensitivity(), model, few, torch.randint(0, 5, (5,)), 1)
    torch.testing.assert_close(records[0].sensitivity, hand_label_free_scores(model, few), rtol=1e-4, atol=1e-9)
    other = scored_records(OutputChangeSensitivity(seed=1), model, few, torch.randint(0, 5, (5,)), 1)
    assert not torch.allclose(other[0].sensitivity, records[0].sensitivity)  # the seed picks the directions


class CountingForward(nn.Module):
    """Wraps a model and counts the samples it runs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += x.shape[0]
        return self.inner(x)


def test_the_fallback_on_random_labels_runs_each_sample_through_the_model_once() -> None:
    model = tiny_model()
    data = torch.randn(12, 3, 8, 8)
    counting = CountingForward(model).eval()
    graph = build_channel_graph(counting, data)
    counting.samples = 0
    method = TaylorLossSensitivity()
    method.setup_initialization((counting, graph), [data, torch.randn(12, 5)], 2)
    method.get_sensitivity(records_for(graph))
    assert method.notes and "look unrelated" in method.notes[0]
    assert counting.samples == 12  # one forward per chunk, its graph reused by the label-free backward


def test_one_hot_labels_that_do_not_follow_the_outputs_fall_back_and_labels_near_the_outputs_count_as_them() -> None:
    model = tiny_model()
    data = torch.randn(16, 3, 8, 8)
    one_hot = F.one_hot(torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(1)), 5).float()
    _, method = score(model, data, one_hot)
    assert method.notes and "look unrelated" in method.notes[0]  # a random model's logits ignore the classes
    with torch.no_grad():
        own = model(data)
    # The model's own outputs computed in other batches differ by rounding, which leaves an L1 gradient of noise
    scores, method = score(model, data, own * (1 + 1e-6 * torch.randn(16, 5)))
    assert method.notes and "own outputs" in method.notes[0]
    zero_loss, _ = score(model, data, own)
    torch.testing.assert_close(scores["0"], zero_loss["0"])
    _, method = score(model, data, own + 0.05 * own.std() * torch.randn(16, 5))  # a close fit is a fit
    assert not method.notes


def test_group_taylor_falls_back_to_element_wise_label_free_terms() -> None:
    from acps_sensitivity_taylor import GroupTaylorSensitivity

    model = tiny_model()
    data = torch.randn(8, 3, 8, 8)
    records = scored_records(GroupTaylorSensitivity(terms="all"), model, data, torch.randn(8, 5), 1)
    params = [model[0].weight, model[0].bias, model[1].weight, model[1].bias, model[3].weight]
    from acps_sensitivity_taylor.taylor import _generator

    total = torch.zeros(6, dtype=torch.float64)
    for n in range(0, 8, 2):  # 8 samples: 4 chunks of two
        directions = torch.stack([torch.randn(5, generator=_generator(0, 0, n + i)) for i in range(2)])
        grads = torch.autograd.grad((model(data[n:n + 2]) * directions).sum() / 8, params)
        w0, b0, g1, b1, w3 = ((p.detach() * g).abs() for p, g in zip(params, grads))
        total += (w0.sum(dim=(1, 2, 3)) + b0 + g1 + b1 + w3.sum(dim=(0, 2, 3))).double().pow(2)
    expected = total.sqrt()
    torch.testing.assert_close(records[0].sensitivity, expected / expected.mean(), rtol=1e-4, atol=1e-8)


def test_a_model_returning_a_dict_is_checked_and_projected_on_its_logits() -> None:
    class DictOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_model()

        def forward(self, x: torch.Tensor) -> dict:
            return {"hidden": x.mean((1, 2, 3)), "logits": self.inner(x)}

    wrapped = DictOutput().eval()
    data = torch.randn(8, 3, 8, 8)
    graph = build_channel_graph(wrapped, data)
    method = TaylorLossSensitivity()
    method.setup_initialization((wrapped, graph), [data, torch.randn(8, 5)], 1)
    records = records_for(graph)
    method.get_sensitivity(records)
    assert method.notes and "look unrelated" in method.notes[0]
    from acps_sensitivity_taylor import OutputChangeSensitivity

    plain = scored_records(OutputChangeSensitivity(), wrapped.inner, data, torch.randint(0, 5, (8,)), 1)
    torch.testing.assert_close(records[0].sensitivity, plain[0].sensitivity)


def test_the_old_bool_normalize_gives_the_same_scores_as_its_unified_spelling_with_a_deprecation_warning() -> None:
    from acps_sensitivity_taylor import NormalizedTaylorSensitivity

    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    with pytest.warns(DeprecationWarning, match="normalize=True is deprecated; write normalize='mean'"):
        old, method = score(model, data, label, normalize=True)
    unified, _ = score(model, data, label, normalize="mean")
    with pytest.warns(DeprecationWarning, match="write normalize='none'"):
        off, _ = score(model, data, label, normalize=False)
    plain, _ = score(model, data, label)
    assert method.options.normalize == "mean" and method.normalize == "mean"
    for name in plain:
        torch.testing.assert_close(old[name], unified[name], rtol=0, atol=0)
        torch.testing.assert_close(off[name], plain[name], rtol=0, atol=0)
    normalized = {r.name: r.sensitivity for r in scored_records(NormalizedTaylorSensitivity(), model, data, label, 1)}
    torch.testing.assert_close(normalized["0"], unified["0"], rtol=0, atol=0)


def test_group_taylor_normalize_none_keeps_the_raw_sums() -> None:
    from acps_sensitivity_taylor import GroupTaylorSensitivity

    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    records = scored_records(GroupTaylorSensitivity(normalize="none", terms="all"), model, data, label, 1)
    torch.testing.assert_close(records[0].sensitivity, elementwise_hand_scores(model, data, label), rtol=1e-4,
                               atol=1e-8)


def test_output_change_honours_normalize() -> None:
    from acps_sensitivity_taylor import OutputChangeSensitivity

    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    raw = scored_records(OutputChangeSensitivity(), model, data, label, 1)[0].sensitivity
    by_mean = scored_records(OutputChangeSensitivity(normalize="mean"), model, data, label, 1)[0].sensitivity
    torch.testing.assert_close(by_mean, raw / raw.mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_products_are_summed_in_float32(dtype: torch.dtype) -> None:
    # Every weight is 1 and every gradient 1 (the loss is the output's sum): the producer row of 4097 entries sums
    # to 4097, which bfloat16 and float16 round to 4096, and the consumer's column adds the hidden value, 4096
    # in the model's own precision.
    model = nn.Sequential(nn.Linear(4097, 2, bias=False), nn.Linear(2, 1, bias=False)).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0)
    data = torch.ones(1, 4097, dtype=dtype)

    scores, _ = score(model, data, torch.zeros(1, 1, dtype=dtype), loss_func=lambda output, _: output.sum())

    assert scores["0"].tolist() == [4097.0 + 4096.0] * 2


def test_scoring_streams_the_gradients_and_leaves_the_users_grad_as_it_was(monkeypatch) -> None:
    import weakref

    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    expected = hand_scores(model, data, label, F.cross_entropy)
    leftover = torch.full_like(model[0].weight, 7.0)
    model[0].weight.grad = leftover
    seen: list[weakref.ref] = []
    alive: list[int] = []  # how many earlier gradients are still held each time one's terms are taken
    add_terms = TaylorLossSensitivity._add_terms

    def watched(self, terms, uses, param, grad, buffers):
        alive.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(grad))
        return add_terms(self, terms, uses, param, grad, buffers)

    monkeypatch.setattr(TaylorLossSensitivity, "_add_terms", watched)
    scores, _ = score(model, data, label)
    torch.testing.assert_close(scores["0"], expected, rtol=1e-4, atol=1e-7)
    assert model[0].weight.grad is leftover and bool((leftover == 7.0).all())
    assert all(p.grad is None for p in model.parameters() if p is not model[0].weight)
    assert len(alive) > 3 and max(alive) <= 1  # each gradient is dropped once its terms are taken


def test_the_users_own_post_accumulate_hooks_stay_out_of_scoring() -> None:
    model = tiny_model()
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    expected = hand_scores(model, data, label, F.cross_entropy)
    stepped: list[str] = []

    def optimizer_in_backward(param: torch.Tensor) -> None:  # would clear the gradient scoring needs
        stepped.append("step")
        param.grad = None

    model[0].weight.register_post_accumulate_grad_hook(optimizer_in_backward)
    scores, _ = score(model, data, label)
    torch.testing.assert_close(scores["0"], expected, rtol=1e-4, atol=1e-7)
    assert stepped == []
    F.cross_entropy(model(data), label).backward()
    assert stepped == ["step"]  # still registered
