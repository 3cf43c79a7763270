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
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acps_core._util.atomic import StrPath
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


def _load_saved(path: StrPath, map_location: str | torch.device, hint: str, what: str = "data file") -> Any:
    """What ``torch.save`` wrote at ``path``, loaded with ``weights_only=True`` (no code from the file runs) from
    a regular file within the data size limit (see :mod:`acps_core._util.reading`); every failure is a DataError naming
    the file and ending with ``hint`` (how to save it right)."""
    where = os.fspath(path)
    try:
        with open_limited(where, what, "data", DataError) as stream:
            return torch.load(stream, map_location=map_location, weights_only=True)
    except AcpsError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read {what} {where!r}: {exc.strerror or exc}") from exc
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice (including "set weights_only=False"); keep only what was refused.
        refused = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n|$)", str(exc))
        detail = refused.group(1) if refused else str(exc).strip().splitlines()[0]
        if detail.startswith("Unsupported global"):
            raise DataError(f"{what} {where!r} holds objects other than tensors, which are not loaded because "
                            f"unpickling them could run code ({detail}); {hint}") from exc
        raise DataError(f"{what} {where!r} is not a file torch.save wrote ({detail}); {hint}") from exc
    except MemoryError as exc:
        raise DataError(f"{what} {where!r} does not fit in memory; {hint}") from exc
    except Exception as exc:
        raise DataError(f"{what} {where!r} is not a file torch.save wrote ({type(exc).__name__}: {exc}); "
                        f"{hint}") from exc


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
    loaded = _load_saved(path, map_location, hint)
    if not isinstance(loaded, torch.Tensor):
        raise DataError(f"data file {os.fspath(path)!r} holds a {type(loaded).__name__}, not a tensor; {hint}")
    _refuse_meta(loaded, os.fspath(path))
    return loaded


def load_data(path: StrPath, map_location: str | torch.device = "cpu") -> Any:
    """What ``torch.save`` wrote for calibration: a tensor (the model's input), or ``[data, label]`` (a list or
    tuple of two, or a dict with keys ``data`` and ``label``); loaded without running code from the file.

    Raises:
        DataError: naming the file: missing, unreadable, holding objects other than tensors, or another shape.
    """
    where = os.fspath(path)
    loaded = _load_saved(path, map_location, "save the input, or [input, labels], with torch.save")
    if isinstance(loaded, dict) and set(loaded) == {"data", "label"}:
        loaded = [loaded["data"], loaded["label"]]
    if isinstance(loaded, torch.Tensor) or (isinstance(loaded, (list, tuple)) and len(loaded) == 2):
        _refuse_meta(loaded, where)
        return list(loaded) if isinstance(loaded, (list, tuple)) else loaded
    raise DataError(f"data file {where!r} holds a {type(loaded).__name__}; save the model's input tensor, or "
                    "[input, labels] (a list of two tensors) with torch.save")


def _refuse_meta(loaded: Any, where: str) -> None:
    """Tensors on the meta device carry shapes but no values: nothing can be computed from them."""
    from acps_core._util.data import tensors_in

    meta = [t for t in tensors_in(loaded) if t.device.type == "meta"]
    if meta:
        raise DataError(f"data file {where!r} holds tensors on the meta device (shape {list(meta[0].shape)}), which "
                        "hold no values; save real data: torch.save([images, labels], path) with tensors on the CPU")


def load_weights(model: nn.Module, path: StrPath, what: str = "weights file", state_dict_name: str | None = None,
                 role: str = "model") -> None:
    """Load the state dict saved at ``path`` into ``model`` (in place), read with ``weights_only=True``.

    The file may hold the state dict itself, a checkpoint holding it under ``state_dict_name``, or (without
    ``state_dict_name``) under ``"state_dict"`` or ``"model"``. Keys saved from a wrapped model
    (``module.`` or ``_orig_mod.`` before every name) are matched to the plain model.

    Args:
        model: the model to load into.
        path: the file ``torch.save(model.state_dict(), path)`` wrote.
        what: what the file is, for messages (e.g. ``"--weights"``, ``"checkpoint"``).
        state_dict_name: the key of the state dict inside the checkpoint, if it is nested.
        role: what ``model`` is, for messages (e.g. ``"pruned model"``).

    Raises:
        DataError: naming the file: missing, not a regular file, over the size limit, not loadable safely, not a
            state dict, or not fitting ``model`` (missing, unexpected or differently shaped entries).
    """
    where = os.fspath(path)
    hint = "save it with torch.save(model.state_dict(), path)"
    checkpoint = _load_saved(where, "cpu", hint, what)
    state = checkpoint
    if state_dict_name is not None:
        if not isinstance(checkpoint, dict) or state_dict_name not in checkpoint:
            keys = list(checkpoint)[:8] if isinstance(checkpoint, dict) else []
            raise DataError(f"{what} {where!r} has no entry {state_dict_name!r} (it has {keys})")
        state = checkpoint[state_dict_name]
    elif isinstance(checkpoint, dict) and not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state = next((checkpoint[k] for k in ("state_dict", "model") if isinstance(checkpoint.get(k), dict)),
                     checkpoint)
    if not isinstance(state, dict):
        raise DataError(f"{what} {where!r} holds a {type(state).__name__}, not a state dict; {hint}")
    own = model.state_dict()
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix):]: v for k, v in state.items()}
    mismatched = [f"{k}: file {tuple(v.shape)} vs {role} {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise DataError(f"{what} {where!r} does not fit the {role} ({'; '.join(mismatched[:4])}); was it saved from "
                        f"this {role}?")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else "")] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:4])}" + (" ..." if len(unexpected) > 4 else "")]
            if unexpected else [])
        raise DataError(f"{what} {where!r} does not fit the {role} ({'; '.join(parts)}); was it saved from this "
                        f"{role}?")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise DataError(f"{what} {where!r} does not fit the {role}: {exc}") from exc
    logger.debug("loaded %s into the %s", where, role)
