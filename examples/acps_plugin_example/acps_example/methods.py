"""The two methods of the example plugin.

``ActivationSensitivity`` scores a channel by how large its producers' outputs are on the calibration data (the
mean absolute activation, label-free), divided by the group's mean. ``ParameterCount`` makes the search's cost
the number of weights, so ``compress_ratio: 2`` asks for half the parameters instead of half the bit-operations.

``ActivationSensitivity`` declares its one option in an ``Options`` model, so acps checks it, ``acps plugins`` lists
it, ``"ActivationSensitivity(normalize=none)"`` selects it by name and the report records it; ``ParameterCount``
takes no options and declares none, as a plain class may.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from acps_core.plugin import GainEstimatorBase, LayerGeometry, MethodOptions, SearchRecord, SensitivityBase, forward


class ActivationSensitivity(SensitivityBase):
    """Mean absolute output of each channel over the calibration data, over the group's mean.

    Args:
        normalize: ``"mean"`` divides each group's scores by their mean (the default), ``"none"`` leaves them.
    """

    class Options(MethodOptions):
        """The options of :class:`ActivationSensitivity`."""

        normalize: Literal["none", "mean"] = "mean"

    def __init__(self, normalize: Literal["none", "mean"] = "mean") -> None:
        super().__init__()
        self.options = self.Options.checked(self, normalize=normalize)  # an unknown value raises, naming it

    def get_sensitivity(self, search_records: list[SearchRecord]) -> None:
        assert self.model is not None, "acps calls setup_initialization first"
        sums = {r.group_id: torch.zeros(r.channels, dtype=torch.float64) for r in search_records}
        handles = []
        for record in search_records:
            for producer in record.producers:
                module = self.model.get_submodule(producer)

                def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor,
                         record: SearchRecord = record) -> None:
                    # Channels are dim 1 for convs, the last dim for Linear layers.
                    channel_dim = output.dim() - 1 if isinstance(_module, torch.nn.Linear) else 1
                    values = output.detach().abs().movedim(channel_dim, 0).reshape(record.channels, -1)
                    sums[record.group_id] += values.mean(dim=1).double().cpu()

                handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                for data, _label in self.calibration_batches():
                    forward(self.model, data)
        finally:
            for handle in handles:  # acps checks that a method leaves no hook behind
                handle.remove()
        for record in search_records:
            scores = sums[record.group_id]
            mean = float(scores.mean())
            record.sensitivity = scores / mean if mean > 0 and self.options.normalize == "mean" else scores


class ParameterCount(GainEstimatorBase):
    """Cost = the layer's weights (and biases) at the given channel counts."""

    unit = "parameters"

    def layer_cost(self, layer: LayerGeometry, in_channels: int, out_channels: int) -> float:
        kernel = 1
        for size in layer.kernel_size:
            kernel *= size
        if layer.depthwise:
            return float(in_channels * kernel + in_channels)
        return float(out_channels * (in_channels // layer.groups) * kernel + out_channels)
