"""``nn.MultiheadAttention`` whose heads, input width and output width are pruned independently.

``nn.MultiheadAttention`` ties the width of its query/key/value projections, of its input and of its output to
one ``embed_dim``, so it cannot lose heads, nor input channels without losing as many outputs. When the prune
step slices it, it turns the module into a :class:`HeadPrunedMultiheadAttention`: the same parameters under the
same names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), so checkpoints load and
``isinstance(m, nn.MultiheadAttention)`` still holds, with the projections ``num_heads * head_dim`` wide, the
input ``embed_dim`` wide and the output ``out_proj.out_features`` wide.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from acps_core.layers.base import LayerAdapter

#: Keyword arguments that hold the keys' and values' source in cross-attention (T5's and BART's; UMT5's).
CROSS_INPUTS = ("key_value_states", "encoder_hidden_states")


def plain_multihead_attention(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` acps can prune heads of: packed q/k/v projections, no bias_k/bias_v, no
    zero-attention column."""
    if isinstance(module, HeadPrunedMultiheadAttention):
        return True  # pruned once already: packed projections, whatever the flag says now
    return (isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward
            and module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn)


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """Multi-head attention whose ``num_heads * head_dim``, input width and output width may all differ.

    Computes what ``nn.MultiheadAttention`` computes (same arguments and masks), with the heads it kept. The
    attention weights it returns are averaged over the kept heads.
    """

    head_dim: int

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        target, batch, _ = query.shape
        source = key.shape[0]
        width = self.num_heads * self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.split(width)
        b_q, b_k, b_v = self.in_proj_bias.split(width) if self.in_proj_bias is not None else (None, None, None)

        def heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, length: int) -> torch.Tensor:
            # (length, batch, E) -> (batch, heads, length, head_dim)
            return F.linear(x, weight, bias).reshape(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(query, w_q, b_q, target), heads(key, w_k, b_k, source), heads(value, w_v, b_v, source)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(batch, self.num_heads, target, source)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        elif is_causal:
            causal = torch.ones(target, source, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            padding = key_padding_mask.reshape(batch, 1, 1, source)
            scores = scores.masked_fill(padding, float("-inf")) if padding.dtype == torch.bool else scores + padding
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = (weights @ v).permute(2, 0, 1, 3).reshape(target, batch, width)
        out = self.out_proj(out)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        returned: Any = None
        if need_weights:
            returned = weights.mean(dim=1) if average_attn_weights else weights
            if not batched:
                returned = returned.squeeze(0)
        return out, returned


def make_prunable(module: nn.MultiheadAttention) -> None:
    """Turn an attention module into a :class:`HeadPrunedMultiheadAttention` (same parameters, same output),
    so that its heads, embed_dim and out projection can be sliced independently."""
    module.__class__ = HeadPrunedMultiheadAttention
    # nn.TransformerEncoderLayer takes a fused kernel when this flag is set, which assumes 3 * embed_dim
    # projection rows; cleared, it calls this module's forward. The forward above does not read it.
    module._qkv_same_embed_dim = False


def shrink_heads(module: nn.MultiheadAttention, keep: torch.Tensor) -> None:
    """Keep the projection rows ``keep`` (whole heads, positions within the q/k/v width) of an attention module;
    the out projection's inputs are sliced separately."""
    width = module.num_heads * module.head_dim
    rows = torch.cat([keep + part * width for part in range(3)]).to(module.in_proj_weight.device)
    module.in_proj_weight = nn.Parameter(module.in_proj_weight.detach().index_select(0, rows),
                                         requires_grad=module.in_proj_weight.requires_grad)
    if module.in_proj_bias is not None:
        module.in_proj_bias = nn.Parameter(module.in_proj_bias.detach().index_select(0, rows),
                                           requires_grad=module.in_proj_bias.requires_grad)
    module.num_heads = len(keep) // module.head_dim
    make_prunable(module)


def shrink_embed_dim(module: nn.MultiheadAttention, keep: torch.Tensor) -> None:
    """Keep the input channels ``keep`` (the columns of the packed q/k/v projection) of an attention module;
    its out projection's outputs are sliced separately, as any Linear's."""
    module.in_proj_weight = nn.Parameter(module.in_proj_weight.detach().index_select(1, keep.to(
        module.in_proj_weight.device)), requires_grad=module.in_proj_weight.requires_grad)
    module.embed_dim = module.kdim = module.vdim = len(keep)
    make_prunable(module)


def stateless(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's keyword arguments without the stateful objects among them (a key/value cache the forward would
    update), for trial calls of a copy: tensors, numbers, strings and tuples or lists of tensors stay."""
    def plain(value: Any) -> bool:
        if isinstance(value, (tuple, list)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (torch.Tensor, int, float, bool, str))

    return {key: value for key, value in kwargs.items() if plain(value)}


def widened(value: Any) -> Any:
    """A copy of a module in float32, or a call's arguments with their half-precision tensors in float32 (others
    as they are): a trial proves how a module's channels move, which rounding in bfloat16 or float16 would hide
    behind differences larger than the comparison allows."""
    if isinstance(value, nn.Module):
        copied = copy.deepcopy(value)
        low = any(p.dtype in (torch.float16, torch.bfloat16) for p in copied.parameters())
        return copied.float() if low else copied
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, (tuple, list)):
        return type(value)(widened(v) for v in value)
    if isinstance(value, dict):
        return {key: widened(v) for key, v in value.items()}
    return value


def per_head(shape: tuple[int, ...] | torch.Size, heads: int) -> bool:
    """Whether a tensor of ``shape`` holds one slice per head, as attention biases and masks are laid out:
    ``(batch, heads, queries, keys)``."""
    return heads > 1 and len(shape) == 4 and shape[1] == heads


def other_layout(shape: tuple[int, ...] | torch.Size, heads: int) -> bool:
    """Whether a tensor of ``shape`` may hold one slice per head in a layout acps does not map: five dims or more,
    one of them but the last two of ``heads`` entries (LongT5's local position bias: ``(1, 1, heads, block, 3 *
    block)``)."""
    return heads > 1 and len(shape) >= 5 and heads in tuple(shape[:-2])


def cut_per_head_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], heads: int, kept: torch.Tensor
                        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call's arguments with its per-head tensors cut to the heads ``kept``: all but the module's input (its
    first tensor, positional or by keyword) and the keys' and values' source (:data:`CROSS_INPUTS`)."""
    first = next((i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor)), None)
    skip = set(CROSS_INPUTS)
    if first is None:
        skip.add(next((key for key, value in kwargs.items() if isinstance(value, torch.Tensor)), ""))
    cut_args = tuple(arg if first is not None and i <= first else keep_per_head(arg, heads, kept)
                     for i, arg in enumerate(args))
    return cut_args, {key: value if key in skip else keep_per_head(value, heads, kept)
                      for key, value in kwargs.items()}


def keep_per_head(value: Any, heads: int, kept: torch.Tensor) -> Any:
    """``value`` with the per-head tensors in it (see :func:`per_head`) cut to the heads ``kept``."""
    if isinstance(value, torch.Tensor):
        return value.index_select(1, kept.to(value.device)) if per_head(value.shape, heads) else value
    if isinstance(value, (tuple, list)):
        return type(value)(keep_per_head(v, heads, kept) for v in value)
    if isinstance(value, dict):
        return {key: keep_per_head(v, heads, kept) for key, v in value.items()}
    return value


def same_per_head(got: Any, expected: Any, heads: int, kept: torch.Tensor) -> bool:
    """Whether a pruned copy's per-head outputs (after the first: a position bias passed on, attention weights)
    are the full module's, cut to the heads ``kept``."""
    if not (isinstance(got, (tuple, list)) and isinstance(expected, (tuple, list))):
        return True
    for mine, theirs in zip(got[1:], expected[1:]):
        if isinstance(theirs, torch.Tensor) and per_head(theirs.shape, heads):
            if not (isinstance(mine, torch.Tensor) and same_output(mine, keep_per_head(theirs, heads, kept))):
                return False
    return True


def same_output(got: Any, expected: Any) -> bool:
    """Whether two calls' first output tensors agree (the attention output of a module that returns a tuple)."""
    got = got[0] if isinstance(got, (tuple, list)) and got else got
    expected = expected[0] if isinstance(expected, (tuple, list)) and expected else expected
    if not (isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor)) or got.shape != expected.shape:
        return False
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-6)))


class AttentionAdapter(LayerAdapter):
    """Attention whose heads the graph maps with a rule of its own
    (:func:`~acps_core.graph.modules.attention_module`): its output channels are the width of its heads, consumed
    by its out projection (the child :attr:`out_projection`), which produces the module's output channels."""

    role = "attention"
    #: The child Linear that reads the heads.
    out_projection = "out_proj"

    def heads(self, module: nn.Module) -> tuple[int, int]:
        """``(num_heads, head_dim)``: ``head_dim`` is the width of each head's values, the channels its out
        projection reads."""
        attention: Any = module
        return int(attention.num_heads), int(attention.head_dim)

    def unit(self, module: nn.Module) -> int:
        """The channels that go together: one head (a key/value group of heads for grouped-query attention)."""
        return self.heads(module)[1]

    def aligned(self, module: nn.Module) -> int:
        """How many equal blocks of its channels must keep the same units (the query heads of each key/value group,
        pruned alike in every group); 1 = no such constraint."""
        return 1

    def key_share(self, module: nn.Module) -> float:
        """The width of each head's queries and keys over the width of its values (what the cost counts)."""
        return 1.0

    def kv_share(self, module: nn.Module) -> float:
        """Its key/value heads over its query heads (what the cost counts; below 1 for grouped-query attention)."""
        return 1.0

    def projection(self, module: nn.Module) -> str | None:
        """The path of the Linear (or 1x1 conv) inside the module that reads the heads; None when the heads are
        the module's output channels."""
        return self.out_projection

    def projection_followers(self, module: nn.Module) -> list[str]:
        """Paths of norms inside the module over the projection's outputs."""
        return []

    def batch_first(self, module: nn.Module) -> bool:
        """Whether its inputs are (batch, tokens, channels) rather than (tokens, batch, channels)."""
        return bool(getattr(module, "batch_first", True))

    def self_attention(self) -> bool:
        """Whether it takes one input (x) rather than query, key and value."""
        return False

    def input_dim(self, module: nn.Module, ndim: int) -> int:
        return ndim - 1

    def attended(self, module: nn.Module) -> float:
        """Multiply-accumulates of its attention products per query token and value channel, where measured on
        its first call (:func:`measured_call`); 0 when not: then as many keys as queries are assumed."""
        return 0.0

    def fixed_macs(self, module: nn.Module) -> float:
        """Multiply-accumulates of one traced call in its parts that no channel group prunes (a spatial reduction
        of its keys' input), as measured."""
        return 0.0

    def input_fixed(self, module: nn.Module) -> str | None:
        """Why its input channels cannot be pruned, or None when they can."""
        return None

    def tied_parts(self, module: nn.Module) -> list[nn.Module]:
        """Children sliced with its heads that other attention modules may hold too (then all of them lose the
        same heads)."""
        return []


def _cpu_attention_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU kernel of ``scaled_dot_product_attention`` (torch's FLOP counter counts the GPU kernels
    only): queries times keys, and the weights times values."""
    positions = math.prod(query[:-1]) * key[-2]
    return int(2 * positions * (query[-1] + value[-1]))


def measured_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, float]:
    """Multiply-accumulates of one call of ``module``, as torch's FLOP counter counts them (the CPU attention
    kernel included): in all (key ``""``) and inside each child it called (keyed by the child's name); empty when
    the call fails."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    # A copy without gradients: the counter's module tracker refuses a view of a parameter (a learned query
    # expanded to the batch) that requires grad with no function to compute it, as under no_grad.
    probe = copy.deepcopy(module).requires_grad_(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
            probe(*args, **stateless(kwargs))
    except Exception:
        return {}
    root = f"{type(module).__name__}."
    found = {"": counter.get_total_flops() / 2}
    for path, counts in counter.get_flop_counts().items():
        child = path[len(root):]
        if path.startswith(root) and "." not in child:
            found[child] = sum(counts.values()) / 2
    return found


def positions(args: tuple[Any, ...], kwargs: dict[str, Any], channel_dim: Callable[[int], int]) -> int:
    """Positions of a call's first tensor: its size over its channel count (``channel_dim`` of so many dims)."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        return 0
    return first.numel() // max(1, first.shape[channel_dim(first.dim())])


class MultiheadAttentionAdapter(AttentionAdapter):
    """``nn.MultiheadAttention`` with packed q/k/v projections (see :func:`plain_multihead_attention`): the graph
    maps its heads with a rule of its own (:func:`~acps_core.graph.modules.attention_module`); here, where its
    channels sit and how it is cut. Its output channels are the width of its heads: the q, k and v rows of the
    packed projection (three parts); its inputs are the projection's columns."""

    def traced_whole(self, module: nn.Module) -> bool:
        return plain_multihead_attention(module)

    def output_parameters(self, module: nn.Module) -> list[tuple[str, int, int | tuple[int, ...]]]:
        return [(name, 0, part) for part in range(3) for name in ("in_proj_weight", "in_proj_bias")]

    def input_parameters(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return [("in_proj_weight", 1, 1)]

    def filter_rows(self, module: nn.Module) -> torch.Tensor:
        """The q, k and v rows of each head channel, taken together."""
        attention = module if isinstance(module, nn.MultiheadAttention) else None
        assert attention is not None
        width = attention.num_heads * attention.head_dim
        return attention.in_proj_weight.detach().reshape(3, width, -1).transpose(0, 1).reshape(width, -1)

    def out_size(self, module: nn.Module) -> int:
        attention: Any = module
        return int(attention.num_heads * attention.head_dim)

    def in_size(self, module: nn.Module) -> int:
        attention: Any = module
        return int(attention.in_proj_weight.shape[1])

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        assert isinstance(module, nn.MultiheadAttention)
        shrink_heads(module, index)

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        assert isinstance(module, nn.MultiheadAttention)
        shrink_embed_dim(module, index)

    def child_pruned(self, module: nn.Module, child: str) -> None:
        """Its out projection lost outputs: the stock forward would assume ``embed_dim`` outputs."""
        if child == "out_proj" and isinstance(module, nn.MultiheadAttention):
            make_prunable(module)
