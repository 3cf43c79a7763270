"""A snapshot of everything about a model that acps must leave unchanged, for tests to compare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ModelSnapshot:
    tensors: dict[str, torch.Tensor]
    grads: dict[str, Any]
    grad_ids: dict[str, int | None]
    training: dict[str, bool]
    requires_grad: dict[str, bool]
    hooks: dict[str, tuple[int, ...]]
    devices_dtypes: dict[str, tuple[str, str]]
    param_ids: dict[str, int]

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        named = dict(model.named_parameters())
        state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        return cls(
            tensors=state,
            grads={k: None if p.grad is None else p.grad.detach().clone() for k, p in named.items()},
            grad_ids={k: None if p.grad is None else id(p.grad) for k, p in named.items()},
            training={k: m.training for k, m in model.named_modules()},
            requires_grad={k: p.requires_grad for k, p in named.items()},
            hooks={k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                   for k, m in model.named_modules()},
            devices_dtypes={k: (str(v.device), str(v.dtype)) for k, v in model.state_dict().items()},
            param_ids={k: id(p) for k, p in named.items()},
        )

    def assert_same(self, model: nn.Module) -> None:
        """Fail (AssertionError naming what changed) unless ``model`` matches the snapshot bit for bit."""
        other = ModelSnapshot.take(model)
        assert other.tensors.keys() == self.tensors.keys(), "parameters or buffers were added or removed"
        for key, value in self.tensors.items():
            assert torch.equal(value, other.tensors[key]), f"{key} changed"
        for key, grad in self.grads.items():
            if grad is None:
                assert other.grads[key] is None, f"{key}.grad was created"
            else:
                assert torch.equal(grad, other.grads[key]), f"{key}.grad changed"
        assert other.grad_ids == self.grad_ids, ".grad tensors were replaced"
        assert other.training == self.training, "train/eval modes changed"
        assert other.requires_grad == self.requires_grad, "requires_grad flags changed"
        assert other.hooks == self.hooks, "hooks were left registered or removed"
        assert other.devices_dtypes == self.devices_dtypes, "devices or dtypes changed"
        assert other.param_ids == self.param_ids, "parameter objects were replaced"
