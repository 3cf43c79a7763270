"""Exporting a (pruned) model to ONNX, written atomically."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acps_core._util.atomic import StrPath, atomic_write_bytes, check_writable_output
from acps_core._util.data import check_dense, model_device
from acps_core._util.model_checks import check_initialized
from acps_core._util.state import preserved_model_state
from acps_core._util.wrappers import unwrap
from acps_core.errors import AcpsError, ArgumentError
from acps_core.prune.copying import model_input, path_argument


def onnx_path(save_path: StrPath) -> StrPath:
    """The file :func:`save_prune_retrain_model` writes for ``save_path``: ``save_path`` itself when its name ends
    in ``.onnx`` (any case), else with ``.onnx`` appended (``model`` -> ``model.onnx``, ``.onnx`` ->
    ``.onnx.onnx``). A path that names a folder is returned as it is, for the check to refuse."""
    text = os.fspath(save_path)
    path = Path(text)
    if path.name in ("", ".", "..") or text.endswith(os.sep):
        return save_path
    if path.name.lower().endswith(".onnx") and path.name.lower() != ".onnx":
        return path
    return path.with_name(path.name + ".onnx")


def save_prune_retrain_model(model: nn.Module, save_path: StrPath, input_data: Any,
                             input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                             dynamic_axes: Mapping[str, Any] | None = None) -> Path:
    """Export the (pruned) model to ONNX at ``save_path`` (``.onnx`` appended when missing), atomically.

    Needs the ``onnx`` extra (``pip install 'acps-core[onnx]'``).

    Returns:
        The path of the ONNX file written.

    Raises:
        AcpsError: when the ONNX exporter is not installed, or the export fails.
        OutputPathError: ``save_path`` is not a file path or cannot be written.
    """

    path = check_writable_output(onnx_path(path_argument(save_path, "save_path")), "save_path")
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, _ = unwrap(model)
    check_initialized(model)
    try:
        import onnx  # noqa: F401 - the exporter needs it; fail early with the fix
    except ImportError as exc:
        raise AcpsError("exporting to ONNX needs the onnx package: pip install 'acps-core[onnx]'") from exc
    data = model_input(input_data, model_device(model))
    check_dense(data, "input_data")
    args = data if isinstance(data, tuple) else (data,)
    names = {"input_names": list(input_names) if input_names else None,
             "output_names": list(output_names) if output_names else None,
             "dynamic_axes": dict(dynamic_axes) if dynamic_axes else None}
    with preserved_model_state(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model.eval()
        noted: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as noted:  # shown only if this exporter's file is kept
                warnings.simplefilter("always")
                for chosen in (DeprecationWarning, FutureWarning):  # it is deprecated, and chosen knowingly
                    warnings.simplefilter("ignore", chosen)
                exported = _torchscript_export(model, args, names)
        except Exception as first:
            noted = []
            # The TorchScript exporter (deprecated, still shipped) handles any model that runs but lacks some
            # operators (Hugging Face's mask building uses aten::diff); the torch.export one, with onnxscript,
            # takes those.
            try:
                exported = _torch_export(model, args, names)
            except Exception as second:
                raise AcpsError(f"ONNX export to {path} failed: {type(first).__name__}: {first}"
                                + (f"; the torch.export exporter also failed: {type(second).__name__}: {second}"
                                   if not isinstance(second, ImportError) else
                                   " (pip install onnxscript lets the torch.export exporter try)")) from first
    for note in noted:
        warnings.warn_explicit(note.message, note.category, note.filename, note.lineno)
    atomic_write_bytes(path, exported, "save_path")
    return path


def _torchscript_export(model: nn.Module, args: tuple[Any, ...], names: dict[str, Any]) -> bytes:
    exported = io.BytesIO()
    torch.onnx.export(model, args, exported, dynamo=False, **names)  # type: ignore[arg-type]  # a file object works
    return exported.getvalue()


def _torch_export(model: nn.Module, args: tuple[Any, ...], names: dict[str, Any]) -> bytes:
    import onnxscript  # noqa: F401 - the torch.export exporter needs it

    inputs, axes = names["input_names"] or [], names["dynamic_axes"] or {}
    if len(inputs) == len(args) and set(axes) <= set(inputs) | set(names["output_names"] or []):
        # The same free dims, said the way this exporter takes them (outputs follow their inputs).
        shapes = tuple({dim: _dim(axes[name], dim) for dim in axes.get(name, {})} or None for name in inputs)
        names = {**names, "dynamic_axes": None, "dynamic_shapes": shapes if any(shapes) else None}
    program = torch.onnx.export(model, args, dynamo=True, verbose=False, **names)
    if program is None:
        raise AcpsError("the torch.export exporter returned no program")
    data: bytes = program.model_proto.SerializeToString()
    return data


def _dim(axes: Any, dim: int) -> Any:
    """The free dim ``dim`` as torch.export takes it, keeping the name ``dynamic_axes`` gave it (``{0: "batch"}``)."""
    name = axes.get(dim) if isinstance(axes, Mapping) else None
    return torch.export.Dim(name) if isinstance(name, str) and name.isidentifier() else torch.export.Dim.DYNAMIC
