"""Files ``torch.save`` wrote, loaded without running code from them: calibration data and state dicts.

Every file is opened as a regular file within the data size limit (:mod:`acps_core._util.reading`) and loaded
with ``torch.load(..., weights_only=True)``, so no code in it runs; every failure is a
:class:`~acps_core.errors.DataError` naming the file and how to save it right.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from typing import Any

import torch
from torch import nn

from acps_core._util.atomic import StrPath
from acps_core._util.reading import open_limited
from acps_core._util.tensors import tensors_in
from acps_core.errors import AcpsError, DataError

logger = logging.getLogger(__name__)


def load_saved(path: StrPath, map_location: str | torch.device, hint: str, what: str = "data file") -> Any:
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


def refuse_meta(loaded: Any, where: str) -> None:
    """Tensors on the meta device carry shapes but no values: nothing can be computed from them."""
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
    checkpoint = load_saved(where, "cpu", hint, what)
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
    # Modules that cache tensors computed from their weights in eval mode (timm's attention biases) drop the cache
    # when their mode is set: the forward passes run before the load must not leave them stale.
    modes = [(module, module.training) for module in model.modules()]
    for module, training in modes:  # (a parent's train() sets its children's mode: each is set back after it)
        module.train(training)
    logger.debug("loaded %s into the %s", where, role)
