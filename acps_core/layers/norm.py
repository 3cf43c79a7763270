"""Followers: layers with one parameter per channel of their input, which they pass on unchanged.

``BatchNorm`` and ``InstanceNorm`` (weight, bias and running statistics per channel of dim 1), ``GroupNorm`` (in
whole norm groups), ``LayerNorm`` over the channels (the last dim; its statistics then cover the kept channels
only, which masking reproduces) and a per-channel ``PReLU``.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from acps_core.errors import ArgumentError
from acps_core.layers.base import STATISTICS, LayerAdapter, plain_subclass, take, take_buffer

_SETTINGS = {"approximate_norms": True}


def approximate_norms(allowed: bool) -> None:
    """Whether channels that a norm over the channels normalises (a LayerNorm; ``F.layer_norm`` or ``F.rms_norm``
    over them) may be pruned, from now on. Pruned, such a norm normalises over the kept channels: its mean and
    variance are those of fewer channels, which zeroing the removed channels in the unpruned model does not
    compute, so the Taylor scores of those channels are an approximation, and the re-fit of ``calibration_data``
    is what repairs the difference. ``True`` (the default) prunes them, and the search's report names them;
    ``False`` leaves them alone, with that reason. RMS norms written as modules (``LlamaRMSNorm``) are pruned
    exactly either way (:mod:`acps_core.layers.mean_norm`). Set it before the search and keep it for
    ``create_prune_retrain_model``: the channel groups depend on it.

    Raises:
        ArgumentError: ``allowed`` is not a bool.
    """
    if not isinstance(allowed, bool):
        raise ArgumentError(f"approximate_norms takes True or False, got {allowed!r}")
    _SETTINGS["approximate_norms"] = allowed


def approximate_norms_allowed() -> bool:
    """The setting of :func:`approximate_norms`."""
    return _SETTINGS["approximate_norms"]


def approximation_refused(where: str) -> str:
    """The reason a group normalised by a norm over its channels is left alone under ``approximate_norms(False)``."""
    return (f"{where} normalises over these channels, and pruned it would normalise over the kept ones only "
            "(not what zeroing them computes); acps_core.layers.approximate_norms(False) leaves such channels alone")

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
                                           nn.InstanceNorm2d, nn.InstanceNorm3d)


class FollowerAdapter(LayerAdapter):
    """A module that follows its input channels one to one along dim 1."""

    role = "follower"
    types: tuple[type[nn.Module], ...] = ()

    def traced_whole(self, module: nn.Module) -> bool:
        return plain_subclass(module, self.types, {"weight", "bias"}, STATISTICS)

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return []


class BatchNormAdapter(FollowerAdapter):
    """``nn.BatchNorm1d/2d/3d`` and ``nn.InstanceNorm1d/2d/3d``: weight, bias and running statistics."""

    types = NORM_TYPES

    def out_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).num_features)

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        norm = cast(Any, module)
        if norm.affine:
            norm.weight = take(norm.weight, 0, index)
            norm.bias = take(norm.bias, 0, index)
        if norm.track_running_stats and norm.running_mean is not None:
            norm.running_mean = take_buffer(norm.running_mean, index)
            norm.running_var = take_buffer(norm.running_var, index)
        norm.num_features = len(index)


class GroupNormAdapter(FollowerAdapter):
    """``nn.GroupNorm``: its channels go in whole norm groups (the graph makes the group keep whole units)."""

    types = (nn.GroupNorm,)

    def follow_unit(self, module: nn.Module) -> int:
        norm = cast(Any, module)
        return int(norm.num_channels // norm.num_groups)

    def out_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).num_channels)

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        norm = cast(Any, module)
        per_group = norm.num_channels // norm.num_groups
        norm.weight = take(norm.weight, 0, index)
        norm.bias = take(norm.bias, 0, index)
        norm.num_channels = len(index)
        norm.num_groups = len(index) // per_group  # whole norm groups go (the graph made sure)


class LayerNormAdapter(FollowerAdapter):
    """``nn.LayerNorm`` over the last dim (the channels there follow); over several dims, the channels in them
    are mixed and cannot be pruned. Pruned, it normalises over the kept channels: an approximation of zeroing
    the removed ones (see :func:`approximate_norms`)."""

    types = (nn.LayerNorm,)
    approximate = True

    def input_dim(self, module: nn.Module, ndim: int) -> int:
        return ndim - 1

    def mixed_dims(self, module: nn.Module, ndim: int) -> set[int]:
        normalized = len(cast(Any, module).normalized_shape)
        return set(range(ndim - normalized, ndim)) if normalized > 1 else set()

    def out_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).normalized_shape[0])

    def masked_output(self, module: nn.Module, removed: Set[int]) -> Callable[..., Any] | None:
        """Normalise over the kept channels only: the removed ones change the mean and variance."""
        total = int(cast(Any, module).normalized_shape[0])
        kept_index = torch.tensor([p for p in range(total) if p not in removed], dtype=torch.long)

        def kept_statistics(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                            output: torch.Tensor) -> torch.Tensor:
            norm: Any = layer
            x = args[0] if args else kwargs["input"]
            index = kept_index.to(output.device)
            weight = None if norm.weight is None else norm.weight[index]
            bias = None if norm.bias is None else norm.bias[index]
            out = torch.zeros_like(output)
            out[..., index] = F.layer_norm(x[..., index], (len(index),), weight, bias, norm.eps)
            return out

        return kept_statistics

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        norm = cast(Any, module)
        norm.weight = take(norm.weight, 0, index)
        norm.bias = take(norm.bias, 0, index)
        norm.normalized_shape = (len(index),)


class PReLUAdapter(FollowerAdapter):
    """``nn.PReLU``: one slope per channel of dim 1, or one shared slope (then element-wise)."""

    types = (nn.PReLU,)

    def follows(self, module: nn.Module) -> bool:
        return int(cast(Any, module).num_parameters) != 1

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int | tuple[int, ...]]]:
        return [("weight", 0, 0)]

    def out_size(self, module: nn.Module) -> int:
        return int(cast(Any, module).num_parameters)

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        prelu = cast(Any, module)
        prelu.weight = take(prelu.weight, 0, index)
        prelu.num_parameters = len(index)
