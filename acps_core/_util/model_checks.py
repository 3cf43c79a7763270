"""Checks of the model itself, and explanations of the failures that are the model's fault.

A model can be unusable in ways torch reports far from their cause: a lazy layer that was never run fails
inside acps's bookkeeping, a NaN weight or a negative BatchNorm variance turns the loss NaN (which looks like bad
data), a forward pass that writes to its own weights looks like a bug in acps, an in-place operation on a tensor
autograd needs fails inside the sensitivity method's backward pass, and integer images fail with a message about
a bias type. The functions here name the module, parameter or input at fault and say what to do about it.

Every check is cheap (one read of the weights at most) or runs only once something has already failed.
"""

from __future__ import annotations

import dis
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy

from acps_core._util import ACPS_DIR
from acps_core._util.data import forward
from acps_core._util.tensors import map_tensors, tensors_in
from acps_core.errors import AcpsError, DataError, GraphError

#: What autograd says when a tensor it saved for the backward pass was modified in place.
IN_PLACE_MESSAGE = "modified by an inplace operation"


# ----------------------------------------------------------------------------------------------------------------
# Up-front checks of the model's state
# ----------------------------------------------------------------------------------------------------------------

def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter)`` -> the names of every module that holds it directly, in ``named_modules`` order (tied
    weights, a module registered under two names)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            names = owners.setdefault(id(param), [])
            if name not in names:
                names.append(name)
    return owners


def check_model(model: nn.Module) -> None:
    """Both checks below: the model is initialised and its weights are usable.

    Raises:
        GraphError: see :func:`check_initialized` and :func:`check_weights`.
    """
    check_initialized(model)
    check_weights(model)


def check_initialized(model: nn.Module) -> None:
    """Check that no lazy module (``nn.LazyConv2d``, ``nn.LazyLinear``...) is still waiting for its first input.

    Such a module's parameters have no shape yet, so nothing can be copied, traced or pruned; and running it would
    give it fresh random weights, changing the user's model.

    Raises:
        GraphError: naming the lazy modules and the fix.
    """
    lazy = []
    for name, module in model.named_modules():
        own = [*module._parameters.values(), *module._buffers.values()]
        if any(tensor is not None and is_lazy(tensor) for tensor in own):
            lazy.append(f"{name or '(the model itself)'} ({type(module).__name__})")
    if lazy:
        more = f" and {len(lazy) - 5} more" if len(lazy) > 5 else ""
        raise GraphError(f"the model's layer(s) {', '.join(lazy[:5])}{more} are lazy modules whose weights are not "
                         "initialised yet (they take their shapes from the first input they see); run one forward "
                         "pass with a real batch first, e.g. model(images[:1]), so that the lazy layers get their "
                         "shapes, and load the trained weights before searching or pruning")


def check_weights(model: nn.Module) -> None:
    """Check that the model's weights can give a finite output: no NaN or Inf in a parameter, no NaN in a buffer,
    and no NaN, Inf or negative value in a norm layer's running statistics.

    One NaN weight makes every output it reaches NaN; a negative running variance does the same in eval mode (the
    layer divides by its square root). Either would surface later as a NaN loss, which blames the data.

    Raises:
        GraphError: naming the first parameter or buffer at fault, its module, and the fix.
    """
    with torch.no_grad():
        params = [(n, p) for n, p in model.named_parameters()
                  if (p.is_floating_point() or p.is_complex()) and p.device.type != "meta"]
        # A sum is finite only if every value is (NaN and Inf spread; a sum that overflows is checked closely):
        # one read of the weights, no allocation, and one synchronisation with an accelerator.
        sums = [p.sum(dtype=torch.complex64 if p.is_complex() else torch.float32).abs() for _, p in params]
        suspects = (torch.nonzero(~torch.isfinite(torch.stack([t.to(sums[0].device) for t in sums])))
                    .flatten().tolist() if sums else [])
        for name, param in (params[i] for i in suspects):
            if not bool(torch.isfinite(param).all()):
                raise GraphError(f"the model's parameter {name} ({_module_of(model, name)}) holds "
                                 f"{_non_finite(param)}: the model computes NaN wherever it is used, so no channel "
                                 "can be scored. Its weights are broken (a diverged training run or a damaged "
                                 "checkpoint gives NaN or Inf): load a good checkpoint, or find where the values "
                                 "went wrong")
        for name, buffer in model.named_buffers():
            if not buffer.is_floating_point() or buffer.device.type == "meta":
                continue
            module_name, _, attribute = name.rpartition(".")
            statistic = (isinstance(model.get_submodule(module_name), _NormBase)
                         and attribute in ("running_mean", "running_var"))
            if bool(torch.isnan(buffer).any()) or (statistic and not bool(torch.isfinite(buffer).all())):
                raise GraphError(f"the model's buffer {name} ({_module_of(model, name)}) holds "
                                 f"{_non_finite(buffer)}: the model computes NaN wherever it is used. Load a good "
                                 "checkpoint"
                                 + (", or re-estimate the running statistics (a few forward passes in train mode, "
                                    "e.g. torch.optim.swa_utils.update_bn)" if statistic else
                                    ", or fix the code that sets this buffer"))
            if statistic and attribute == "running_var" and bool((buffer < 0).any()):
                negative = int((buffer < 0).sum())
                raise GraphError(f"the running variance {name} ({_module_of(model, name)}) holds {negative} "
                                 f"negative value(s) (the smallest is {float(buffer.min()):g}): a variance cannot be "
                                 "negative, and in eval mode the layer divides by its square root, which is NaN. "
                                 "The statistics are damaged: load a good checkpoint, or re-estimate them (a few "
                                 "forward passes in train mode, e.g. torch.optim.swa_utils.update_bn)")


def _non_finite(tensor: torch.Tensor) -> str:
    """``'2 NaN and 1 infinite value(s) (of 18432)'``, for a message."""
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} infinite"] if inf else [])
    return f"{' and '.join(parts)} value(s) (of {tensor.numel()})"


def _module_of(model: nn.Module, name: str) -> str:
    """``'of Conv2d conv1'`` for the parameter or buffer ``conv1.weight``."""
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name)
    if not module_name:
        return f"of the model itself, a {type(module).__name__}"
    return f"of {type(module).__name__} {module_name}"


# ----------------------------------------------------------------------------------------------------------------
# A forward pass that writes to the model's own parameters
# ----------------------------------------------------------------------------------------------------------------

def forward_wrote_parameters(model: nn.Module, names: Sequence[str], restored: bool) -> GraphError:
    """The error for parameters found changed in place while acps ran the model (see :mod:`acps_core._util.state`).

    ``restored``: whether acps still had a copy and put them back bit for bit (the first forward passes), or only
    checksums, which can tell a change but not undo it (later in the search).
    """
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    owners = ", ".join(f"the {name.rpartition('.')[2]} {_module_of(model, name)}" for name in names[:5]
                       if _has_parameter(model, name))
    fix = ("make forward() leave its parameters alone (move the update, a .mul_(), .copy_() or .data write, into "
           "the training step, or do it only when self.training is true: acps runs the model in eval mode)")
    if restored:
        return GraphError(f"the model's parameter(s) {shown} were changed in place while acps ran the model's "
                          f"forward pass in eval mode under torch.no_grad() ({owners}); acps put them back bit for "
                          "bit. acps runs the forward pass many times and needs it to compute the same thing each "
                          f"time: {fix}")
    return GraphError(f"the model's parameter(s) {shown} were changed in place during the search ({owners}), after "
                      "the first forward passes had left them alone: the model's forward pass seems to write to "
                      "them on some calls only (every few calls, or only with gradients enabled). To save memory "
                      "acps keeps only checksums of the parameters while its own methods run, so these could not "
                      "be put back (the buffers, modes, flags and hooks were): reload the weights, "
                      f"{fix}, and search again. If the forward pass never writes to its parameters, this is a "
                      "bug in acps: please report it")


def _has_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def same_bits(tensor: torch.Tensor, saved: torch.Tensor) -> bool:
    """Whether ``tensor`` holds exactly the bits of ``saved`` (a CPU copy): NaN equals NaN, -0.0 differs from 0.0."""
    current = tensor.detach().to("cpu").contiguous().reshape(-1)
    saved = saved.contiguous().reshape(-1)
    if current.dtype != saved.dtype or current.shape != saved.shape:
        return False
    return torch.equal(current.view(torch.uint8), saved.view(torch.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Explaining a failure
# ----------------------------------------------------------------------------------------------------------------

def explain_trace_failure(model: nn.Module, sample: Any, error: Exception) -> AcpsError:
    """The error to raise when the model raised while acps traced it on ``sample`` (its forward arguments).

    When some input tensor's dtype differs from the parameters' (integer, bool or complex images, quantized
    tensors, float64 data for a float32 model) and the model runs once they are converted, the input is at fault:
    a :class:`DataError` naming the dtypes and the conversion. A model that takes integers on purpose (token ids
    into an ``nn.Embedding``) fails differently with float ids, so its error stays as it was: a
    :class:`GraphError` quoting torch.
    """
    fallback = GraphError(f"the model raised while tracing it on the calibration data: {type(error).__name__}: "
                          f"{error}")
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(floating) != 1:
        return fallback
    dtype = floating.pop()
    complex_model = any(p.is_complex() for p in model.parameters())  # complex data may be its own
    tensors = tensors_in(sample)
    foreign = [(index, t) for index, t in enumerate(tensors)
               if t.dtype != dtype and not (t.is_complex() and complex_model)]
    if not foreign:
        return fallback
    chosen = {id(t) for _, t in foreign}
    converted = map_tensors(sample, lambda t: _as_dtype(t, dtype) if id(t) in chosen else t)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            forward(model, converted)
    except Exception:
        return fallback  # the dtype is not (only) the problem: torch's own message is the best there is
    what = ", ".join((f"input tensor {index}" if len(tensors) > 1 else "the data") + f" is {t.dtype}"
                     for index, t in foreign)
    kinds = {t.dtype for _, t in foreign}
    if any(t.is_complex() for _, t in foreign):
        fix = "pass real data (e.g. data.real or data.abs(), whatever the model was trained on)"
    elif any(t.is_quantized for _, t in foreign):
        fix = "pass data.dequantize()"
    else:
        fix = f"convert it, e.g. data.to({dtype})"
        if torch.uint8 in kinds:
            fix += (" (images stored as uint8 usually need scaling as well, e.g. data.float() / 255, and the "
                    "normalisation used in training)")
    return DataError(f"input_data: {what} but the model's parameters are {dtype}; the model fails on it "
                     f"({type(error).__name__}: {str(error).splitlines()[0][:160]}) and runs once the data is "
                     f"converted: {fix}")


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_quantized:
        return tensor.dequantize().to(dtype)
    if tensor.is_complex():
        return tensor.real.to(dtype)
    return tensor.to(dtype)


def explain_in_place_failure(model: nn.Module, sample: Any, error: Exception) -> GraphError | None:
    """When ``error`` is autograd's complaint that a tensor it saved was modified in place, and a plain forward and
    backward pass of the model on ``sample`` (its forward arguments, a couple of samples) fails the same way, the
    model is at fault, not the sensitivity method that met it: a :class:`GraphError` saying so, where, and how to
    fix it. Returns None when the error is something else, or the model alone does not reproduce it.

    The rerun uses ``torch.autograd.detect_anomaly``, whose report names the forward operation whose saved tensor
    was modified. It runs only after a failure; the parameters' ``requires_grad`` flags are put back.
    """
    if not isinstance(error, RuntimeError) or IN_PLACE_MESSAGE not in str(error):
        return None
    params = [p for p in model.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    caught: list[warnings.WarningMessage] = []
    try:
        for param in params:
            param.requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autograd.detect_anomaly(check_nan=False):
                outputs = [t for t in tensors_in(forward(model, sample)) if t.requires_grad]
                if not outputs or not params:
                    return None
                total = sum(t.real.sum() for t in outputs)
                torch.autograd.grad(total, params, allow_unused=True)
    except Exception as again:  # a Ctrl-C still stops everything
        if not isinstance(again, RuntimeError) or IN_PLACE_MESSAGE not in str(again):
            return None
    else:
        return None
    finally:
        for param, flag in zip(params, flags):
            param.requires_grad_(flag)
    where = _forward_site(model, [str(w.message) for w in caught])
    return GraphError(f"the model's forward pass modifies in place a tensor that autograd needs for the gradients, "
                      f"so a gradient-based sensitivity method cannot run on it{where}. Typical causes: `z += y` or "
                      "z.add_(y) on the output of a ReLU, sigmoid or similar layer, nn.ReLU(inplace=True) on a "
                      "tensor used again later, or x[...] = ... on a tensor already used. Write that operation out "
                      "of place (`z = z + y` instead of `z += y`, inplace=False), or pick a gradient-free "
                      "sensitivity such as BalancedL2NormSensitivity (torch said: "
                      f"{str(error).splitlines()[0].split('. Hint')[0]})")


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>\S+)\n\s+(?P<code>[^\n]*)')


def _forward_site(model: nn.Module, messages: list[str]) -> str:
    """Where anomaly detection says the failing operation ran: the last frame of its forward traceback outside
    torch and acps, with the modules whose ``forward`` holds that line (``''`` when the report has none)."""
    report = next((m for m in messages if "Traceback of forward call" in m), None)
    if report is None:
        return ""
    skip = (os.path.dirname(torch.__file__), ACPS_DIR)
    frames = [f for f in _FRAME.finditer(report) if not os.path.abspath(f["file"]).startswith(skip)]
    if not frames:
        return ""
    frame = frames[-1]
    file, line = frame["file"], int(frame["line"])
    modules = [name for name, module in model.named_modules()
               if _runs_line(type(module).forward, file, frame["function"], line)]
    inside = ""
    if modules == [""]:
        inside = ", in the model's own forward"
    elif modules:
        more = f" and {len(modules) - 3} more" if len(modules) > 3 else ""
        inside = f", in the forward of {', '.join(name or 'the model' for name in modules[:3])}{more}"
    return (f": the tensor saved by `{frame['code'].strip()}` ({os.path.basename(file)}:{line}{inside}) is "
            "modified in place afterwards")


def _runs_line(function: Any, file: str, name: str, line: int) -> bool:
    """Whether ``function`` (a module class's ``forward``) is the function ``name`` whose code holds ``line``."""
    code = getattr(function, "__code__", None)
    if code is None or code.co_name != name or os.path.abspath(code.co_filename) != os.path.abspath(file):
        return False
    lines = [number for _, number in dis.findlinestarts(code) if number is not None]
    return bool(lines) and min(lines) <= line <= max(lines)
