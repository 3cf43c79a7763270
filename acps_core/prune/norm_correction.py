"""BatchNorm running statistics that follow the pruning.

Removing channels changes what the layers after them compute, but a BatchNorm's running mean and variance still
describe the unpruned model, so the pruned model is much worse before fine-tuning than its channel choice
deserves: often near chance, for every pruning method. The correction fixes that from a few real input samples.
Each BatchNorm's input is measured on the same samples twice, in the unpruned model (:func:`measure_norm_inputs`)
and in the pruned one (:func:`correct_norm_statistics`), and its running statistics move by the difference: the
running mean by the shift of the batch mean, the running variance by the ratio of the batch variances. Because
only the change is estimated, not the statistics themselves, a handful of samples is enough. The norms are
corrected in the order the forward pass reaches them, within one pass, so each one sees its input after the norms
before it were corrected. This is the batch-normalisation recalibration that EagleEye (Li et al., ECCV 2020) found
to rank pruned candidates by their accuracy after fine-tuning, made relative to the unpruned statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Set
from typing import Any

import torch
from torch import nn

from acps_core._util.data import forward, input_hooks

logger = logging.getLogger(__name__)

#: A channel whose unpruned batch variance is below this keeps its running variance (no ratio to take).
_TINY_VARIANCE = 1e-12
#: The least factor a running variance is scaled by (a channel the pruning silences keeps a usable variance).
_MIN_VARIANCE_RATIO = 1e-4

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _tracked_norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            and module.running_mean is not None and module.running_var is not None}


def _batch_statistics(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and variance over every other dimension, as float64 on the CPU (reduced in float32
    on the tensor's device, which every backend supports). The variance is unbiased, as BatchNorm's running
    variance is, so that the ratio stays exact when pruning changes how many values a channel averages over."""
    values = tensor.detach().float().movedim(1, 0).reshape(tensor.shape[1], -1)
    return values.mean(dim=1).double().cpu(), values.var(dim=1, unbiased=values.shape[1] > 1).double().cpu()


def _run_with_norm_hooks(model: nn.Module, data: Any,
                         on_input: Callable[[str, nn.modules.batchnorm._BatchNorm, torch.Tensor], None]) -> None:
    """One forward pass of ``data``; ``on_input(name, norm, input)`` runs before every tracked norm is called
    (however the norm's input is passed)."""
    with input_hooks(model, set(_tracked_norms(model)), on_input), torch.no_grad():
        forward(model, data)


def measure_norm_inputs(model: nn.Module, data: Any) -> Statistics:
    """Per BatchNorm layer of ``model`` (in eval mode) that the forward pass of ``data`` calls exactly once: the
    batch mean and variance of its input per channel."""
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    _run_with_norm_hooks(model, data, lambda name, norm, x: seen.setdefault(name, []).append(_batch_statistics(x)))
    return {name: calls[0] for name, calls in seen.items() if len(calls) == 1}


def correct_norm_statistics(pruned: nn.Module, unpruned: Statistics, removed: Mapping[str, Set[int]],
                            data: Any) -> list[str]:
    """Move the running statistics of the pruned model's BatchNorm layers by how their inputs changed (see the
    module docs); returns the names of the norms whose statistics changed.

    Args:
        pruned: the pruned model, in eval mode, owning its BatchNorm buffers (changed in place).
        unpruned: :func:`measure_norm_inputs` of the unpruned model on the same ``data``.
        removed: per norm whose own channels were pruned, the channel positions removed from it.
        data: the model's input, as measured in the unpruned model.

    A norm the unpruned pass did not measure (called more than once, or not at all) is left as it is. The
    caller checks the unpruned statistics are finite (NaN would spread into the model).
    """
    changed: list[str] = []

    def correct(name: str, norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> None:
        if name not in unpruned:
            return
        old_mean, old_variance = unpruned[name]
        gone = removed.get(name, set())
        if gone:
            kept = torch.tensor([c for c in range(len(old_mean)) if c not in gone], dtype=torch.long)
            old_mean, old_variance = old_mean[kept], old_variance[kept]
        mean, variance = _batch_statistics(x)
        running_mean, running_var = norm.running_mean, norm.running_var
        assert running_mean is not None and running_var is not None
        if mean.shape != old_mean.shape or running_mean.shape != mean.shape:
            return  # not the channels measured before (cannot happen for a norm acps pruned itself)
        ratio = torch.where(old_variance > _TINY_VARIANCE, variance / old_variance.clamp_min(_TINY_VARIANCE),
                            torch.ones_like(variance)).clamp_min(_MIN_VARIANCE_RATIO)
        shift = mean - old_mean
        if not (torch.isfinite(shift).all() and torch.isfinite(ratio).all()):
            logger.warning("BatchNorm layer %r: its input in the pruned model is not finite on calibration_data "
                           "(overflow?); its running statistics are left as they were", name)
            return
        if not (torch.any(shift != 0) or torch.any(ratio != 1)):
            return
        running_mean.add_(shift.to(running_mean.device, running_mean.dtype))
        running_var.mul_(ratio.to(running_var.device, running_var.dtype))
        changed.append(name)

    _run_with_norm_hooks(pruned, data, correct)
    return changed
