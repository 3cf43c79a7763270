"""BatchNorm running statistics that follow the pruning.

Removing channels changes what the layers after them compute, but a BatchNorm's running mean and variance still
describe the unpruned model, so the pruned model is much worse before fine-tuning than its channel choice
deserves: often near chance, for every pruning method. :func:`correct_norm_statistics` fixes that from a few
real input samples. Each BatchNorm's input is measured twice on the same samples, once in the unpruned model and
once with the removed channels masked, and its running statistics move by the difference: the running mean by
the shift of the batch mean, the running variance by the ratio of the batch variances. Because only the change is
estimated, not the statistics themselves, a handful of samples is enough. The norms are corrected in the order
the forward pass reaches them, within one pass, so each one sees its input after the norms before it were
corrected. This is the batch-normalisation recalibration that EagleEye (Li et al., ECCV 2020) found to rank pruned
candidates by their accuracy after fine-tuning, made relative to the unpruned statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from acps_core.data import forward
from acps_core.errors import DataError
from acps_core.graph import ChannelGraph
from acps_core.masking import masked_channels

#: A channel whose unpruned batch variance is below this is left with its running variance (no ratio to take).
_TINY_VARIANCE = 1e-12
#: The least factor a running variance is scaled by (a channel the pruning silences keeps a usable variance).
_MIN_VARIANCE_RATIO = 1e-4


def _tracked_norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            and module.running_mean is not None and module.running_var is not None}


def _batch_statistics(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and population variance over every other dimension, in float64."""
    values = tensor.detach().double().movedim(1, 0).reshape(tensor.shape[1], -1)
    return values.mean(dim=1), values.var(dim=1, unbiased=False)


def correct_norm_statistics(model: nn.Module, graph: ChannelGraph, keep: Mapping[int, Sequence[int]],
                            data: Any) -> list[str]:
    """Move the running statistics of ``model``'s BatchNorm layers to what they would be if group ``g`` kept
    only ``keep[g]`` (see the module docs), measured on the input ``data``; returns the names of the norms
    changed.

    ``model`` must be in eval mode and own its BatchNorm buffers (they are changed in place). A norm the forward
    pass calls more than once, or not at all, is left as it is.
    """
    norms = _tracked_norms(model)
    unpruned: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    calls: dict[str, int] = dict.fromkeys(norms, 0)

    def measure(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            calls[name] += 1
            unpruned[name] = _batch_statistics(args[0])
        return hook

    def correct(name: str) -> Any:
        def hook(module: nn.modules.batchnorm._BatchNorm, args: tuple[Any, ...]) -> None:
            if calls[name] != 1:
                return
            mean, variance = _batch_statistics(args[0])
            old_mean, old_variance = unpruned[name]
            if not (torch.isfinite(mean).all() and torch.isfinite(old_mean).all()
                    and torch.isfinite(variance).all() and torch.isfinite(old_variance).all()):
                raise DataError(f"the input of BatchNorm layer {name!r} holds NaN or Inf on calibration_data: "
                                "pass finite calibration samples, or leave calibration_data out")
            ratio = torch.where(old_variance > _TINY_VARIANCE,
                                variance / old_variance.clamp_min(_TINY_VARIANCE), torch.ones_like(variance))
            running_mean, running_var = module.running_mean, module.running_var
            assert running_mean is not None and running_var is not None
            with torch.no_grad():
                running_mean.add_((mean - old_mean).to(running_mean.dtype))
                running_var.mul_(ratio.clamp_min(_MIN_VARIANCE_RATIO).to(running_var.dtype))
            changed.append(name)
        return hook

    changed: list[str] = []
    for hook_of, masked in ((measure, False), (correct, True)):
        handles = [norm.register_forward_pre_hook(hook_of(name)) for name, norm in norms.items()]
        try:
            with torch.no_grad():
                if masked:
                    with masked_channels(model, graph, keep):
                        forward(model, data)
                else:
                    forward(model, data)
        finally:
            for handle in handles:
                handle.remove()
    return changed
