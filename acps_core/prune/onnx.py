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
from acps_core.errors import ArgumentError
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
    from acps_core.errors import AcpsError

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
    exported = io.BytesIO()
    try:
        # The TorchScript exporter (deprecated, still shipped) handles any model that runs; the torch.export one
        # needs onnxscript and an exportable forward, so the reliable path is chosen and its warning silenced.
        with preserved_model_state(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model.eval()
            torch.onnx.export(model, args, exported,  # type: ignore[arg-type]  # a file object works too
                              input_names=list(input_names) if input_names else None,
                              output_names=list(output_names) if output_names else None,
                              dynamic_axes=dict(dynamic_axes) if dynamic_axes else None, dynamo=False)
    except Exception as exc:
        raise AcpsError(f"ONNX export to {path} failed: {type(exc).__name__}: {exc}") from exc
    atomic_write_bytes(path, exported.getvalue(), "save_path")
    return path
