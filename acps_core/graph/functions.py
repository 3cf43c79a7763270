"""The channel rules of torch functions, one function per kind of operation, and the table that maps every
function name acps knows to its rule (:data:`FUNCTION_RULES`).

A rule gets the builder, the recorded op, its tensor arguments (``refs``), those that hold channels (``tagged``)
and a description of where the call is (for reasons); it passes the channels on to the op's outputs (tags), ties
spaces that meet (union), or blocks the spaces it cannot map, with the reason. A function with no rule blocks
the channels it touches: acps never guesses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from acps_core.graph.functional import NORM_ARGUMENTS, functional_norm
from acps_core.graph.repeats import fold_repeats
from acps_core.graph.shapes import PERMUTES, RESHAPES, channel_shuffle, index_dims, permute, reshape
from acps_core.graph.spaces import Tag
from acps_core.graph.trace import Op, TensorRef, first_tensor

if TYPE_CHECKING:
    from acps_core.graph.build import GroupBuilder

#: ``rule(builder, op, refs, tagged, where)``
Rule = Callable[["GroupBuilder", Op, list[TensorRef], list[TensorRef], str], None]

# Functions whose output has the input's channels at the same place, one to one.
UNARY_ELEMENTWISE = frozenset({
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
    "hardtanh", "sigmoid", "tanh", "softplus", "softsign", "tanhshrink", "logsigmoid", "threshold", "rrelu",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "clamp", "clip",
    "abs", "neg", "exp", "log", "sqrt", "rsqrt", "square", "pow", "reciprocal", "sin", "cos", "erf",
    "contiguous", "clone", "detach", "float", "half", "bfloat16", "double", "to", "type_as", "requires_grad",
    "identity", "positive", "nan_to_num", "masked_fill",
})
# Binary element-wise functions: operands of the same channels are coupled.
BINARY_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "true_divide", "iadd", "isub", "imul", "idiv", "itruediv", "radd", "rsub",
    "rmul", "rdiv", "rtruediv", "maximum", "minimum", "max", "min", "where", "floor_divide", "fmod",
    "remainder", "addcmul", "addcdiv", "lerp", "floordiv", "rfloordiv", "ifloordiv", "mod", "rmod", "imod",
    "rpow", "ipow",
})
# Pools keep the channel dimension (dim 1) and only shrink the spatial ones.
POOLS = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear",
})
REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "prod", "std", "var", "logsumexp", "norm"})
# Functions that work along one dim (given as `dim`) and leave the others alone.
ALONG_DIM = frozenset({"softmax", "log_softmax", "cumsum", "cumprod", "normalize"})
MATMULS = frozenset({"matmul", "bmm", "rmatmul"})
EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})
#: Functions whose further tensor arguments only give a dtype, a device or a shape.
DTYPE_ONLY = frozenset({"to", "type_as", "view_as", "reshape_as", "expand_as"})


def elementwise(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
                where: str) -> None:
    """One tensor operand: the channels pass through when the shape stays; several (``x + y``, ``clamp(x,
    min=t)``, ``where(m, x, y)``): see :func:`binary`."""
    if len(refs) > 1:
        binary(builder, op, refs, tagged, where)
        return
    out = op.outputs[0] if op.outputs else None
    if out is not None and builder.recorder.shapes[out] == refs[0].shape:
        builder.tags[out] = builder.tags_of(refs[0])
    else:
        builder.block_tags(builder.tags_of(refs[0]), f"{where} changes the shape of the tensor")


def binary(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
           where: str) -> None:
    out = op.outputs[0] if op.outputs else None
    if out is None:
        builder.block_tags([t for r in refs for t in builder.tags_of(r)], f"{where} modifies a tensor in place")
        return
    ndim = len(builder.recorder.shapes[out])
    # The channel dims each operand brings, aligned to the output (broadcasting aligns from the right).
    aligned = [(ref, [t.moved(t.dim + ndim - len(ref.shape)) for t in builder.tags_of(ref)])
               for ref in refs]
    if fold_repeats(builder, aligned):  # one producer's channels against another's, repeated (GhostNet)
        aligned = [(ref, [t.moved(t.dim + ndim - len(ref.shape)) for t in builder.tags_of(ref)])
                   for ref in refs]
    result: list[Tag] = []
    for index, (_, tags) in enumerate(aligned):
        for tag in tags:
            ok = True
            for other_index, (other, other_tags) in enumerate(aligned):
                if other_index == index:
                    continue
                other_dim = tag.dim - (ndim - len(other.shape))
                if other_dim < 0 or other.shape[other_dim] == 1:
                    continue  # broadcast along the channels: a per-sample or scalar factor
                match = [t for t in other_tags if t.same_place(tag)]
                if not match and builder.param_use(op, tag, other, other_dim, where):
                    continue  # x * layer_scale, x + pos_embed: the parameter is sliced with the channels
                if not match:
                    ok = False
                    builder.block(tag.space, f"{where} combines these channels with a tensor of shape "
                                          f"{list(other.shape)} that no prunable layer produces")
                    continue
                for t in match:
                    builder.union(tag.space, t.space, where)
            if ok and not any(r.same_place(tag) and builder.find(r.space) == builder.find(tag.space) for r in result):
                result.append(tag)
    builder.tags[out] = result


def pad(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
        where: str) -> None:
    """F.pad: channels pass through unless the padding reaches their dimension."""
    x = tagged[0]
    tags = builder.tags_of(x)
    padding = op.kwargs.get("pad", op.args[1] if len(op.args) > 1 else None)
    ndim = len(x.shape)
    # The padding list covers the last len(padding) // 2 dims, last dim first.
    padded = set(range(ndim - len(padding) // 2, ndim)) if isinstance(padding, (list, tuple)) else None
    if not op.outputs or padded is None or len(tagged) != 1 or x is not first_tensor(op.args):
        builder.block_tags(tags, f"{where} cannot be mapped channel by channel")
        return
    builder.block_tags([t for t in tags if t.dim in padded], f"{where} pads the channel dimension")
    builder.set_tags(op, [t for t in tags if t.dim not in padded])


def pool(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
         where: str) -> None:
    """Pools and resizes keep dims 0 and 1 (batch, channels) and work on the others."""
    x = refs[0]
    tags = builder.tags_of(x)
    if len(tagged) != 1 or x is not tagged[0] or any(t.dim > 1 for t in tags) or not op.outputs:
        builder.block_tags([t for r in tagged for t in builder.tags_of(r)], f"{where} pools along the channels")
        return
    for index in range(len(op.outputs)):  # max_pool with indices returns two tensors shaped alike
        builder.set_tags(op, tags, index)


def reduction(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
              where: str) -> None:
    x = tagged[0]
    tags = builder.tags_of(x)
    dims = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else None)
    keepdim = op.kwargs.get("keepdim", op.args[2] if len(op.args) > 2 and isinstance(op.args[2], bool) else False)
    if dims is None or not op.outputs or len(tagged) != 1 or x is not first_tensor(op.args):
        builder.block_tags(tags, f"{where} reduces over every dimension")
        return
    ndim = len(x.shape)
    dims = [d % ndim for d in ([dims] if isinstance(dims, int) else list(dims))]
    builder.block_tags([t for t in tags if t.dim in dims], f"{where} reduces over the channel dimension")
    builder.set_tags(op, [t.moved(t.dim - (0 if keepdim else sum(1 for d in dims if d < t.dim)))
                       for t in tags if t.dim not in dims])


def along_dim(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
              where: str) -> None:
    """softmax(x, dim) and kin: fine unless they work along the channels."""
    x = tagged[0]
    tags = builder.tags_of(x)
    dim = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else None)
    if not isinstance(dim, int) or len(tagged) != 1 or x is not first_tensor(op.args):
        builder.block_tags(tags, f"{where} cannot be mapped channel by channel")
        return
    dim %= len(x.shape)
    builder.block_tags([t for t in tags if t.dim == dim], f"{where} works along the channel dimension")
    builder.set_tags(op, [t for t in tags if t.dim != dim])


def expand(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
           where: str) -> None:
    x = tagged[0]
    tags = builder.tags_of(x)
    out = op.outputs[0] if op.outputs else None
    if out is None or x is not first_tensor(op.args):
        builder.block_tags(tags, f"{where} cannot be mapped channel by channel")
        return
    shift = len(builder.recorder.shapes[out]) - len(x.shape)
    builder.tags[out] = [t.moved(t.dim + shift) for t in tags]


def concat(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
           where: str) -> None:
    tensors = op.args[0] if op.args else op.kwargs.get("tensors", ())
    dim = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else 0)
    parts = [t for t in tensors if isinstance(t, TensorRef)]
    all_tags = [t for p in parts for t in builder.tags_of(p)]
    if not op.outputs or not parts or not isinstance(dim, int):
        builder.block_tags(all_tags, f"{where} cannot be mapped channel by channel")
        return
    dim %= len(parts[0].shape)
    new_tags: list[Tag] = []
    position = 0
    for part in parts:
        new_tags += [replace(t, offset=position + t.offset) for t in builder.tags_of(part) if t.dim == dim]
        position += part.shape[dim]
    # Along another dim, every part must hold the same channels at the same places (they are coupled).
    others = [t for t in all_tags if t.dim != dim]
    for tag in others:
        for part in parts:
            match = [t for t in builder.tags_of(part) if t.same_place(tag)]
            if not match and not builder.param_use(op, tag, part, tag.dim, where):
                builder.block(tag.space, f"{where} joins these channels with a tensor that does not hold them")
            for t in match:
                builder.union(tag.space, t.space, where)
    seen: list[Tag] = []
    for tag in others:
        if not any(s.same_place(tag) for s in seen):
            seen.append(tag)
    builder.set_tags(op, new_tags + seen)


def chunk(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
          where: str) -> None:
    """chunk/split/tensor_split: along another dim the channels pass to every part. Along the channels, a split
    into a number of equal parts (``chunk(n)``, ``tensor_split(n)``) makes each part its own range of one whole
    group of channels, and the group keeps equal counts in its parts, so that the parts stay equal once pruned. A
    split at sizes written as constants (``split(x, 26)``) is not mapped: the sizes would not follow a pruned
    channel count."""
    x = tagged[0]
    tags = builder.tags_of(x)
    dim = op.kwargs.get("dim", op.args[2] if len(op.args) > 2 else (0 if op.name != "unbind" else None))
    if op.name == "unbind":
        dim = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else 0)
    if len(tagged) != 1 or x is not first_tensor(op.args) or not isinstance(dim, int):
        builder.block_tags(tags, f"{where} cannot be mapped channel by channel")
        return
    dim %= len(x.shape)
    across = [t for t in tags if t.dim == dim]
    passing = [t for t in tags if t.dim != dim]
    if across:
        tag = across[0]
        size = x.shape[dim]
        sizes = [builder.recorder.shapes[v][dim] for v in op.outputs]
        sections = op.args[1] if len(op.args) > 1 else op.kwargs.get("chunks", op.kwargs.get("sections"))
        by_count = op.name == "chunk" or (op.name == "tensor_split" and isinstance(sections, int))
        if not by_count and op.name != "unbind":
            builder.block_tags(across, f"{where} splits these channels at sizes written as constants, which would "
                                    "not follow a pruned channel count (chunk(x, n) would)")
            across = []
        elif (len(across) != 1 or op.name == "unbind" or len(set(sizes)) != 1 or sum(sizes) != size or tag.offset
                or tag.block != 1 or tag.unit != 1 or not tag.contiguous or tag.length != size or tag.start
                or tag.stop != builder.spaces[tag.space].channels):
            builder.block_tags(across, f"{where} splits these channels in a way acps does not map (only equal parts "
                                    "of one whole group of channels are)")
            across = []
        else:
            builder.require(tag.space, blocks=len(sizes))
    first = 0
    for value in op.outputs:
        shift = -1 if op.name == "unbind" else 0
        out_tags = [t.moved(t.dim + (shift if t.dim > dim else 0)) for t in passing]
        if across:
            part = builder.recorder.shapes[value][dim]
            out_tags.append(replace(across[0], start=first, stop=first + part))
            first += part
        builder.tags[value] = out_tags


def getitem(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
            where: str) -> None:
    """x[...] with slices, ints, None and Ellipsis: channels pass when their dim is taken whole."""
    x = tagged[0]
    tags = builder.tags_of(x)
    index = op.args[1] if len(op.args) > 1 else None
    mapping = index_dims(index, len(x.shape), x.shape)
    if mapping is None or x is not op.args[0] or len(tagged) != 1 or not op.outputs:
        builder.block_tags(tags, f"{where} indexes the tensor in a way acps does not map")
        return
    kept = [t for t in tags if mapping.get(t.dim) is not None]
    builder.block_tags([t for t in tags if mapping.get(t.dim) is None], f"{where} selects some of these channels")
    builder.set_tags(op, [t.moved(mapping[t.dim]) for t in kept])  # type: ignore[arg-type]


def matmul(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
           where: str) -> None:
    """a @ b: batch dims broadcast (channels there meet their counterparts), rows of ``a`` and columns of
    ``b`` pass to the output; a channel dim that is summed over cannot be mapped."""
    out = op.outputs[0] if op.outputs else None
    if out is None or len(refs) != 2 or len(refs[0].shape) < 2 or len(refs[1].shape) < 2:
        builder.block_tags([t for r in refs for t in builder.tags_of(r)], f"{where} cannot be mapped")
        return
    a, b = refs
    ndim = len(builder.recorder.shapes[out])
    result: list[Tag] = []
    batch_tags: list[tuple[int, Tag]] = []
    for which, ref in enumerate((a, b)):
        rank = len(ref.shape)
        for tag in builder.tags_of(ref):
            out_dim = tag.dim + ndim - rank
            contracted = rank - 1 if which == 0 else rank - 2
            if tag.dim == contracted:
                builder.block(tag.space, f"{where} sums over these channels")
            elif tag.dim >= rank - 2:
                result.append(tag.moved(ndim - 2 if which == 0 else ndim - 1))
            else:
                batch_tags.append((which, tag.moved(out_dim)))
    for which, tag in batch_tags:
        other = refs[1 - which]
        other_dim = tag.dim - (ndim - len(other.shape))
        if other_dim < 0 or other.shape[other_dim] == 1:
            result.append(tag)
            continue
        match = [t for w, t in batch_tags if w != which and t.same_place(tag)]
        if not match:
            builder.block(tag.space, f"{where} pairs these channels with a tensor that does not hold them")
            continue
        for t in match:
            builder.union(tag.space, t.space, where)
        if not any(r.same_place(tag) for r in result):
            result.append(tag)
    builder.tags[out] = result


def attention(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
              where: str) -> None:
    """scaled_dot_product_attention(q, k, v): heads and batch dims pair q, k and v; v's last dim passes to
    the output; q's and k's last dim is summed over."""
    out = op.outputs[0] if op.outputs else None
    q, k, v = [*refs, None, None, None][:3]
    if out is None or q is None or k is None or v is None:
        builder.block_tags([t for r in refs for t in builder.tags_of(r)], f"{where} cannot be mapped")
        return
    result: list[Tag] = []
    rank = len(q.shape)
    for ref in (q, k, v):
        for tag in builder.tags_of(ref):
            if tag.dim == rank - 1 and ref is v:
                result.append(tag)
            elif tag.dim >= rank - 2:
                builder.block(tag.space, f"{where} mixes these channels across tokens or sums over them")
            else:
                for other in (q, k, v):
                    if other is ref or other.shape[tag.dim] == 1:
                        continue
                    match = [t for t in builder.tags_of(other) if t.same_place(tag)]
                    if not match:
                        builder.block(tag.space, f"{where} pairs these channels with a tensor that does not "
                                              "hold them")
                    for t in match:
                        builder.union(tag.space, t.space, where)
                if not any(r.same_place(tag) for r in result):
                    result.append(tag)
    for ref in refs[3:]:  # an attention mask broadcast over heads is fine; one that is not, is not
        for tag in builder.tags_of(ref):
            builder.block(tag.space, f"{where} uses these channels as an attention mask")
        if len(ref.shape) >= 3 and rank >= 3 and ref.shape[-3] > 1:  # broadcast from the right: dim -3 is heads
            for tag in (t for r in (q, k, v) for t in builder.tags_of(r) if t.dim == rank - 3):
                builder.block(tag.space, f"{where} adds a mask or bias with one slice per head (shape "
                                         f"{list(ref.shape)}) that pruning heads would not slice (in T5, the "
                                         "relative position bias, computed once and added in every layer)")
    builder.tags[out] = result


def multi_head_attention(builder: GroupBuilder, op: Op, refs: list[TensorRef], tagged: list[TensorRef],
                         where: str) -> None:
    """``F.multi_head_attention_forward`` called outside an ``nn.MultiheadAttention`` acps traces whole."""
    builder.block_tags([t for r in tagged for t in builder.tags_of(r)],
                 f"nn.MultiheadAttention at {op.location} uses these channels as its embed_dim, which acps does not "
                 "prune yet (write attention with Linear projections and scaled_dot_product_attention to prune its "
                 "heads)")


def _table() -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for names, rule in ((UNARY_ELEMENTWISE | BINARY_ELEMENTWISE, elementwise), ({"pad"}, pad), (POOLS, pool),
                        (REDUCTIONS, reduction), (ALONG_DIM, along_dim), (RESHAPES, reshape), (PERMUTES, permute),
                        (EXPANDS, expand), ({"cat", "concat", "concatenate"}, concat),
                        ({"channel_shuffle", "native_channel_shuffle"}, channel_shuffle),
                        ({"chunk", "split", "tensor_split", "unbind", "split_with_sizes"}, chunk),
                        ({"getitem"}, getitem), (MATMULS, matmul), ({"scaled_dot_product_attention"}, attention),
                        ({"multi_head_attention_forward"}, multi_head_attention), (NORM_ARGUMENTS, functional_norm)):
        for name in names:
            rules[name] = rule
    return rules


#: Torch function name (as :func:`~acps_core.graph.trace.op_name` gives it) -> its channel rule.
FUNCTION_RULES: dict[str, Rule] = _table()
