"""The two methods of the example plugin.

``ActivationSensitivity`` scores a channel by how large its producers' outputs are on the calibration data (the
mean absolute activation, label-free), divided by the group's mean. ``ParameterCount`` makes the search's cost
the number of weights, so ``compress_ratio: 2`` asks for half the parameters instead of half the bit-operations.
"""

from __future__ import annotations

import torch

from acps_core.plugin import GainEstimatorBase, LayerGeometry, SearchRecord, SensitivityBase, forward


class ActivationSensitivity(SensitivityBase):
    """Mean absolute output of each channel over the calibration data, over the group's mean."""

    def get_sensitivity(self, search_records: list[SearchRecord]) -> None:
        assert self.model is not None, "acps calls setup_initialization first"
        sums = {r.group_id: torch.zeros(r.channels, dtype=torch.float64) for r in search_records}
        handles = []
        for record in search_records:
            for producer in record.producers:
                module = self.model.get_submodule(producer)

                def hook(_module, _inputs, output, record=record):
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
            record.sensitivity = scores / mean if mean > 0 else scores


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
