"""Calibration data: checking it, moving it to the model's device, splitting it into passes, and the default loss.

``input_data`` is the reference's ``[data, label]``: ``data`` is the model's input (a tensor, or a tuple of
tensors passed as positional arguments), ``label`` a tensor. Dimension 0 of every tensor is the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from acps_core._util.tensors import map_tensors, tensors_in
from acps_core.errors import DataError


def forward(model: nn.Module, data: Any) -> Any:
    """Run ``model`` on ``data``: a tensor, a tuple/list of positional arguments, or a dict of keyword arguments."""
    if isinstance(data, (tuple, list)):
        return model(*data)
    if isinstance(data, dict):
        return model(**data)
    return model(data)


@contextmanager
def input_hooks(model: nn.Module, names: Set[str],
                on_input: Callable[[str, Any, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, ``on_input(name, module, input)`` runs before each named submodule is called, with its
    first input tensor (passed positionally or by keyword)."""
    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor):
                on_input(name, module, x)
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name), with_kwargs=True)
               for name in sorted(names)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def to_device(data: Any, device: torch.device) -> Any:
    """``data`` (a tensor, or tuples, lists and dicts of them, nested) with every tensor on ``device``."""
    return map_tensors(data, lambda tensor: tensor.to(device))


def model_device(model: nn.Module) -> torch.device:
    """The one device every parameter and buffer of ``model`` is on (CPU for a model without any).

    Raises:
        DataError: when the model is spread over several devices, or lives on the meta device.
    """
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if not devices:
        return torch.device("cpu")
    if len(devices) > 1:
        raise DataError(f"the model's parameters are on several devices ({', '.join(sorted(map(str, devices)))}); "
                        "move the whole model to one device before the search")
    device = devices.pop()
    if device.type == "meta":
        raise DataError("the model is on the meta device (its weights are not loaded); load trained weights and "
                        "move it to a real device before the search")
    return device


def is_reference_form(input_data: Any) -> bool:
    """``[data, label]`` with a label tensor (the reference's form), as opposed to an iterable of such batches."""
    return isinstance(input_data, (list, tuple)) and len(input_data) == 2 and isinstance(input_data[1], torch.Tensor)


def check_calibration(input_data: Any, test_iteration: int, device: torch.device,
                      dtype: torch.dtype | None = None) -> list[Any]:
    """Validate the calibration data and return it on ``device``, in one of two forms.

    ``[data, label]`` (the reference's form) comes back as ``[data, label]``; its batch is split into
    ``test_iteration`` passes. Any other iterable (a DataLoader, a list of batches) must yield ``(data, label)``
    batches; the first ``test_iteration`` of them come back as a list of ``(data, label)`` tuples, one per pass.

    ``dtype``, when given, is the floating dtype of the model's parameters, which floating data must match.

    Raises:
        DataError: naming what is wrong (see :func:`check_input_data`), or an iterable with fewer batches than
            ``test_iteration``.
    """
    if isinstance(input_data, (list, tuple)):
        iterable = bool(input_data) and is_reference_form(input_data[0]) and not is_reference_form(input_data)
    else:
        iterable = hasattr(input_data, "__iter__") and not isinstance(input_data, (torch.Tensor, dict))
    if not iterable:
        return list(check_input_data(input_data, test_iteration, device, dtype))
    batches = []
    for index, batch in enumerate(input_data):
        if index == test_iteration:
            break
        if not is_reference_form(batch):
            raise DataError(f"calibration batch {index} is a {type(batch).__name__}; an iterable input_data (a "
                            "DataLoader) must yield (data, label) pairs with a label tensor")
        batches.append(check_input_data(batch, 1, device, dtype))
    if len(batches) < test_iteration:
        raise DataError(f"test_iteration is {test_iteration} but input_data yields only {len(batches)} batches; "
                        "each calibration pass takes one batch: lower test_iteration or pass more data")
    return batches


def check_input_data(input_data: Any, test_iteration: int, device: torch.device,
                     dtype: torch.dtype | None = None) -> tuple[Any, torch.Tensor]:
    """Validate the reference's ``[data, label]`` and return them on ``device``.

    Raises:
        DataError: naming what is wrong: not a two-item list, a non-tensor, empty tensors, batch sizes that differ,
            fewer samples than ``test_iteration`` passes need, NaN/Inf values, tensors on the meta device or
            on another accelerator than the model's, floating data of another dtype than ``dtype``, or sparse,
            nested or quantized tensors (see :func:`check_dense`).
    """
    if not isinstance(input_data, (list, tuple)) or len(input_data) != 2:
        got = f"a {type(input_data).__name__}" + (f" of length {len(input_data)}"
                                                  if isinstance(input_data, (list, tuple)) else "")
        raise DataError(f"input_data must be a list [data, label] of two items, got {got}; e.g. "
                        "input_data=[images, labels]")
    data, label = input_data
    inputs = tensors_in(data)
    if not inputs:
        raise DataError(f"input_data[0] (data) must be a tensor or a tuple of tensors, got {type(data).__name__}")
    if not isinstance(label, torch.Tensor):
        raise DataError(f"input_data[1] (label) must be a torch.Tensor, got {type(label).__name__}")
    check_dense(data, "input_data data")
    check_dense(label, "input_data label")
    batch = inputs[0].shape[0] if inputs[0].dim() else 0
    devices = sorted({str(t.device) for t in [*inputs, label]})
    if len(devices) > 1:
        raise DataError(f"input_data mixes devices ({', '.join(devices)}); put the data and the labels on one device, "
                        f"the model's ({device}) or the CPU")
    for what, tensor in [*(("data", t) for t in inputs), ("label", label)]:
        if tensor.device.type == "meta":
            raise DataError(f"input_data {what} (shape {list(tensor.shape)}) is on the meta device, which holds no "
                            "values; pass tensors with real data")
        if (what == "data" and dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype):
            raise DataError(f"input_data data is {tensor.dtype} but the model's parameters are {dtype}; convert "
                            f"one to the other (e.g. data.to({dtype}))")
        if tensor.dim() == 0 or tensor.numel() == 0:
            raise DataError(f"input_data {what} is empty or a scalar (shape {list(tensor.shape)}); dimension 0 "
                            "must be the batch, with at least one sample")
        if tensor.shape[0] != batch:
            raise DataError(f"input_data {what} has {tensor.shape[0]} samples (shape {list(tensor.shape)}) but the "
                            f"data has {batch}; data and label must have the same batch size (dimension 0)")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DataError(f"input_data {what} (shape {list(tensor.shape)}) contains NaN or Inf values")
        if tensor.device != device and tensor.device.type != "cpu":
            raise DataError(f"input_data {what} is on {tensor.device} but the model is on {device}; put the data "
                            "on the model's device (or on the CPU)")
    if batch < test_iteration:
        raise DataError(f"test_iteration is {test_iteration} but input_data holds only {batch} samples; each "
                        "calibration pass needs at least one sample: lower test_iteration or pass more data")
    move = (lambda t: t.to(device)) if device.type != "cpu" else (lambda t: t)
    return map_tensors(data, move), move(label)


def check_dense(data: Any, what: str = "input_data") -> None:
    """Check that every tensor in ``data`` is a plain dense tensor, the only kind acps (and most models) can run.

    Sparse, MKL-DNN, nested and quantized tensors fail deep inside torch with a message about a missing kernel;
    this names the tensor and how to convert it instead.

    Raises:
        DataError: naming ``what``, the tensor's layout or dtype, and the conversion to apply.
    """
    tensors = tensors_in(data)
    for index, tensor in enumerate(tensors):
        name = what if len(tensors) == 1 else f"{what} (tensor {index})"
        if tensor.is_nested:
            raise DataError(f"{name} is a nested tensor; acps needs dense tensors, batch first: pad it, e.g. "
                            "torch.nested.to_padded_tensor(data, 0.0)")
        if tensor.layout != torch.strided:
            raise DataError(f"{name} is a {_layout_name(tensor.layout)} tensor (layout {tensor.layout}, shape "
                            f"{list(tensor.shape)}); acps needs dense tensors: pass data.to_dense()")
        if tensor.is_quantized:
            raise DataError(f"{name} is a quantized tensor ({tensor.dtype}, shape {list(tensor.shape)}); acps "
                            "searches floating-point models on floating-point data: pass data.dequantize()")


def _layout_name(layout: torch.layout) -> str:
    """``sparse`` for every sparse layout (COO, CSR, CSC, BSR, BSC), else the layout's own name."""
    name = str(layout).replace("torch.", "").lstrip("_")
    return "sparse" if name.startswith("sparse") else name


def split_calibration_data(input_data: Sequence[Any], parts: int) -> list[tuple[Any, torch.Tensor]]:
    """The calibration passes: ``[data, label]`` split into ``parts`` consecutive chunks along dim 0, or a list of
    ``(data, label)`` batches (from an iterable input) as it is."""
    if not is_reference_form(input_data):
        return [tuple(batch) for batch in input_data]
    data, label = input_data
    size = label.shape[0]
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    return [(_rows(data, start, stop), label[start:stop]) for start, stop in zip(bounds[:-1], bounds[1:])]


def _rows(data: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` (along the batch dim) of every tensor in ``data``."""
    return map_tensors(data, lambda tensor: tensor[start:stop])


#: The label Hugging Face models ignore in their token losses (padding, the prompt).
IGNORE_INDEX = -100


def label_kind(output: torch.Tensor, label: torch.Tensor) -> str:
    """Which default loss fits this label: ``"l1"`` (same shape as the output, the reference's rule),
    ``"cross_entropy"`` (integer class indices, one per output row) or ``"token_cross_entropy"`` (integer class
    indices over the output's last dim, one per token: a language model's logits ``[batch, tokens, vocabulary]``
    and labels ``[batch, tokens]``, where -100 marks tokens to ignore). Only the per-sample shapes are compared:
    the batch sizes are checked with the data.

    Raises:
        DataError: when the label fits neither, naming both shapes; class indices stored as floats (or bools)
            are told to be passed as ``labels.long()``; complex labels for a real output are refused.
    """
    if label.is_complex() and not output.is_complex():
        raise DataError(f"the labels are complex ({label.dtype}) but the model's output is real ({output.dtype}); "
                        "the default loss would silently drop their imaginary part: pass real labels (e.g. "
                        "label.real or label.abs()) or a loss_func that takes complex labels")
    indices = output.dim() >= 2 and label.shape[1:] == output.shape[2:]  # shaped like one class index a row
    if not label.is_floating_point() and not label.is_complex():
        if label.dtype != torch.bool and indices:
            classes = output.shape[1]
            if bool((label >= 0).all()) and bool((label < classes).all()):
                return "cross_entropy"
            raise DataError(f"the labels look like class indices but some fall outside [0, {classes}) for an "
                            f"output of shape {list(output.shape)}")
        if label.dtype != torch.bool and output.dim() >= 3 and label.shape[1:] == output.shape[1:-1]:
            classes = output.shape[-1]
            counted = label[label != IGNORE_INDEX]
            if bool((counted >= 0).all()) and bool((counted < classes).all()):
                return "token_cross_entropy"
            raise DataError(f"the labels look like token class indices but some fall outside [0, {classes}) (or "
                            f"{IGNORE_INDEX}, ignored) for an output of shape {list(output.shape)}")
    if label.shape[1:] == output.shape[1:]:
        return "l1"
    message = (f"the label shape {list(label.shape)} does not fit the model output shape {list(output.shape)}: "
               "pass labels shaped like the output (the reference's L1 loss), integer class indices of shape "
               "[batch] (or [batch, tokens] for an output [batch, tokens, classes]), or a loss_func that accepts "
               "them")
    if indices and output.shape[1] >= 2 and _whole_numbers(label):
        # Class indices that went through a float tensor (a NumPy array, a DataFrame column, torch.tensor([1.])).
        classes = output.shape[1]
        if bool((label >= 0).all()) and bool((label < classes).all()):
            raise DataError(f"the labels ({label.dtype}, shape {list(label.shape)}) look like class indices stored "
                            f"as {'bools' if label.dtype == torch.bool else 'floats'}: they are whole numbers in "
                            f"[0, {classes}) for an output of shape {list(output.shape)}; pass labels.long() so the "
                            "default loss is cross-entropy over the classes")
        raise DataError(f"{message} (the labels are whole numbers stored as {label.dtype}, like class indices, but "
                        f"some fall outside [0, {classes}): class indices must be integers in that range)")
    raise DataError(message)


def _whole_numbers(label: torch.Tensor) -> bool:
    """Whether a float or bool tensor holds only whole numbers (class indices that lost their integer dtype)."""
    if label.dtype == torch.bool:
        return True
    return label.is_floating_point() and bool((label == label.round()).all())


def primary_output(output: Any) -> tuple[torch.Tensor | None, str | None]:
    """The tensor the default loss compares with the labels, and where it was found (None for a plain tensor).

    A model may return a tensor; a Hugging Face ``ModelOutput`` or any dict (its ``logits`` entry, else its first
    tensor value); or a tuple or list (its first tensor). Returns ``(None, None)`` when there is no such tensor.
    """
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, Mapping):
        logits = output.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits, "its 'logits' entry"
        for key, value in output.items():
            if isinstance(value, torch.Tensor):
                return value, f"its first tensor entry {key!r}"
        return None, None
    if isinstance(output, (tuple, list)):
        for index, value in enumerate(output):
            if isinstance(value, torch.Tensor):
                return value, f"its element {index}" if index else "its first element"
    return None, None


def default_loss(output: Any, label: torch.Tensor) -> torch.Tensor:
    """The loss used when the user gives none: the reference's L1 between output and label, or cross-entropy
    when the labels are integer class indices (an L1 loss against class indices is meaningless), per token for a
    language model's ``[batch, tokens, vocabulary]`` logits. A model that
    returns a dict, a ``ModelOutput`` or a tuple is scored on its :func:`primary_output`."""
    tensor, _ = primary_output(output)
    if tensor is None:
        raise DataError(f"the model returns a {type(output).__name__} holding no tensor; pass "
                        "sensitivity=TaylorLossSensitivity(loss_func=...) with a loss_func that takes this output "
                        "and the label")
    kind = label_kind(tensor, label)
    if kind == "cross_entropy":
        return F.cross_entropy(tensor, label.long())
    if kind == "token_cross_entropy":
        return F.cross_entropy(tensor.flatten(0, -2), label.long().flatten(), ignore_index=IGNORE_INDEX)
    return F.l1_loss(tensor, label.to(tensor.dtype))
