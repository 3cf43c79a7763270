"""Load a model and a tensor named on the command line.

A model is named either by a factory, ``package.module:factory`` (the module is imported and the factory called
with no arguments), or by a ``.pt`` file holding a whole pickled model. Unpickling runs whatever code the file
contains, so a model file is only loaded when the caller says so (``allow_pickle=True``, ``--allow-pickle``).
Tensors are loaded with ``torch.load(..., weights_only=True)``, which never runs code from the file.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acps_core._util.atomic import StrPath
from acps_core._util.checkpoints import load_saved, refuse_meta
from acps_core._util.reading import open_limited
from acps_core.errors import AcpsError, ArgumentError, DataError

logger = logging.getLogger(__name__)

#: Suffixes taken for a model file even when the file is missing (so the error says "no such file").
MODEL_FILE_SUFFIXES = (".pt", ".pth")

_SPEC_FORMS = "package.module:factory (a function returning the nn.Module) or the path of a .pt file"


def load_model(spec: str, allow_pickle: bool = False, map_location: str | torch.device = "cpu") -> nn.Module:
    """The ``torch.nn.Module`` that ``spec`` names.

    Args:
        spec: ``package.module:factory``, where ``factory`` (a dotted attribute path is allowed, e.g.
            ``models:Net.build``) is called with no arguments; or the path of a file ``torch.save(model, path)``
            wrote. An existing file, or a name ending in ``.pt``/``.pth``, is taken as a file.
        allow_pickle: consent to unpickle a model file. Unpickling runs any code the file contains, so only
            give it for files you trust.
        map_location: where a model file's tensors are loaded (``torch.load``'s ``map_location``).

    Returns:
        The model, exactly as the factory or file gave it (its train/eval mode is not changed).

    Raises:
        ArgumentError: naming ``spec``: it has neither form, the module cannot be imported, the factory is
            missing, not callable, raises or returns something other than an ``nn.Module``, the file is missing,
            cannot be unpickled or holds no whole model, or it is a file and ``allow_pickle`` is False.
    """
    path = Path(spec)
    if path.is_file() or spec.endswith(MODEL_FILE_SUFFIXES):
        return _load_model_file(spec, path, allow_pickle, map_location)
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ArgumentError(f"model {spec!r} is neither an existing file nor of the form {_SPEC_FORMS}")
    return _call_factory(spec, module_name, attribute)


def _call_factory(spec: str, module_name: str, attribute: str) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise ArgumentError(f"model {spec!r}: no module named {missing!r}; check the spelling, install the "
                                "package, or run from the folder that holds it") from exc
        raise ArgumentError(f"model {spec!r}: importing {module_name} failed because the module {missing!r} it "
                            "imports is not installed") from exc
    except Exception as exc:
        raise ArgumentError(f"model {spec!r}: importing {module_name} raised {type(exc).__name__}: {exc}") from exc

    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ArgumentError(f"model {spec!r}: {module_name} has no attribute {attribute!r}; name a function "
                                "of that module that returns the model")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ArgumentError(f"model {spec!r}: {module_name}.{attribute} is a {type(factory).__name__}, not a "
                            "function; name a function that returns the model")
    try:
        model = factory()
    except Exception as exc:
        raise ArgumentError(f"model {spec!r}: calling {module_name}.{attribute}() with no arguments raised "
                            f"{type(exc).__name__}: {exc}; give a factory that needs no arguments") from exc
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model {spec!r}: {module_name}.{attribute}() returned a {type(model).__name__}, "
                            "not a torch.nn.Module")
    logger.debug("built the model with %s", spec)
    return model


def _load_model_file(spec: str, path: Path, allow_pickle: bool, map_location: str | torch.device) -> nn.Module:
    if not path.is_file():
        raise ArgumentError(f"model file {spec!r} does not exist (or is not a file)")
    if not allow_pickle:
        raise ArgumentError(f"model file {spec!r} holds a pickled model, and unpickling runs any code the file "
                            "contains; if you trust it, pass --allow-pickle (allow_pickle=True), or name a "
                            "factory instead (package.module:factory)")
    try:
        with open_limited(path, "model file", "data", ArgumentError) as stream:
            loaded = torch.load(stream, map_location=map_location, weights_only=False)
    except AcpsError:
        raise
    except (ModuleNotFoundError, AttributeError) as exc:
        # Unpickling rebuilds the model's classes by import: the code that defined them must be importable.
        raise ArgumentError(f"model file {spec!r} cannot be unpickled: {exc}; the module that defines the model's "
                            "class must be importable (run from its folder or install it)") from exc
    except Exception as exc:
        raise ArgumentError(f"model file {spec!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if isinstance(loaded, dict):
        raise ArgumentError(f"model file {spec!r} holds a dict (a state dict or checkpoint), not a whole model; "
                            "name a factory that builds the model and loads those weights (package.module:factory)")
    if not isinstance(loaded, nn.Module):
        raise ArgumentError(f"model file {spec!r} holds a {type(loaded).__name__}, not a torch.nn.Module")
    logger.debug("unpickled the model in %s", path)
    return loaded


def load_tensor(path: StrPath, map_location: str | torch.device = "cpu") -> torch.Tensor:
    """The tensor that ``torch.save(tensor, path)`` wrote, loaded without running code from the file.

    Args:
        path: the file.
        map_location: where the tensor is loaded (``torch.load``'s ``map_location``).

    Raises:
        DataError: naming the file: it is missing or unreadable, not written by ``torch.save``, holds objects
            other than tensors, or holds something that is not one tensor.
    """
    hint = "save one tensor with torch.save(tensor, path)"
    loaded = load_saved(path, map_location, hint)
    if not isinstance(loaded, torch.Tensor):
        raise DataError(f"data file {os.fspath(path)!r} holds a {type(loaded).__name__}, not a tensor; {hint}")
    refuse_meta(loaded, os.fspath(path))
    return loaded


def load_data(path: StrPath, map_location: str | torch.device = "cpu") -> Any:
    """What ``torch.save`` wrote for calibration: a tensor (the model's input), or ``[data, label]`` (a list or
    tuple of two, or a dict with keys ``data`` and ``label``); loaded without running code from the file.

    Raises:
        DataError: naming the file: missing, unreadable, holding objects other than tensors, or another shape.
    """
    where = os.fspath(path)
    loaded = load_saved(path, map_location, "save the input, or [input, labels], with torch.save")
    if isinstance(loaded, dict) and set(loaded) == {"data", "label"}:
        loaded = [loaded["data"], loaded["label"]]
    if isinstance(loaded, torch.Tensor) or (isinstance(loaded, (list, tuple)) and len(loaded) == 2):
        refuse_meta(loaded, where)
        return list(loaded) if isinstance(loaded, (list, tuple)) else loaded
    raise DataError(f"data file {where!r} holds a {type(loaded).__name__}; save the model's input tensor, or "
                    "[input, labels] (a list of two tensors) with torch.save")
