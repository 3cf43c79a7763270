"""Measured sensitivity: how much the model's output really changes when a group loses its weakest channels.

First-order scores (Taylor, Fisher, output change) estimate the effect of removing one channel at a time and
add them up; they mislead the search exactly where it matters, when a layer loses half its channels or more.
This method measures instead. For every channel group it orders the channels by filter L2 norm (weakest first,
in whole atoms), removes the first ``n`` atoms for a few ``n`` up to the most the search may remove, runs the
calibration samples through the model with those channels masked, and records how far the output moved from
the unpruned model's output: the KL divergence of the softmax for ``(N, classes)`` outputs, else the squared
error relative to the output's mean square (or, with ``loss_func``, the increase of that loss). BatchNorm
layers use the statistics of the calibration batch while measuring, as they will once recalibrated or
fine-tuned after pruning; their running statistics are left as they were.

The measured curve is interpolated between the measured points and made convex (pool-adjacent-violators on its
increments), then spread over the channels: the k-th weakest atom scores the curve's k-th increment. The sum of
the scores of the channels a search removes from a group is then the measured change, so a knapsack or greedy
search compares groups on what their cuts really cost, and removes channels in filter-norm order. It is the
layer-wise sensitivity analysis of Han et al., "Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS 2015, and of NetAdapt (Yang et al., ECCV 2018), here per coupled channel group.

Cost: ``levels`` masked forward passes over at most ``max_samples`` calibration samples per group.

Across ``torch.distributed`` ranks the samples are the first ``max_samples`` of the union of every rank's first
pass, in rank order, gathered to every rank: every rank measures what one process would, and gives its scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from acps_core import DataError
from acps_core.plugin import (
    Communicator,
    MethodOptions,
    SearchRecord,
    SensitivityBase,
    channel_atoms,
    forward,
    masked_channels,
    primary_output,
    progress,
    to_device,
    trace_sample,
)
from acps_sensitivity_taylor.norm import filter_norms

#: Below this many calibration samples the batch statistics are too noisy: BatchNorm keeps its running ones.
MIN_BATCH_FOR_STATISTICS = 16


class MeasuredSensitivity(SensitivityBase):
    """Channel importance from the measured output change of removing a group's weakest channels (see the module
    docs).

    Args:
        loss_func: ``loss_func(output, label) -> scalar``; by default the distance to the unpruned output.
        levels: how many cut depths are measured per group (at least 1).
        max_samples: calibration samples used for each measurement (the first ones; at least 1).

    Raises:
        MethodOptionsError: ``levels`` or ``max_samples`` is not an integer of at least 1 (an ``ArgumentError``).
    """

    class Options(MethodOptions):
        """The options of :class:`MeasuredSensitivity` (see its arguments)."""

        levels: int = Field(default=4, ge=1)
        max_samples: int = Field(default=128, ge=1)

    def __init__(self, loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None = None, levels: int = 4,
                 max_samples: int = 128) -> None:
        super().__init__(loss_func)
        self.options = self.Options.checked(self, levels=levels, max_samples=max_samples)
        self.levels = self.options.levels
        self.max_samples = self.options.max_samples

    def get_sensitivity(self, search_records: list[SearchRecord]) -> None:
        """Set ``record.sensitivity`` for every record (see the module docs)."""
        assert self.model is not None and self.graph is not None, "setup_initialization was not called"
        model, graph = self.model, self.graph
        data, label = self._first_samples()
        with torch.no_grad():
            reference = _first_tensor(forward(model, data))
            samples = reference.shape[0] if reference.dim() else 1
            with _batch_statistics(model, samples >= MIN_BATCH_FOR_STATISTICS):
                distance = self._distance_to(reference, label)
                baseline = distance(forward(model, data))
                for record in progress(search_records, "MeasuredSensitivity: channel groups", len(search_records)):
                    norms = filter_norms(model, graph, record)
                    atoms = channel_atoms(record.channels, record.unit, record.blocks, norms, record.aligned)
                    removable = (record.channels - min(record.allowed_kept)) // len(atoms[0])
                    measured = {}
                    for depth in sorted({-(-removable * i // self.levels) for i in range(1, self.levels + 1)}):
                        removed = {c for atom in atoms[:depth] for c in atom}
                        keep = {record.group_id: [c for c in range(record.channels) if c not in removed]}
                        with masked_channels(model, graph, keep):
                            measured[depth] = max(0.0, distance(forward(model, data)) - baseline)
                    record.sensitivity = _spread(atoms, record.channels, measured, norms)

    def _first_samples(self) -> tuple[Any, torch.Tensor]:
        """The first ``max_samples`` samples of the first calibration pass: of the union of every rank's first
        pass (in rank order) under ``torch.distributed``, on every rank, as one process would take them."""
        data, label = self.calibration_batches()[0]
        data, label = trace_sample(data, self.max_samples), trace_sample(label, self.max_samples)
        comm = Communicator.current()
        if not comm.distributed:
            return data, label
        device = label.device
        # Each rank sends at most max_samples of its own; the union's first max_samples are among them.
        parts = comm.gather(to_device((data, label), torch.device("cpu")))
        data, label = to_device(trace_sample(_concatenated(parts), self.max_samples), device)
        return data, label

    def _distance_to(self, reference: torch.Tensor, label: Any) -> Callable[[Any], float]:
        """How far an output is from the unpruned model's (or, with ``loss_func``, its loss)."""
        if self.loss_func is not None:
            loss_func = self.loss_func
            return lambda output: _finite(float(loss_func(output, label)))
        if reference.dim() == 2 and reference.is_floating_point() and reference.shape[1] > 1:
            target = F.log_softmax(reference.double(), dim=1)
            return lambda output: _finite(float(F.kl_div(F.log_softmax(_first_tensor(output).double(), dim=1),
                                                         target, log_target=True, reduction="batchmean")))
        scale = float(reference.double().pow(2).mean()) or 1.0
        return lambda output: _finite(float((_first_tensor(output).double() - reference.double()).pow(2).mean())
                                      / scale)


def _first_tensor(output: Any) -> torch.Tensor:
    """The output tensor measured: the model's output, or the one the default loss would read in a dict,
    ``ModelOutput`` or tuple (its logits, else its first tensor)."""
    found, _ = primary_output(output)
    if found is None:
        raise DataError(f"MeasuredSensitivity needs a model that returns a tensor (or a dict, ModelOutput or tuple "
                        f"holding one); this one returns a {type(output).__name__} holding none")
    return found


def _concatenated(parts: list[Any]) -> Any:
    """The ranks' parts (the same structure of tensors on each) joined along the batch dimension, in order."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.dim() else first
    if isinstance(first, (tuple, list)):
        return type(first)(_concatenated([part[i] for part in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: _concatenated([part[key] for part in parts]) for key in first}
    return first


def _finite(value: float) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        raise DataError(f"the model's output distance on the calibration data is {value}; check the data for "
                        "NaN/Inf")
    return value


@contextmanager
def _batch_statistics(model: nn.Module, enabled: bool) -> Iterator[None]:
    """BatchNorm layers normalise with the batch's statistics inside the block; their running statistics, modes
    and counters are as before afterwards."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if enabled else []
    saved = [(m, m.training, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    for norm in norms:
        norm.train()
        norm.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for norm, training, momentum, tracked in saved:
            norm.train(training)
            norm.momentum = momentum
            if tracked is not None and norm.num_batches_tracked is not None:
                norm.num_batches_tracked.copy_(tracked)


def _spread(atoms: list[list[int]], channels: int, measured: dict[int, float], norms: torch.Tensor) -> torch.Tensor:
    """Per-channel scores whose sums over the first ``n`` atoms follow the measured curve (interpolated, made
    convex), non-decreasing along the atoms so that the removal order stays the filter-norm order."""
    if not measured:  # nothing may be removed: the norms order the channels
        return norms
    points = [(0, 0.0), *sorted(measured.items())]
    increments = []
    for (start, low), (stop, high) in zip(points, points[1:]):
        increments += [(high - low) / (stop - start)] * (stop - start)
    increments += [increments[-1]] * (len(atoms) - len(increments))  # beyond the deepest cut: its slope
    increments = _non_decreasing(increments)
    top = max(max(increments), 1e-30)
    scores = torch.zeros(channels, dtype=torch.float64)
    for index, atom in enumerate(atoms):
        # A vanishing ramp keeps the order of equal increments (and makes zero ones positive).
        scores[atom] = (increments[index] + top * 1e-9 * (index + 1)) / len(atom)
    return scores


def _non_decreasing(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators): same total."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * count) / (blocks[-1][1] + count),
                          blocks[-1][1] + count]
    return [mean for mean, count in blocks for _ in range(int(count))]
