"""Leaving the user's model exactly as it was found.

:func:`preserved_model_state` snapshots what a search may touch (parameter and buffer values and objects,
train/eval modes, ``requires_grad`` flags, ``.grad`` tensors and registered hooks) and puts all of it back on
exit, whether the body succeeded or raised, and whatever a plugin did in between (a forward pass in train mode
updates BatchNorm statistics; a buggy plugin may write to a weight).

Copying every parameter costs as much memory as the model. When only acps's own methods run (which never write
to a parameter for good, as their tests check), ``copy_parameters=False`` keeps a checksum of each parameter's
bits instead, and raises if one changed anyway; buffers are always copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from acps_core.errors import AcpsError

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@dataclass
class _Snapshot:
    training: list[tuple[nn.Module, bool]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    grads: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]]  # param, grad object, its values
    hooks: list[tuple[nn.Module, str, dict]]  # type: ignore[type-arg]
    members: list[tuple[nn.Module, str, dict]]  # type: ignore[type-arg]  # _parameters / _buffers dicts
    values: list[tuple[torch.Tensor, torch.Tensor]]  # every parameter and buffer, and a CPU copy of it
    # parameters not copied: (name, tensor, checksum of its bits)
    checked: list[tuple[str, torch.Tensor, int]] = field(default_factory=list)


def _checksum(tensor: torch.Tensor) -> int:
    """A sum over the tensor's bits, read as integers: changes when a value changes."""
    data = tensor.detach().contiguous()
    if data.element_size() == 4:
        return int(data.view(torch.int32).sum(dtype=torch.int64))
    return int(data.view(torch.uint8).sum(dtype=torch.int64))


def _take(model: nn.Module, copy_parameters: bool = True) -> _Snapshot:
    modules = list(model.modules())
    params = list(model.parameters())
    if copy_parameters:
        return _take_without(model, modules, params, set())
    names = {id(p): n for n, p in model.named_parameters()}
    unique = {id(p): p for p in params}
    snapshot = _take_without(model, modules, params, set(unique))
    snapshot.checked = [(names.get(i, "a parameter"), p, _checksum(p)) for i, p in unique.items()]
    return snapshot


def _take_without(model: nn.Module, modules: list[nn.Module], params: list[nn.Parameter],
                  skipped: set[int]) -> _Snapshot:
    """A snapshot that copies every tensor but the ``skipped`` ones (by id)."""
    return _Snapshot(
        training=[(m, m.training) for m in modules],
        requires_grad=[(p, p.requires_grad) for p in params],
        grads=[(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params],
        hooks=[(m, attr, dict(getattr(m, attr))) for m in modules for attr in _HOOK_DICTS if hasattr(m, attr)],
        members=[(m, attr, dict(getattr(m, attr))) for m in modules for attr in ("_parameters", "_buffers")],
        # Copies live on the CPU so that a model on an accelerator does not need twice its memory there.
        values=[(t, t.detach().to("cpu", copy=True)) for t in {id(t): t for t in _tensors(model)}.values()
                if id(t) not in skipped],
    )


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *(b for b in model.buffers() if b is not None)]


def _restore(snapshot: _Snapshot) -> None:
    for module, attr, members in snapshot.members:
        current = getattr(module, attr)
        current.clear()
        current.update(members)
    with torch.no_grad():
        for tensor, saved in snapshot.values:
            if not torch.equal(tensor.detach().cpu(), saved):
                tensor.detach().copy_(saved)
    for module, training in snapshot.training:
        module.training = training
    for param, flag in snapshot.requires_grad:
        param.requires_grad_(flag)
    with torch.no_grad():
        for param, grad, values in snapshot.grads:
            if grad is not None and values is not None:
                grad.copy_(values)  # a plugin's backward() may have accumulated into the same tensor
            param.grad = grad
    for module, attr, hooks in snapshot.hooks:
        current = getattr(module, attr)
        current.clear()
        current.update(hooks)
    # A write that is undone (masking zeroes an attention projection's columns and puts them back) is fine.
    changed = [name for name, param, checksum in snapshot.checked if _checksum(param) != checksum]
    if changed:
        raise AcpsError(f"the model's parameter(s) {', '.join(changed[:5])} were changed in place during the "
                        "search, which acps's own methods never do; this is a bug in acps, please report it "
                        "(the model's other state was restored)")


@contextmanager
def preserved_model_state(model: nn.Module, copy_parameters: bool = True) -> Iterator[None]:
    """Restore ``model``'s modes, ``requires_grad`` flags, ``.grad`` tensors and hooks when the block exits
    (``copy_parameters=False``: check the parameters instead of copying them, see the module docs)."""
    snapshot = _take(model, copy_parameters)
    try:
        yield
    finally:
        _restore(snapshot)


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore only ``model``'s train/eval modes when the block exits (for code that changes it on purpose)."""
    training = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, flag in training:
            module.training = flag
