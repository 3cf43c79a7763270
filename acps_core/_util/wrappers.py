"""The user's own module inside the wrappers that training code puts around it.

``nn.DataParallel`` and ``DistributedDataParallel`` hold the model as ``.module`` and name every layer
``module.<name>``; ``torch.compile`` returns an ``OptimizedModule`` holding it as ``._orig_mod`` and names its
layers ``_orig_mod.<name>``. A config written with those names fits no plain model, and a plain model's config
names none of them, so acps searches and prunes the module inside: the names it writes are the user's own.
"""

from __future__ import annotations

from typing import cast

from torch import nn


def unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module inside any DataParallel, DistributedDataParallel and ``torch.compile`` wrappers of ``model``
    (``model`` itself when there are none), and the wrappers' class names, outermost first."""
    wrappers = []
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            wrappers.append(type(model).__name__)
            model = cast(nn.Module, model.module)
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            wrappers.append("torch.compile")
            model = cast(nn.Module, model._orig_mod)
        else:
            return model, wrappers


def unwrapped_note(wrappers: list[str]) -> str:
    """What a result's notes say about the wrappers :func:`unwrap` took off."""
    return (f"the model is wrapped ({' in '.join(reversed(wrappers))}); acps worked on the module inside, so the "
            "layer names it writes and reads are that module's own (no 'module.' or '_orig_mod.' prefix)")
