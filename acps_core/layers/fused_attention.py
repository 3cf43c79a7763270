"""Self-attention written with one fused ``qkv`` projection, as timm's vision models write it::

    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)
    x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
    x = self.proj(x)

The head count is a constant the forward reads from the module, so the graph cannot follow it through the reshape;
what the module computes is known instead, and it is pruned like ``nn.MultiheadAttention``: whole heads (the q, k
and v rows of a head in ``qkv``, the matching inputs of ``proj``, and the per-head parameters), with
``num_heads`` and the widths derived from it set to what is kept.

A module is recognised by its parts, not its class:

- ``qkv`` (GPT-2: ``c_attn``): a Linear, a Linear stored transposed (GPT-2's ``Conv1D``) or a 1x1 Conv2d, or a
  module holding one followed by norms over its outputs (LeViT's Linear + BatchNorm),
  ``num_heads * (2 * key_dim + value_dim)`` wide. The per-head widths are read from the module
  (``head_dim``, ``dim_head``, ``key_dim`` or ``dim_head_qk``; ``val_dim`` or ``dim_head_v`` when the values are
  wider than the keys, as in LeViT and EfficientFormer) or, without them, derived from ``qkv``'s width.
- ``proj`` (GPT-2: ``c_proj``), the projection that reads the heads (the same kinds of layer, or a module holding
  one, after an activation or before norms over its outputs), or no ``proj`` at all: then the heads are the
  module's output channels (BoTNet).
- an integer ``num_heads``; own parameters and children's parameters only with one dim of ``num_heads`` entries
  (relative-position bias tables, attention biases, temperatures: sliced with the heads) or none (per-head-dim
  position embeddings and q/k norms, which all heads share).

The rows of ``qkv`` are laid out either part by part (every head's q, then every head's k, then v: ViT, BoTNet) or
head by head (each head's q, k and v together: EfficientFormer, LeViT, MaxViT). Which one a module's forward
assumes, and that nothing else in it depends on the head count, is proven on its first traced call
(:meth:`FusedAttentionAdapter.confirm`): one head is pruned in a copy, and the copy's output must equal what
masking that head computes. A module that fails is traced function by function instead.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch
from torch import nn

from acps_core.layers import projections
from acps_core.layers.attention import AttentionAdapter, measured_call, positions
from acps_core.layers.base import adapter_for
from acps_core.layers.following import follow_heads, input_prunes_like_masking, prunes_like_masking
from acps_core.layers.head_convs import head_conv_children, keep_head_convs
from acps_core.layers.head_entries import HeadLayout, head_parameters, keep_head_entries
from acps_core.layers.projections import in_width, is_projection, out_width, output_rows
from acps_core.layers.transposed_linear import transposed_linear

#: Attributes that hold the per-head width of queries and keys (the first found is taken).
KEY_DIMS = ("head_dim", "dim_head", "key_dim", "dim_head_qk")
#: Attributes that hold the per-head width of values, when it differs from the keys'.
VALUE_DIMS = ("val_dim", "dim_head_v")
#: Size attributes the forward may read that are the head count times the value width or the key width.
VALUE_WIDTHS = ("attn_dim", "val_attn_dim", "dim_out_v", "split_size")
KEY_WIDTHS = ("key_attn_dim", "dim_out_qk")
#: Names of the fused q/k/v projection, and of the projection that reads the heads (GPT-2: ``c_attn``, ``c_proj``).
QKV_NAMES = ("qkv", "c_attn")
PROJ_NAMES = ("proj", "c_proj")
#: Children applied to q and k whose parameters (one per ``head_dim`` entry) all heads share.
HEAD_NORMS = frozenset({"q_norm", "k_norm"})


#: The layout each kind of module was proven to have (by its class and its ``head_first`` flag, if any), filled by
#: :meth:`FusedAttentionAdapter.confirm`; a module is traced before it is pruned, in the same process.
_PROVEN: dict[tuple[type, Any], bool] = {}
#: The kinds whose forward must follow their pruned heads (:mod:`acps_core.layers.following`), found there too.
_FOLLOWING: set[tuple[type, Any]] = set()
#: Per module, its attention products measured on its first call (:func:`measured_call`).
_ATTENDED: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()
#: Per module its first call refused: which trial failed ("training", "heads" or "inputs"), for the reason.
_REFUSED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _layout_key(module: nn.Module) -> tuple[type, Any]:
    return type(module), getattr(module, "head_first", None)


def projection_parts(module: nn.Module | None) -> tuple[str, list[str]] | None:
    """``(layer, norms)``: the path of the one Linear/1x1 conv inside ``module`` ('' for the module itself) and
    the paths of the norms after it (over its outputs, as the check by execution proves); None when the module
    holds anything else with parameters."""
    if module is None:
        return None
    if is_projection(module):
        return "", []
    layer, norms = None, []
    for path, child in module.named_modules():
        if not any(True for _ in child.parameters(recurse=False)):
            continue
        if is_projection(child) and layer is None:
            layer = path
            continue
        adapter = adapter_for(child)
        if adapter is None or adapter.role != "follower" or layer is None:
            return None
        norms.append(path)
    # (their widths are not compared with the layer's: while the prune step slices a model, the layer loses
    # its rows before its norms do)
    return None if layer is None else (layer, norms)


def _name(module: nn.Module, names: tuple[str, ...]) -> str:
    """The first of ``names`` the module has a child called (the first name when none)."""
    return next((name for name in names if isinstance(getattr(module, name, None), nn.Module)), names[0])


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    child = getattr(module, _name(module, names), None)
    return child if isinstance(child, nn.Module) else None


def _joined(*paths: str) -> str:
    return ".".join(p for p in paths if p)


def head_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(key_dim, value_dim)`` per head: read from the module's attributes, or, without them, ``qkv``'s width
    over three times ``num_heads``."""
    key = next((v for name in KEY_DIMS if isinstance(v := getattr(module, name, None), int)), None)
    value = next((v for name in VALUE_DIMS if isinstance(v := getattr(module, name, None), int)), key)
    if key is not None and value is not None:
        return key, value
    heads, parts = getattr(module, "num_heads", None), projection_parts(_child(module, QKV_NAMES))
    if not isinstance(heads, int) or heads <= 0 or parts is None:
        return None
    rows = out_width(module.get_submodule(_joined(_name(module, QKV_NAMES), parts[0])))
    return (rows // (3 * heads),) * 2 if rows % (3 * heads) == 0 else None


def fused_qkv_attention(module: nn.Module) -> bool:
    """Whether ``module`` is self-attention with a fused ``qkv`` projection that acps prunes heads of (see the
    module docs)."""
    heads = getattr(module, "num_heads", None)
    if not isinstance(heads, int) or heads <= 0:
        return False
    dims = head_dims(module)
    qkv, proj = projection_parts(_child(module, QKV_NAMES)), _child(module, PROJ_NAMES)
    if dims is None or qkv is None:
        return False
    if proj is not None and projection_parts(proj) is None:
        return False
    key_dim, value_dim = dims
    # (proj's width is not checked: while the prune step slices a model, proj loses its columns after qkv its rows)
    if out_width(module.get_submodule(_joined(_name(module, QKV_NAMES), qkv[0]))) != heads * (2 * key_dim + value_dim):
        return False
    widths = [(name, value_dim) for name in VALUE_WIDTHS] + [(name, key_dim) for name in KEY_WIDTHS]
    if any(getattr(module, name, heads * dim) != heads * dim for name, dim in widths):
        return False
    if head_parameters(module, heads, _projections_and_convs(module, heads, value_dim)) is None:
        return False
    return all(_over_head_dim(getattr(module, name, None), key_dim) for name in HEAD_NORMS)


def _projections_and_convs(module: nn.Module, heads: int, value_dim: int) -> tuple[str, ...]:
    """The children whose head channels are not found by their shapes: the projections, and convolutions over
    groups of heads' values (:mod:`acps_core.layers.head_convs`)."""
    projections_ = (*QKV_NAMES, *PROJ_NAMES)
    return (*projections_, *head_conv_children(module, heads, value_dim, projections_))


def _over_head_dim(norm: Any, head_dim: int) -> bool:
    """A q/k norm with no parameters, or whose parameters are one per ``head_dim`` entry (shared by all heads)."""
    if norm is None:
        return True
    return all(p.shape == (head_dim,) for p in norm.parameters())


class FusedAttentionAdapter(AttentionAdapter):
    """Heads of self-attention with a fused ``qkv`` projection (see the module docs). Its output channels are
    the width of its values, ``num_heads * value_dim``, in whole heads; its inputs are ``qkv``'s columns."""

    out_projection = "proj"

    def traced_whole(self, module: nn.Module) -> bool:
        return fused_qkv_attention(module)

    # -- where its parts are ---------------------------------------------------------------------------------
    def layout(self, module: nn.Module, head_major: bool | None = None) -> HeadLayout:
        """The module's layout; the one its kind was proven to have unless ``head_major`` is given."""
        attention: Any = module
        key_dim, value_dim = head_dims(module) or (0, 0)
        if head_major is None:
            head_major = _PROVEN.get(_layout_key(module), bool(getattr(module, "head_first", False)))
        return HeadLayout(int(attention.num_heads), key_dim, value_dim, head_major)

    def qkv_path(self, module: nn.Module) -> str:
        """The path of the Linear (or 1x1 conv) inside the module that computes q, k and v."""
        parts = projection_parts(_child(module, QKV_NAMES))
        assert parts is not None
        return _joined(_name(module, QKV_NAMES), parts[0])

    def projection(self, module: nn.Module) -> str | None:
        parts = projection_parts(_child(module, PROJ_NAMES))
        return None if parts is None else _joined(_name(module, PROJ_NAMES), parts[0])

    def projection_followers(self, module: nn.Module) -> list[str]:
        parts = projection_parts(_child(module, PROJ_NAMES))
        return [] if parts is None else [_joined(_name(module, PROJ_NAMES), path) for path in parts[1]]

    def heads(self, module: nn.Module) -> tuple[int, int]:
        layout = self.layout(module)
        return layout.heads, layout.value_dim

    def tied_parts(self, module: nn.Module) -> list[nn.Module]:
        """Its convolutions over groups of heads' values, which other modules may share (CoaT's)."""
        heads, value_dim = self.heads(module)
        return [module.get_submodule(name)
                for name in head_conv_children(module, heads, value_dim, (*QKV_NAMES, *PROJ_NAMES))]

    def key_share(self, module: nn.Module) -> float:
        layout = self.layout(module)
        return layout.key_dim / layout.value_dim

    def batch_first(self, module: nn.Module) -> bool:
        return True

    def self_attention(self) -> bool:
        return True

    def input_dim(self, module: nn.Module, ndim: int) -> int:
        return projections.input_dim(module.get_submodule(self.qkv_path(module)), ndim)

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int | tuple[int, ...]]]:
        rows = self.layout(module).row_channels()
        qkv = self.qkv_path(module)
        dim = 1 if transposed_linear(module.get_submodule(qkv)) else 0
        return [(f"{qkv}.weight", dim, rows), (f"{qkv}.bias", 0, rows)]

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        qkv = self.qkv_path(module)
        return [(f"{qkv}.weight", 0 if transposed_linear(module.get_submodule(qkv)) else 1, 1)]

    def filter_rows(self, module: nn.Module) -> torch.Tensor:
        """Per head channel, the norm of its value row and of its share of its head's query and key rows."""
        weight = output_rows(module.get_submodule(self.qkv_path(module)))
        squares = weight.double().pow(2).reshape(weight.shape[0], -1).sum(dim=1)
        norms = torch.zeros(self.out_size(module), dtype=torch.float64)
        norms.index_add_(0, torch.tensor(self.layout(module).row_channels()), squares.cpu())
        return norms.sqrt().unsqueeze(1)

    def out_size(self, module: nn.Module) -> int:
        heads, value_dim = self.heads(module)
        return heads * value_dim

    def in_size(self, module: nn.Module) -> int:
        return in_width(module.get_submodule(self.qkv_path(module)))

    # -- pruning ---------------------------------------------------------------------------------------------
    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        """Keep the heads of the head channels ``index`` (whole heads, as the graph made sure)."""
        layout = self.layout(module)
        _keep_heads(module, layout, index[::layout.value_dim] // layout.value_dim)

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        """Keep the input channels ``index``; a forward that reads the heads' width from its input then follows
        the heads (its input is no longer as wide as they are)."""
        projections.keep_inputs(module.get_submodule(self.qkv_path(module)), index)
        _follow_if_needed(module)

    def confirm(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether pruning a head in a copy computes what masking it computes, for either layout of ``qkv``'s
        rows, with the forward as written or else following the heads (:mod:`acps_core.layers.following`); what
        holds is remembered for the module's kind, and the module's attention products are measured."""
        heads = int(self.layout(module).heads)
        if module.training:
            _REFUSED[module] = "training"  # dropout would make the two calls differ
            return False
        key = _layout_key(module)
        _REFUSED[module] = "heads"
        for follow in (False, True):  # following is tried second: it costs time at every call
            for head_major in (False, True) if heads > 1 else (None,):  # (one head cannot go: nothing to prove)
                if head_major is not None and not _prunes_like_masking(
                        self, module, self.layout(module, head_major), follow, args, kwargs):
                    continue
                _REFUSED[module] = "inputs"
                if self._inputs_confirmed(module, follow, args, kwargs):
                    del _REFUSED[module]
                    if head_major is not None:
                        _PROVEN[key] = head_major
                    if follow:
                        _FOLLOWING.add(key)
                    return True
        return False

    def _inputs_confirmed(self, module: nn.Module, follow: bool, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> bool:
        """Whether pruning an input channel in a copy (its forward following the heads when ``follow``) computes
        what masking it computes (a forward may read its input's width for something the heads do not set); then
        the module's attention products are measured."""
        def keep_inputs(trial: nn.Module, index: torch.Tensor) -> None:
            projections.keep_inputs(trial.get_submodule(self.qkv_path(trial)), index)
            _follow_if_needed(trial, follow)

        if not input_prunes_like_masking(module, keep_inputs, partial(self.input_dim, module), args, kwargs):
            return False
        costs = measured_call(module, args, kwargs)
        inside = sum(costs.get(child, 0.0) for child in (_name(module, QKV_NAMES), _name(module, PROJ_NAMES)))
        count = positions(args, kwargs, partial(self.input_dim, module)) * self.out_size(module)
        _ATTENDED[module] = max(0.0, costs[""] - inside) / count if costs and count else 0.0
        return True

    def attended(self, module: nn.Module) -> float:
        return _ATTENDED.get(module, 0.0)

    def unconfirmed(self, module: nn.Module, name: str) -> str:
        what = f"{name} ({type(module).__name__}) is attention with a fused qkv projection, but"
        why = _REFUSED.get(module, "heads")
        if why == "training":
            return (f"{what} it was traced in training mode, where dropout makes no two calls alike, so its heads "
                    "could not be proven and are left alone: trace the model in eval mode")
        if why == "inputs":
            return (f"{what} a copy with one input channel pruned did not compute what masking that channel "
                    "computes: its forward reads its input's width for something else (a scale, a split), so its "
                    "heads and inputs are left alone")
        return (f"{what} a copy with one head pruned (its qkv rows, per-head parameters and proj inputs, num_heads "
                "and the widths derived from it) did not compute what masking that head computes, with its forward "
                "as written or following the heads: its forward ties the heads' width to something the head count "
                "does not set (such as split sizes written as constants), so its heads are left alone")


def _keep_heads(module: nn.Module, layout: HeadLayout, kept: torch.Tensor, follow: bool | None = None) -> None:
    """Slice ``module`` to the heads ``kept``: ``qkv``'s rows (and the norms over them), the per-head parameters,
    the size attributes and any cache the forward keeps of per-head tensors; make its forward follow the heads
    when ``follow`` (by default: when its kind was proven to need it)."""
    attention: Any = module
    adapter = FusedAttentionAdapter()
    rows = layout.head_rows(kept)
    parts = projection_parts(_child(module, QKV_NAMES))  # (before qkv's width changes)
    projections.keep_outputs(module.get_submodule(adapter.qkv_path(module)), rows)
    for path in parts[1] if parts else []:
        norm = module.get_submodule(_joined(_name(module, QKV_NAMES), path))
        norm_adapter = adapter_for(norm)
        assert norm_adapter is not None
        norm_adapter.keep_outputs(norm, rows)
    own = (*QKV_NAMES, *PROJ_NAMES)
    convs = sorted({*head_conv_children(module, layout.heads, layout.value_dim, own),
                    *head_conv_children(module, len(kept), layout.value_dim, own)})  # (shared: maybe sliced)
    for name in convs:
        keep_head_convs(module.get_submodule(name), layout.heads, layout.value_dim, kept)
    keep_head_entries(module, layout.heads, kept, (*own, *convs))
    attention.num_heads = len(kept)
    for name in VALUE_WIDTHS:
        if hasattr(module, name):
            setattr(module, name, len(kept) * layout.value_dim)
    for name in KEY_WIDTHS:
        if hasattr(module, name):
            setattr(module, name, len(kept) * layout.key_dim)
    _follow_if_needed(module, follow)


def _follow_if_needed(module: nn.Module, follow: bool | None = None) -> None:
    """Make the module's forward follow its heads when ``follow`` (by default: when its kind was proven to need
    it)."""
    if _layout_key(module) in _FOLLOWING if follow is None else follow:
        qkv = module.get_submodule(FusedAttentionAdapter().qkv_path(module))
        follow_heads(module, 1 if isinstance(qkv, nn.modules.conv._ConvNd) else -1)


def _prunes_like_masking(adapter: FusedAttentionAdapter, module: nn.Module, layout: HeadLayout, follow: bool,
                         args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Prune the first head in a copy (its forward following the heads when ``follow``) and compare its output
    with the module's with that head masked: the head's inputs of ``proj`` zeroed, or, without ``proj``, the
    head's output channels dropped."""
    value_dim = layout.value_dim
    keep = torch.arange(value_dim, layout.heads * value_dim)
    projection = adapter.projection(module)

    def prune(trial: nn.Module) -> None:
        _keep_heads(trial, layout, torch.arange(1, layout.heads), follow)
        if projection is not None:
            projections.keep_inputs(trial.get_submodule(projection), keep)

    def mask(reference: nn.Module) -> None:
        if projection is not None:
            projections.zero_inputs(reference.get_submodule(projection), 0, value_dim)

    def select(output: torch.Tensor) -> torch.Tensor:
        return output if projection is not None else output.index_select(adapter.input_dim(module, output.dim()), keep)

    return prunes_like_masking(module, prune, mask, args, kwargs, select)
