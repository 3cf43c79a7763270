"""Recording one forward pass: every torch function it calls and every call of a layer traced whole.

The model runs once on (up to two samples of) the calibration data under a ``TorchFunctionMode``, which sees
every torch function the forward pass calls, whatever Python control flow produced it. Layers with a layer adapter
that are traced whole (:mod:`acps_core.layers`: Conv, Linear, norms, ...) are recorded as one operation through
forward hooks; everything else function by function. Each tensor is a numbered *value*; an :class:`Op` names the
values it read and made, with the user's source line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from acps_core._util import ACPS_DIR
from acps_core._util.tensors import map_tensors, tensors_in

_TORCH_DIR = os.path.dirname(torch.__file__)

#: Functions that only report a tensor's shape.
SIZE_QUERIES = frozenset({"size", "get", "shape", "dim", "numel"})
#: The name a recorded shape query gets.
SIZE_QUERY = "<size query>"


def op_name(func: Any) -> str:
    """A torch function's plain name: ``__iadd__`` -> ``iadd``, ``add_`` -> ``add``, ``_max_pool2d`` ->
    ``max_pool2d``."""
    name = getattr(func, "__name__", repr(func))
    return name.strip("_")


def _user_location() -> str:
    """``file:line`` of the innermost frame outside torch and acps: the user's code that made the call."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (filename.startswith(_TORCH_DIR) or filename.startswith(ACPS_DIR)):
            return f"{os.path.basename(filename)}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "<unknown>"


@dataclass
class TensorRef:
    """A tensor argument of a recorded op: the traced value it is (None for constants and parameters)."""

    value: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    param: str | None = None  # the qualified name, when the tensor is one of the model's parameters


def refs_in(obj: Any) -> list[Any]:
    """Every tensor reference (and tensor) in a recorded op's arguments, in order."""
    return tensors_in(obj, (torch.Tensor, TensorRef))


@dataclass
class Op:
    name: str                      # function name, or the module's name for leaf modules
    module: nn.Module | None       # the leaf module, for module ops
    args: tuple[Any, ...]          # tensors replaced by TensorRef
    kwargs: dict[str, Any]
    outputs: list[int]             # value ids of the tensor outputs
    location: str


class Recorder(TorchFunctionMode):
    """Records the torch functions and leaf-module calls of one forward pass."""

    def __init__(self, leaf_names: Mapping[nn.Module, str], param_names: Mapping[int, str]) -> None:
        super().__init__()
        self.leaf_names = leaf_names
        self.param_names = param_names
        self.ops: list[Op] = []
        self.shapes: list[tuple[int, ...]] = []
        # Weak keys: activations are freed as in a plain forward pass, and a reused id() cannot alias a dead
        # tensor (holding every activation alive doubled the trace's time and memory).
        self._value_of: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._inside_leaf = 0
        self._paused = False
        self._pending: list[tuple[nn.Module, tuple[Any, ...], dict[str, Any], str]] = []

    def add_value(self, tensor: torch.Tensor) -> int:
        value = len(self.shapes)
        self.shapes.append(tuple(tensor.shape))
        self._value_of[tensor] = value
        return value

    def ref(self, tensor: torch.Tensor) -> TensorRef:
        return TensorRef(self._value_of.get(tensor), tuple(tensor.shape), tensor.dtype,
                          self.param_names.get(id(tensor)))

    def value_of(self, tensor: torch.Tensor) -> int | None:
        value: int | None = self._value_of.get(tensor)
        return value

    def _record(self, name: str, module: nn.Module | None, args: tuple[Any, ...], kwargs: dict[str, Any],
                out: Any, location: str) -> None:
        out_tensors = tensors_in(out)
        in_refs = map_tensors(args, self.ref), map_tensors(kwargs, self.ref)
        touches_trace = any(r.value is not None for r in refs_in(in_refs))
        if not out_tensors:
            if touches_trace and name in SIZE_QUERIES:
                # Remembered so that a reshape to a size computed from x.shape is not mistaken for a constant.
                self.ops.append(Op(SIZE_QUERY, None, in_refs[0], in_refs[1], [], location))
            elif touches_trace and name.endswith("setitem"):
                self.ops.append(Op(name, module, in_refs[0], in_refs[1], [], location))
            return  # other non-tensor results cannot move channels
        outputs = [self.add_value(t) for t in out_tensors]
        self.ops.append(Op(name, module, in_refs[0], in_refs[1], outputs, location))

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._paused and not self._inside_leaf:
            self._paused = True
            try:
                self._record(op_name(func), None, args, kwargs, out, _user_location())
            finally:
                self._paused = False
        return out

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._paused:
            return
        if not self._inside_leaf:
            self._paused = True
            self._pending.append((module, args, kwargs, _user_location()))
            self._paused = False
        self._inside_leaf += 1

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._paused:
            return
        self._inside_leaf -= 1
        if not self._inside_leaf:
            self._paused = True
            try:
                pending_module, pending_args, pending_kwargs, location = self._pending.pop()
                self._record(self.leaf_names[module], pending_module, pending_args, pending_kwargs, output,
                             location)
            finally:
                self._paused = False


def first_tensor(args: Any) -> TensorRef | None:
    """The first tensor reference in a recorded op's arguments (None when there is none)."""
    refs = refs_in(args)
    return refs[0] if refs else None


def trace_sample(data: Any, samples: int = 2) -> Any:
    """The first ``samples`` entries (along dim 0) of every tensor in ``data``: enough to trace shapes."""
    return map_tensors(data, lambda tensor: tensor[:samples])
