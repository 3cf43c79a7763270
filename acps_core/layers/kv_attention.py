"""Self-attention with its queries and its keys and values projected apart, as timm's PVT-v2 writes it::

    B, N, C = x.shape
    q = self.q(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
    x = self.norm(self.sr(x.permute(0, 2, 1).reshape(B, C, H, W)).reshape(B, C, -1).permute(0, 2, 1))  # optional
    kv = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    x = F.scaled_dot_product_attention(q, *kv.unbind(0)).transpose(1, 2).reshape(B, N, C)
    x = self.proj(x)

Its heads are pruned whole, as for a fused ``qkv`` projection (:mod:`acps_core.layers.fused_attention`): ``q``'s
rows and ``kv``'s, read one after the other, are every head's queries, then keys, then values. A module is
recognised by its parts:

- ``q``, ``kv`` and ``proj``: Linears (or 1x1 convs), ``q`` ``num_heads * head_dim`` wide and ``kv`` twice that;
- an integer ``num_heads`` and ``head_dim``;
- other children (a spatial reduction of the keys' input: a strided conv, a norm, a pooling) with no parameter
  that has a dim of ``num_heads`` entries. Their width is the input's, which the forward reads from the input
  for both, so with them the input channels are left alone (the reason says so); without them, the input
  channels are pruned as ``q``'s and ``kv``'s columns.

The forward merges the heads back to the input's width ``C``, so once heads are pruned it follows them
(:mod:`acps_core.layers.following`). Pruning a head in a copy must compute what masking it computes on the
module's first traced call, and so must pruning an input channel where the input is pruned; the cost of the keys'
and values' projection (on fewer positions after a spatial reduction), of the attention products and of the
reduction is what a FLOP counter measures on that call.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch
from torch import nn

from acps_core.layers import projections
from acps_core.layers.attention import measured_call, positions
from acps_core.layers.following import follow_heads, input_prunes_like_masking, prunes_like_masking
from acps_core.layers.fused_attention import FusedAttentionAdapter
from acps_core.layers.head_entries import HeadLayout, head_parameters, keep_head_entries
from acps_core.layers.projections import in_width, is_projection, out_width, output_rows
from acps_core.layers.transposed_linear import transposed_linear

PARTS = ("q", "kv", "proj")


def _extra_children(module: nn.Module) -> list[str]:
    """Its children with parameters other than ``q``, ``kv`` and ``proj``: the keys' input's reduction."""
    return [name for name, child in module.named_children()
            if name not in PARTS and any(True for _ in child.parameters())]


def q_kv_attention(module: nn.Module) -> bool:
    """Whether ``module`` is self-attention with separate ``q`` and ``kv`` projections that acps prunes heads of
    (see the module docs)."""
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not (isinstance(heads, int) and isinstance(head_dim, int) and heads > 0 and head_dim > 0):
        return False
    if not all(is_projection(getattr(module, name, None)) for name in PARTS):
        return False
    widths = [out_width(module.get_submodule(name)) for name in ("q", "kv")]
    if widths != [heads * head_dim, 2 * heads * head_dim]:
        return False  # (proj's width is not checked: the prune step cuts its inputs after q's and kv's rows)
    return heads < 2 or head_parameters(module, heads, PARTS) == []


#: The classes whose forward must follow their pruned heads, found on a first call.
_FOLLOWING: set[type] = set()
#: Per module, measured on its first call: (attention products per query position and value channel, kv's share
#: of the projections' positions, multiply-accumulates of the reduction).
_MEASURED: weakref.WeakKeyDictionary[nn.Module, tuple[float, float, float]] = weakref.WeakKeyDictionary()
_UNMEASURED = (0.0, 1.0, 0.0)  # (as many keys as queries, kv on every position, no reduction)


class KVAttentionAdapter(FusedAttentionAdapter):
    """Heads of self-attention with separate ``q`` and ``kv`` projections (see the module docs)."""

    def traced_whole(self, module: nn.Module) -> bool:
        return q_kv_attention(module)

    def layout(self, module: nn.Module, head_major: bool | None = None) -> HeadLayout:
        attention: Any = module
        return HeadLayout(int(attention.num_heads), int(attention.head_dim), int(attention.head_dim), False)

    def qkv_path(self, module: nn.Module) -> str:
        return "q"  # the projection of the module's input (its width, its channel dim)

    def input_fixed(self, module: nn.Module) -> str | None:
        extra = _extra_children(module)
        if not extra:
            return None
        return (f"its keys and values are computed from {', '.join(extra)}, which keep the input's width (read "
                "from the input by the forward), so its input channels are left alone")

    def attended(self, module: nn.Module) -> float:
        return _MEASURED.get(module, _UNMEASURED)[0]

    def kv_share(self, module: nn.Module) -> float:
        return _MEASURED.get(module, _UNMEASURED)[1]

    def fixed_macs(self, module: nn.Module) -> float:
        return _MEASURED.get(module, _UNMEASURED)[2]

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int | tuple[int, ...]]]:
        rows = self.layout(module).row_channels()
        width = out_width(module.get_submodule("q"))
        found: list[tuple[str, int, int | tuple[int, ...]]] = []
        for name, part in (("q", rows[:width]), ("kv", rows[width:])):
            dim = 1 if transposed_linear(module.get_submodule(name)) else 0
            found += [(f"{name}.weight", dim, part), (f"{name}.bias", 0, part)]
        return found

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        names = ["q"] if _extra_children(module) else ["q", "kv"]
        return [(f"{name}.weight", 0 if transposed_linear(module.get_submodule(name)) else 1, 1) for name in names]

    def filter_rows(self, module: nn.Module) -> torch.Tensor:
        """Per head channel, the norm of its value row and of its share of its head's query and key rows."""
        squares = torch.cat([output_rows(module.get_submodule(name)).double().pow(2).flatten(1).sum(dim=1)
                             for name in ("q", "kv")])
        norms = torch.zeros(self.out_size(module), dtype=torch.float64)
        norms.index_add_(0, torch.tensor(self.layout(module).row_channels()), squares.cpu())
        return norms.sqrt().unsqueeze(1)

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        layout = self.layout(module)
        _keep_heads(module, layout, index[::layout.value_dim] // layout.value_dim)

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        for name in ["q"] if _extra_children(module) else ["q", "kv"]:
            projections.keep_inputs(module.get_submodule(name), index)
        _follow_if_needed(module)

    def confirm(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether pruning a head in a copy computes what masking it computes (with the forward as written, or
        else following the heads), and so pruning an input channel where the input is pruned; then the cost of
        the call is measured."""
        heads = self.layout(module).heads
        if module.training:
            return False  # dropout would make the two calls differ
        for follow in (False, True):
            if heads > 1 and not _prunes_like_masking(self, module, follow, args, kwargs):
                continue

            def keep_inputs(trial: nn.Module, index: torch.Tensor, follow: bool = follow) -> None:
                for name in ("q", "kv"):
                    projections.keep_inputs(trial.get_submodule(name), index)
                _follow_if_needed(trial, follow)

            if not self.input_fixed(module) and not input_prunes_like_masking(
                    module, keep_inputs, partial(self.input_dim, module), args, kwargs):
                continue
            if not _measure(self, module, args, kwargs):
                break
            if follow:
                _FOLLOWING.add(type(module))
            return True
        _MEASURED.pop(module, None)
        return False

    def unconfirmed(self, module: nn.Module, name: str) -> str:
        return (f"{name} ({type(module).__name__}) is attention with q and kv projections, but a copy with one "
                "head pruned (its q and kv rows and proj inputs, num_heads) or one input channel pruned did not "
                "compute what masking it computes, or its queries do not come from every position of its input (a "
                "class token's or a learned query's attention), so its heads are left alone")


def _measure(adapter: KVAttentionAdapter, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """What one call costs: the attention products (what the projections and the reduction leave), kv's
    positions over q's, and the reduction. False when it cannot be measured, or when ``q`` does not run on every
    position of the input (queries from a class token or a learned latent: another kind of attention)."""
    costs = measured_call(module, args, kwargs)
    count = positions(args, kwargs, partial(adapter.input_dim, module))
    q = module.get_submodule("q")
    if not costs or not count or costs.get("q", 0.0) != count * in_width(q) * out_width(q):
        return False
    extra = sum(costs.get(name, 0.0) for name in _extra_children(module))
    products = costs[""] - extra - sum(costs.get(name, 0.0) for name in PARTS)
    share = costs.get("kv", 0.0) / (2 * costs["q"])
    _MEASURED[module] = (max(0.0, products) / (count * adapter.out_size(module)), share, extra)
    return True


def _follow_if_needed(module: nn.Module, follow: bool | None = None) -> None:
    if type(module) in _FOLLOWING if follow is None else follow:
        follow_heads(module, 1 if isinstance(module.get_submodule("q"), nn.modules.conv._ConvNd) else -1)


def _keep_heads(module: nn.Module, layout: HeadLayout, kept: torch.Tensor, follow: bool | None = None) -> None:
    """Slice ``module`` to the heads ``kept``: ``q``'s and ``kv``'s rows, its head count (and any per-head cache),
    and make its forward follow the heads when its kind needs it (or ``follow``)."""
    rows = layout.head_rows(kept)
    width = layout.heads * layout.key_dim
    projections.keep_outputs(module.get_submodule("q"), rows[rows < width])
    projections.keep_outputs(module.get_submodule("kv"), rows[rows >= width] - width)
    keep_head_entries(module, layout.heads, kept, PARTS)
    attention: Any = module
    attention.num_heads = len(kept)
    _follow_if_needed(module, follow)


def _prunes_like_masking(adapter: KVAttentionAdapter, module: nn.Module, follow: bool, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> bool:
    """Prune the first head in a copy and compare with the module with that head's inputs of ``proj`` zeroed."""
    layout = adapter.layout(module)
    keep = torch.arange(layout.value_dim, layout.heads * layout.value_dim)

    def prune(trial: nn.Module) -> None:
        _keep_heads(trial, layout, torch.arange(1, layout.heads), follow)
        projections.keep_inputs(trial.get_submodule("proj"), keep)

    def mask(reference: nn.Module) -> None:
        projections.zero_inputs(reference.get_submodule("proj"), 0, layout.value_dim)

    return prunes_like_masking(module, prune, mask, args, kwargs)
