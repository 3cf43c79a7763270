"""Self-attention written with one fused ``qkv`` Linear, as timm's vision transformers write it::

    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)
    x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
    x = self.proj(x)

The head count is a constant the forward reads from the module, so the graph cannot follow it through the reshape;
what the module computes is known instead, and it is pruned like ``nn.MultiheadAttention``: whole heads (the q, k
and v rows of a head in ``qkv`` and the matching columns of ``proj``), with ``num_heads`` (and ``attn_dim``) set to
what is kept. A module is recognised by its parts, not its class: a ``qkv`` Linear ``3 * num_heads * head_dim``
wide (``head_dim`` read from the module or derived from ``qkv``), a ``proj`` Linear, an integer ``num_heads``, own
parameters only with one dim of ``num_heads`` entries (Swin's relative-position bias table, sliced with the heads),
and no child with parameters but per-head norms over ``head_dim``. Whether its forward is
the one above is proven, like every mapping, by the check by execution (:mod:`acps_core.graph.verify`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from acps_core.layers.attention import AttentionAdapter
from acps_core.layers.base import take

#: Children that may hold parameters without changing with the heads: norms over ``head_dim`` applied to q and k.
HEAD_NORMS = frozenset({"q_norm", "k_norm"})


def head_size(module: nn.Module) -> int | None:
    """The module's ``head_dim``, or, without one, ``qkv``'s width over three times ``num_heads``."""
    head_dim, heads, qkv = getattr(module, "head_dim", None), getattr(module, "num_heads", None), getattr(
        module, "qkv", None)
    if isinstance(head_dim, int):
        return head_dim
    if isinstance(heads, int) and heads > 0 and isinstance(qkv, nn.Linear) and qkv.out_features % (3 * heads) == 0:
        return qkv.out_features // (3 * heads)
    return None


def head_parameters(module: nn.Module) -> list[tuple[str, int]] | None:
    """The module's own parameters, each with the one dim that holds its heads (a relative-position bias table
    of ``(positions, num_heads)``); None when one of them has no such dim, or several."""
    heads = getattr(module, "num_heads", None)
    found = []
    for name, param in module._parameters.items():
        if param is None:
            continue
        dims = [d for d, size in enumerate(param.shape) if size == heads]
        if len(dims) != 1:
            return None
        found.append((name, dims[0]))
    return found


def fused_qkv_attention(module: nn.Module) -> bool:
    """Whether ``module`` is self-attention with a fused ``qkv`` Linear that acps prunes heads of (see the module
    docs)."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads, head_dim = getattr(module, "num_heads", None), head_size(module)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)
            and head_dim is not None):
        return False
    width = heads * head_dim
    # (proj's width is not checked: while the prune step slices a model, proj loses its columns after qkv its rows)
    if qkv.out_features != 3 * width or head_parameters(module) is None:
        return False
    if getattr(module, "attn_dim", width) != width:
        return False
    for name, child in module.named_children():
        if name in ("qkv", "proj") or name in HEAD_NORMS or not any(True for _ in child.parameters()):
            continue
        return False  # a gate, a norm over the heads' width, ...: not mapped
    return all(_over_head_dim(getattr(module, name, None), head_dim) for name in HEAD_NORMS)


def _over_head_dim(norm: Any, head_dim: int) -> bool:
    """A q/k norm with no parameters, or whose parameters are one per ``head_dim`` entry (shared by all heads)."""
    if norm is None:
        return True
    return all(p.shape == (head_dim,) for p in norm.parameters())


class FusedAttentionAdapter(AttentionAdapter):
    """Heads of self-attention with a fused ``qkv`` Linear (see the module docs). Its output channels are the
    width of its heads: the q, k and v rows of ``qkv`` (three parts); its inputs are ``qkv``'s columns."""

    out_projection = "proj"

    def traced_whole(self, module: nn.Module) -> bool:
        return fused_qkv_attention(module)

    def heads(self, module: nn.Module) -> tuple[int, int]:
        attention: Any = module
        return int(attention.num_heads), int(head_size(module) or 0)

    def batch_first(self, module: nn.Module) -> bool:
        return True

    def self_attention(self) -> bool:
        return True

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return [(name, 0, part) for part in range(3) for name in ("qkv.weight", "qkv.bias")]

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return [("qkv.weight", 1, 1)]

    def filter_rows(self, module: nn.Module) -> torch.Tensor:
        """The q, k and v rows of each head channel, taken together."""
        width = self.out_size(module)
        attention: Any = module
        weight: torch.Tensor = attention.qkv.weight.detach()
        return weight.reshape(3, width, -1).transpose(0, 1).reshape(width, -1)

    def out_size(self, module: nn.Module) -> int:
        heads, head_dim = self.heads(module)
        return heads * head_dim

    def in_size(self, module: nn.Module) -> int:
        attention: Any = module
        return int(attention.qkv.in_features)

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        """Keep the heads of the head channels ``index`` (whole heads, as the graph made sure)."""
        attention: Any = module
        heads, head_dim = self.heads(module)
        width = heads * head_dim
        rows = torch.cat([index + part * width for part in range(3)])
        kept_heads = index[::head_dim] // head_dim
        for name, dim in head_parameters(module) or []:
            setattr(module, name, take(getattr(module, name), dim, kept_heads))
        qkv = attention.qkv
        qkv.weight = take(qkv.weight, 0, rows)
        qkv.bias = take(qkv.bias, 0, rows)
        qkv.out_features = len(rows)
        attention.num_heads = len(index) // head_dim
        if hasattr(attention, "attn_dim"):
            attention.attn_dim = len(index)

    def confirm(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Prune the first head in a copy and compare its output with the module's with that head's columns of
        ``proj`` zeroed (what masking computes): the forward reads its head count from ``num_heads`` (and
        ``attn_dim``) and nothing else depends on it."""
        heads, head_dim = self.heads(module)
        if heads < 2:
            return True  # no head can go; nothing to prove
        if module.training:
            return False  # dropout would make the two calls differ
        keep = torch.arange(head_dim, heads * head_dim)
        trial: Any = copy.deepcopy(module)
        reference: Any = copy.deepcopy(module)
        try:
            with torch.no_grad():
                self.keep_outputs(trial, keep)
                trial.proj.weight = take(trial.proj.weight, 1, keep)
                trial.proj.in_features = len(keep)
                reference.proj.weight[:, :head_dim] = 0
                got, expected = trial(*args, **kwargs), reference(*args, **kwargs)
        except Exception:
            return False
        if not (isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor)) or got.shape != expected.shape:
            return False
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-6)))

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        qkv: Any = module.qkv
        qkv.weight = take(qkv.weight, 1, index)
        qkv.in_features = len(index)
