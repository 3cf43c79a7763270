"""Leaving the user's model exactly as it was found.

:func:`preserved_model_state` snapshots what a search may touch (parameter and buffer values and objects,
train/eval modes, ``requires_grad`` flags, ``.grad`` tensors and registered hooks) and puts all of it back on
exit, whether the body succeeded or raised, and whatever a plugin did in between (a forward pass in train mode
updates BatchNorm statistics; a buggy plugin may write to a weight).

Copying every parameter costs as much memory as the model. When only acps's own methods run (which never write
to a parameter for good, as their tests check), ``copy_parameters=False`` keeps a checksum of each parameter's
bits instead, and raises if one changed anyway; buffers are always copied.

The model's own forward pass may write to its weights (``self.weight.mul_(0.99)`` under ``torch.no_grad()``).
While the block runs the model's first forward passes inside :meth:`PreservedState.watching`, every parameter
that code other than acps's is about to write in place is copied first (copy on write: nothing is copied for
a model that writes nothing), so :meth:`PreservedState.check_parameters` can name it and the exit can put it
back bit for bit. A change found only by a checksum (a forward pass that writes on later calls only) is named,
but cannot be undone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode

from acps_core._util import ACPS_DIR
from acps_core._util.model_checks import check_initialized, forward_wrote_parameters, same_bits
from acps_core._util.tensors import bits_checksum

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@dataclass
class _Snapshot:
    model: nn.Module
    training: list[tuple[nn.Module, bool]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    grads: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]]  # param, grad object, its values
    hooks: list[tuple[nn.Module, str, dict]]  # type: ignore[type-arg]
    members: list[tuple[nn.Module, str, dict]]  # type: ignore[type-arg]  # _parameters / _buffers dicts
    values: list[tuple[torch.Tensor, torch.Tensor]]  # every parameter and buffer, and a CPU copy of it
    # parameters not copied: (name, tensor, checksum of its bits)
    checked: list[tuple[str, torch.Tensor, int]] = field(default_factory=list)
    # parameters copied just before a write while watching: name -> (tensor, its CPU copy)
    written: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class PreservedState:
    """What :func:`preserved_model_state` gives its block: a watch on the model's first forward passes."""

    def __init__(self, snapshot: _Snapshot) -> None:
        self._snapshot = snapshot

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Within the block, copy each parameter before code other than acps's writes to it in place (see the
        module docs); acps's own writes (masking, which puts the values back itself) are left alone."""
        with CopyOnWrite(self._snapshot.model, self._snapshot.written):
            yield

    def check_parameters(self) -> None:
        """Raise a :class:`~acps_core.errors.GraphError` naming the parameters written while watching that hold
        other values now: the model's forward pass changed its own weights. They are put back when the block
        exits. Call it once the watched forward passes are done: the copies of unchanged parameters are dropped."""
        written = self._snapshot.written
        changed = [name for name, (param, copy) in written.items() if not same_bits(param, copy)]
        if changed:
            raise forward_wrote_parameters(self._snapshot.model, changed, restored=True)
        written.clear()  # written and put back as they were: their copies are not needed any more


class CopyOnWrite(TorchFunctionMode):
    """A torch function mode that copies (to the CPU, into ``written``) each parameter of ``model`` that code
    outside torch and acps is about to write in place: an in-place method (``mul_``, ``copy_``, ``x[i] = ...``,
    ``x += y``), an ``out=`` or ``inplace=True`` argument, an assignment to ``.data``, or a NumPy view."""

    def __init__(self, model: nn.Module, written: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.written = written
        self.by_storage: dict[int, list[tuple[str, nn.Parameter]]] = {}
        for name, param in model.named_parameters():
            self.by_storage.setdefault(_storage(param), []).append((name, param))

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # Most calls cannot write (a quick look at the name first: this runs for every torch call of a forward).
        if kwargs or name[-1:] == "_" or name in _MAYBE_WRITES:
            targets = _write_targets(func, args, kwargs)
            if targets:
                self._copy_before_write(targets)
        return func(*args, **kwargs)

    def _copy_before_write(self, targets: list[Any]) -> None:
        params = [p for t in targets if isinstance(t, torch.Tensor) for p in self.by_storage.get(_storage(t), [])]
        params = [(name, param) for name, param in params if name not in self.written]
        if params and not _called_by_acps():
            for name, param in params:
                self.written[name] = (param, param.detach().to("cpu", copy=True))


# In-place operations whose name does not end with "_" (those that do: mul_, copy_, zero_, _foreach_add_).
_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                     "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
# Methods that end with "_" but change no value.
_NOT_WRITES = {"requires_grad_", "share_memory_", "retain_grad_"}
# Names that may write though they do not end with "_" (an out= or inplace= argument aside).
_MAYBE_WRITES = _IN_PLACE_DUNDERS | {"numpy", "__array__", "__set__"}
_ACPS_DIR = ACPS_DIR
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _write_targets(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The tensors ``func(*args, **kwargs)`` may write to (empty for a function that writes nothing)."""
    name = getattr(func, "__name__", "")
    targets: list[Any] = []
    if args and ((name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES)
                 or name in _IN_PLACE_DUNDERS or name in ("numpy", "__array__") or kwargs.get("inplace") is True
                 or (name == "__set__" and getattr(getattr(func, "__self__", None), "__name__", "") == "data")):
        first = args[0]
        targets.extend(first if isinstance(first, (list, tuple)) else [first])
    out = kwargs.get("out")
    if out is not None:
        targets.extend(out if isinstance(out, (list, tuple)) else [out])
    return targets


def _storage(tensor: torch.Tensor) -> int:
    if isinstance(tensor, FakeTensor):  # shapes only (the prune step's shape check): never a parameter's storage
        return -1
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # sparse, nested, meta: never a parameter's storage here
        return -1


def _called_by_acps() -> bool:
    """Whether the innermost caller outside torch is acps's own code, which restores what it writes (masking
    zeroes channels and puts them back). The handlers of torch function modes (this one, the graph's recorder)
    are skipped: they only pass the call on."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if frame.f_code.co_name not in ("__torch_function__", "_copy_before_write", "_called_by_acps") \
                and not filename.startswith(_TORCH_DIR):
            return filename.startswith(_ACPS_DIR)
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _take(model: nn.Module, copy_parameters: bool = True) -> _Snapshot:
    check_initialized(model)  # a lazy module's parameters have no values to copy yet
    modules = list(model.modules())
    params = list(model.parameters())
    if copy_parameters:
        return _take_without(model, modules, params, set())
    names = {id(p): n for n, p in model.named_parameters()}
    unique = {id(p): p for p in params}
    snapshot = _take_without(model, modules, params, set(unique))
    snapshot.checked = [(names.get(i, "a parameter"), p, bits_checksum(p)) for i, p in unique.items()]
    return snapshot


def _take_without(model: nn.Module, modules: list[nn.Module], params: list[nn.Parameter],
                  skipped: set[int]) -> _Snapshot:
    """A snapshot that copies every tensor but the ``skipped`` ones (by id)."""
    return _Snapshot(
        model=model,
        training=[(m, m.training) for m in modules],
        requires_grad=[(p, p.requires_grad) for p in params],
        grads=[(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params],
        hooks=[(m, attr, dict(getattr(m, attr))) for m in modules for attr in _HOOK_DICTS if hasattr(m, attr)],
        members=[(m, attr, dict(getattr(m, attr))) for m in modules for attr in ("_parameters", "_buffers")],
        # Copies live on the CPU so that a model on an accelerator does not need twice its memory there.
        values=[(t, t.detach().to("cpu", copy=True)) for t in {id(t): t for t in _tensors(model)}.values()
                if id(t) not in skipped],
    )


def _put_back(param: torch.Tensor, saved: torch.Tensor) -> None:
    """Copy ``saved`` back into ``param``, or give it back its old values whole when a ``.data = ...`` assignment
    changed its shape or dtype."""
    if param.shape == saved.shape and param.dtype == saved.dtype:
        param.detach().copy_(saved)
    else:
        param.data = saved.to(param.device)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *(b for b in model.buffers() if b is not None)]


def _restore(snapshot: _Snapshot, failed: bool = False) -> None:
    """Put everything back. ``failed``: the block raised; parameters its forward passes wrote are put back
    without an error of their own, so that the block's error is the one the caller sees."""
    for module, attr, members in snapshot.members:
        current = getattr(module, attr)
        current.clear()
        current.update(members)
    put_back = []
    with torch.no_grad():
        for tensor, saved in snapshot.values:
            if not same_bits(tensor, saved):
                tensor.detach().copy_(saved)
        for name, (param, saved) in snapshot.written.items():
            if not same_bits(param, saved):
                _put_back(param, saved)
                put_back.append(name)
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
    changed = [name for name, param, checksum in snapshot.checked if bits_checksum(param) != checksum]
    if changed:
        raise forward_wrote_parameters(snapshot.model, changed, restored=False)
    if put_back and not failed:
        raise forward_wrote_parameters(snapshot.model, put_back, restored=True)


@contextmanager
def preserved_model_state(model: nn.Module, copy_parameters: bool = True) -> Iterator[PreservedState]:
    """Restore ``model``'s modes, ``requires_grad`` flags, ``.grad`` tensors and hooks when the block exits
    (``copy_parameters=False``: check the parameters instead of copying them, see the module docs). The block
    gets a :class:`PreservedState` to watch the model's first forward passes with.

    Raises:
        GraphError: the model has a lazy module that was never run (nothing to copy yet), or its parameters were
            changed in place (see the module docs).
    """
    snapshot = _take(model, copy_parameters)
    try:
        yield PreservedState(snapshot)
    except BaseException:
        _restore(snapshot, failed=True)
        raise
    _restore(snapshot)


@contextmanager
def parameters_left_alone(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's forward passes must not change its parameters: each one code other than
    acps's is about to write is copied first (see :class:`CopyOnWrite`), and on exit any that changed is put
    back and a :class:`~acps_core.errors.GraphError` names them. It replaces the block's own error, which a
    changed weight may well have caused (two forward passes that see different weights compute different
    things).

    For the calls that run a copy of the model sharing its tensors (pruning a copy, replaying a record): the
    copy's forward pass writes to the user's tensors. Nothing is copied for a model that writes nothing.
    """
    written: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with CopyOnWrite(model, written):
            yield
    finally:
        put_back = []
        with torch.no_grad():
            for name, (param, saved) in written.items():
                if not same_bits(param, saved):
                    _put_back(param, saved)
                    put_back.append(name)
        if put_back:
            raise forward_wrote_parameters(model, put_back, restored=True)


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore only ``model``'s train/eval modes when the block exits (for code that changes it on purpose)."""
    training = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, flag in training:
            module.training = flag
