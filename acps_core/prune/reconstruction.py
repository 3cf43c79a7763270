"""Layer reconstruction: the layers that read pruned channels are re-fitted to what they read before.

Removing channels takes away part of the input of every layer that consumed them. The channels that remain are
usually correlated with the removed ones, so the lost part can largely be rebuilt from them. For each such
layer, a few real input samples are run through the unpruned model and through the pruned one, and a linear map
``M`` is fitted by least squares from the pruned input (the kept channels, as the pruned model now computes them)
to the unpruned input (all original channels): ``x_unpruned ~= M x_pruned`` at every position. The layer's new
weight is its unpruned weight composed with ``M``, so it computes, from the kept channels, as nearly as possible
what it computed from all of them. This is exact for any Conv (groups 1) or Linear layer, because they mix
channels linearly at each position; the same least-squares idea is the channel pruning of He et al. (ICCV 2017)
and ThiNet (Luo et al., ICCV 2017), here solved in closed form on the layer's input.

The fit is regularised towards plain pruning (``M`` = the selection of the kept channels), with a weight that
grows with the number of channels over the number of positions sampled, so that a layer seen on few rows (a
classifier reading one vector per sample) stays close to its pruned weights instead of over-fitting the
samples; a layer seen at fewer positions than it keeps channels is left as pruned. Where the positions are few
for the channels (under ``CROSS_VALIDATE_BELOW`` per kept channel: a transformer's MLP seen on a few hundred
tokens) and the samples are enough to split (``CROSS_VALIDATE_SAMPLES``), the strength is chosen on the data:
each half of the positions (the first and the second half of the samples) is fitted at every strength of
``STRENGTHS`` and judged on the other half, and plain pruning is judged too; the best one is used, and when plain
pruning wins the layer is left as pruned. Layers are re-fitted in
forward order within one pass, so each one sees its input after the layers before it were re-fitted; the
BatchNorm correction (:mod:`acps_core.prune.norm_correction`) runs in the same pass.

Left as pruned: a grouped (not depthwise: that one is a follower, pruned with its group) convolution, a layer
the forward pass calls more than once or whose weight another module shares, a ``MultiheadAttention`` (its out
projection is applied as a function, so no hook sees its input), and a layer with more than ``MAX_CHANNELS``
input channels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Set
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from acps_core._util.data import forward, input_hooks
from acps_core._util.model_checks import parameter_owners
from acps_core.layers.base import adapter_for
from acps_core.layers.conv import MAX_REFIT_CHANNELS

logger = logging.getLogger(__name__)

#: A layer with more input channels than this is left as pruned (the fit solves a square system of the kept ones
#: and keeps the unpruned input at up to 8 positions per channel); the layer adapters apply it.
MAX_CHANNELS = MAX_REFIT_CHANNELS
#: Positions sampled per layer: at least this many, or ``ROWS_PER_CHANNEL`` per original input channel.
MIN_ROWS = 4096
ROWS_PER_CHANNEL = 8
#: A layer seen at fewer positions than this per kept input channel is left as pruned: the fit would rest on the
#: regularisation alone (measured on digits: with 2 calibration images, fitting such layers cost 15-20 points).
MIN_ROWS_PER_KEPT = 1
#: The regularisation towards plain pruning is this times (kept channels / sampled positions), relative to each
#: kept channel's energy: negligible for a convolution seen at thousands of positions, strong for a classifier
#: seen once per sample.
PRIOR_STRENGTH = 8.0
#: A layer seen at fewer positions than this per kept input channel gets its strength by cross-validation.
CROSS_VALIDATE_BELOW = 32
#: ... when the calibration data has at least this many samples (measured on digits: with 2 images, halves of
#: one image each chose worse than the fixed strength, by 1.5-3 points; with 16 and 64 better, by up to 7).
CROSS_VALIDATE_SAMPLES = 8
#: The strengths tried there, as multiples of ``PRIOR_STRENGTH``.
STRENGTHS = (0.25, 1.0, 4.0, 16.0, 64.0, 256.0)


@dataclass
class LayerInput:
    """A layer's input in the unpruned model at the sampled positions."""

    rows: torch.Tensor | None  # which positions (indices into the flattened non-channel dimensions); None: all
    values: torch.Tensor  # (positions, channels) float32 on the CPU
    finite: bool = True  # whether every position of the input was finite (not only the sampled ones)


def reconstructible(module: nn.Module) -> bool:
    """Whether :func:`reconstructing` can re-fit ``module``: its layer adapter says it mixes its input channels
    linearly at each position (a Linear, a Conv with one group) and is not too wide to solve for."""
    adapter = adapter_for(module)
    return adapter is not None and adapter.role == "layer" and adapter.refittable(module)


def _channels_last(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The input as (positions, channels), as the layer's adapter lays it out."""
    adapter = adapter_for(module)
    assert adapter is not None
    return adapter.input_rows(module, x)


def _row_sample(count: int, channels: int) -> torch.Tensor | None:
    """Indices of the positions to fit on (a fixed draw, so both passes take the same), or None for all."""
    wanted = max(MIN_ROWS, ROWS_PER_CHANNEL * channels)
    if count <= wanted:
        return None
    generator = torch.Generator().manual_seed(count)
    return torch.randperm(count, generator=generator)[:wanted].sort().values


@contextmanager
def recording_layer_inputs(model: nn.Module, layers: Set[str]) -> Iterator[dict[str, LayerInput]]:
    """Within the block, the forward pass of the calibration data through ``model`` (in eval mode) records the
    inputs of ``layers`` at a fixed sample of positions; on exit the yielded dict holds them for the layers
    :func:`reconstructible`, whose weight is their own and which the pass called exactly once. Lets the
    measurement share a forward pass with another one (the BatchNorm statistics')."""
    seen: dict[str, list[LayerInput]] = {}
    # A weight another module holds too (tied weights) is left alone: re-fitting it would change the other.
    owners = parameter_owners(model)
    names = {name for name in layers if reconstructible(model.get_submodule(name))
             and len(owners.get(id(model.get_submodule(name).weight), [])) < 2}

    def record(name: str, module: nn.Module, x: torch.Tensor) -> None:
        values = _channels_last(x, module)
        rows = _row_sample(values.shape[0], values.shape[1])
        picked = values if rows is None else values[rows.to(values.device)]
        finite = bool(torch.isfinite(values).all()) if values.is_floating_point() else True
        seen.setdefault(name, []).append(LayerInput(rows, picked.float().cpu(), finite))

    measured: dict[str, LayerInput] = {}
    with input_hooks(model, names, record):
        yield measured
    measured.update({name: calls[0] for name, calls in seen.items() if len(calls) == 1})


def measure_layer_inputs(model: nn.Module, layers: Set[str], data: Any) -> dict[str, LayerInput]:
    """:func:`recording_layer_inputs` over one forward pass of ``data``."""
    with recording_layer_inputs(model, layers) as measured, torch.no_grad():
        forward(model, data)
    return measured


def _selection(channels: int, removed: Set[int]) -> torch.Tensor:
    """(kept, channels) float64: row ``j`` picks the ``j``-th kept channel."""
    kept = [c for c in range(channels) if c not in removed]
    selection = torch.zeros(len(kept), channels, dtype=torch.float64)
    selection[torch.arange(len(kept)), torch.tensor(kept, dtype=torch.long)] = 1.0
    return selection


@dataclass
class _Moments:
    """The sums a least-squares fit of ``X_u`` on ``X_p`` needs: ``X_p^T X_p``, ``X_p^T X_u``, ``|X_u|^2`` and the
    number of rows (float64)."""

    gram: torch.Tensor
    cross: torch.Tensor
    energy: float
    rows: int

    @classmethod
    def of(cls, pruned_input: torch.Tensor, unpruned_input: torch.Tensor) -> _Moments:
        pruned, unpruned = pruned_input.double(), unpruned_input.double()
        return cls(pruned.T @ pruned, pruned.T @ unpruned, float(unpruned.square().sum()), pruned.shape[0])

    def solve(self, selection: torch.Tensor, strength: float) -> torch.Tensor:
        """``M^T`` (kept x original channels) of :func:`fit_input_map`."""
        # Each kept channel's coefficients are held towards the selection in proportion to its own energy, so
        # the fit does not depend on the channels' scales; a silent channel (energy 0) keeps its selection.
        energy = self.gram.diagonal()
        kept = self.gram.shape[0]
        weight = torch.where(energy > 0, (strength * kept / self.rows) * energy, torch.ones_like(energy))
        solved: torch.Tensor = torch.linalg.solve(self.gram + torch.diag(weight),
                                                  self.cross + weight[:, None] * selection)
        return solved

    def error(self, map_t: torch.Tensor) -> float:
        """``|X_u - X_p M^T|^2`` for ``map_t`` = ``M^T``, from the sums alone."""
        return self.energy - 2 * float((self.cross * map_t).sum()) + float(((self.gram @ map_t) * map_t).sum())


def fit_input_map(pruned_input: torch.Tensor, unpruned_input: torch.Tensor, removed: Set[int],
                  strength: float = PRIOR_STRENGTH) -> torch.Tensor:
    """``M`` (original channels x kept channels, float64) minimising
    ``|X_u - X_p M^T|^2 + sum_j l_j |M[:, j] - S[:, j]|^2`` for the inputs ``X_p`` (positions x kept) and ``X_u``
    (positions x original) and the selection ``S`` of the kept channels, where ``l_j`` is ``strength`` times kept
    channels over positions times the energy ``|X_p[:, j]|^2`` of kept channel ``j``."""
    selection = _selection(unpruned_input.shape[1], removed)
    return _Moments.of(pruned_input, unpruned_input).solve(selection, strength).T


def chosen_strength(pruned_input: torch.Tensor, unpruned_input: torch.Tensor, removed: Set[int]) -> float | None:
    """The strength of :func:`fit_input_map` that predicts best on positions it was not fitted on: each half of
    the rows is fitted at every strength of ``STRENGTHS`` and its squared error measured on the other half, beside
    plain pruning's. None when plain pruning is best (then the layer is better left as pruned)."""
    half = pruned_input.shape[0] // 2
    first = _Moments.of(pruned_input[:half], unpruned_input[:half])
    second = _Moments.of(pruned_input[half:], unpruned_input[half:])
    selection = _selection(unpruned_input.shape[1], removed)
    errors: dict[float | None, float] = {None: first.error(selection) + second.error(selection)}
    for multiple in STRENGTHS:
        strength = multiple * PRIOR_STRENGTH
        errors[multiple] = (second.error(first.solve(selection, strength))
                            + first.error(second.solve(selection, strength)))
    best = min(errors, key=lambda key: errors[key])
    return None if best is None else best * PRIOR_STRENGTH


def _folded(weight: torch.Tensor, input_map: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The unpruned weight (kept outputs) composed with the input map: reads the kept channels."""
    adapter = adapter_for(module)
    assert adapter is not None
    return adapter.fold_input_map(module, weight, input_map)


@contextmanager
def reconstructing(pruned: nn.Module, unpruned_weights: Mapping[str, torch.Tensor],
                   unpruned_inputs: Mapping[str, LayerInput], removed_inputs: Mapping[str, Set[int]],
                   removed_outputs: Mapping[str, Set[int]], samples: int = 0) -> Iterator[list[str]]:
    """Within the block, every forward pass of the same data as ``unpruned_inputs`` were measured on re-fits the
    measured layers of ``pruned`` before they run (see the module docs); yields the names of the layers
    re-fitted so far.

    Args:
        pruned: the pruned model, in eval mode, owning its parameters (changed in place).
        unpruned_weights: per layer, its weight in the unpruned model (all outputs, all inputs).
        unpruned_inputs: :func:`measure_layer_inputs` of the unpruned model.
        removed_inputs: per layer, the input channel positions the pruning removed.
        removed_outputs: per layer, the output channels the pruning removed from it (if any).
        samples: how many samples the data holds (the strength is cross-validated only with enough of them).
    """
    done: list[str] = []
    cross_validate = samples >= CROSS_VALIDATE_SAMPLES

    def refit(name: str, module: nn.Module, x: torch.Tensor) -> None:
        measured = unpruned_inputs[name]
        values = _channels_last(x, module)
        if measured.rows is not None:
            if values.shape[0] <= int(measured.rows[-1]):
                return  # not the positions measured before (cannot happen for the same data)
            values = values[measured.rows.to(values.device)]
        removed = removed_inputs.get(name, set())
        if values.shape[0] != measured.values.shape[0] or values.shape[1] + len(removed) != measured.values.shape[1]:
            return
        if values.shape[0] < MIN_ROWS_PER_KEPT * values.shape[1]:
            logger.info("layer %r: %d positions for %d kept channels are too few to fit on; left as pruned", name,
                        values.shape[0], values.shape[1])
            return
        weight = cast(torch.Tensor, module.weight)
        values = values.float().cpu()
        try:
            strength = PRIOR_STRENGTH
            if cross_validate and values.shape[0] < CROSS_VALIDATE_BELOW * values.shape[1]:
                chosen = chosen_strength(values, measured.values, removed)
                if chosen is None:
                    logger.info("layer %r: plain pruning predicts its input on held-out positions better than a "
                                "re-fit; left as pruned", name)
                    return
                strength = chosen
            input_map = fit_input_map(values, measured.values, removed, strength)
        except torch.linalg.LinAlgError:  # type: ignore[attr-defined]
            input_map = None
        if input_map is None or not torch.isfinite(input_map).all():
            logger.warning("layer %r: no finite least-squares fit of its input on calibration_data; left as pruned",
                           name)
            return
        original = unpruned_weights[name]
        gone = removed_outputs.get(name, set())
        if gone:
            original = original[[o for o in range(original.shape[0]) if o not in gone]]
        folded = _folded(original.detach().cpu(), input_map, module)
        if folded.shape != weight.shape or not torch.isfinite(folded.to(weight.dtype)).all():
            logger.warning("layer %r: its re-fitted weight does not fit its shape or dtype; left as pruned", name)
            return
        with torch.no_grad():
            weight.copy_(folded.to(weight.device, weight.dtype))
        done.append(name)

    names = {n for n in unpruned_inputs if removed_inputs.get(n)}
    with input_hooks(pruned, names, refit):
        yield done
