"""A pruned model's own description of its widths: the ``config`` of a Hugging Face model.

A Hugging Face model is saved with ``save_pretrained`` and rebuilt from its ``config`` by ``from_pretrained``,
which gives every repeated block the same widths. After pruning, :func:`sync_config` sets the config's widths to
what the layers now have (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
and ``head_dim``, stated explicitly since it no longer follows from the others; and the norms' epsilon, into
which pruning the hidden width folded ``C / C'``) when every block has the same;
when they differ, the config cannot state them, and the caller says so: such a model is rebuilt with
``restore_prune_retrain_model`` from the prune record instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from acps_core.layers.base import adapter_for
from acps_core.layers.mean_norm import EPS_NAMES, MeanNormAdapter
from acps_core.layers.split_attention import SplitAttentionAdapter, head_counts

if TYPE_CHECKING:
    from acps_core.graph.model import ChannelGraph
    from acps_core.search.problem import SearchRecord


class PerLayerWidthsWarning(UserWarning):
    """A pruned Hugging Face model whose blocks have different widths: its config cannot state them."""


#: The config fields a pruned model's widths set, in the order reported.
FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
#: The Linears of an MLP whose inner width ``intermediate_size`` is: (up, down), in Llama's, T5's and gated T5's.
MLP_PARTS = (("up_proj", "down_proj"), ("wi", "wo"), ("wi_1", "wo"))
#: What a config calls a field when it does not use the common name (T5: ``d_ff``).
ALIASES = {"intermediate_size": "d_ff"}
#: Config fields that hold the epsilon of the norms over the hidden width (folded into them when it is pruned).
EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "norm_eps")


def model_widths(model: nn.Module) -> dict[str, set[int]]:
    """Every width the config fields stand for, as found in the layers (one value each when uniform)."""
    found: dict[str, set[int]] = {name: set() for name in FIELDS}
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embedding, nn.Embedding):
        found["hidden_size"].add(embedding.embedding_dim)
    for module in model.modules():
        if isinstance(adapter_for(module), SplitAttentionAdapter):
            counts = head_counts(module)
            if counts is not None:
                found["num_attention_heads"].add(counts[0])
                found["num_key_value_heads"].add(counts[1])
                found["head_dim"].add(counts[2])
        for up_name, down_name in MLP_PARTS:
            up, down = getattr(module, up_name, None), getattr(module, down_name, None)
            if isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
                found["intermediate_size"].add(up.out_features)
                break
    return {name: values for name, values in found.items() if values}


def norm_epsilons(model: nn.Module) -> set[float]:
    """The epsilons of the model's norms over a mean of the channels (an RMS norm's ``variance_epsilon``)."""
    found = set()
    for module in model.modules():
        if isinstance(adapter_for(module), MeanNormAdapter):
            eps = next((getattr(module, n) for n in EPS_NAMES if isinstance(getattr(module, n, None), float)), None)
            if eps is not None:
                found.add(eps)
    return found


def _configured(model: nn.Module) -> list[nn.Module]:
    """The model, when it has a Hugging Face config; else the outermost of its modules that have one (the Hugging
    Face models a user's wrapper holds)."""
    found: list[str] = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        config = getattr(module, "config", None)
        if hasattr(config, "to_dict") and hasattr(config, "num_attention_heads"):
            if not any(name == f or name.startswith(f + ".") or f == "" for f in found):
                found.append(name)
    return [modules[name] for name in found]


def sync_config(model: nn.Module) -> str | None:
    """Set ``model.config``'s widths (or, for a wrapper, those of the Hugging Face models inside it) to the
    pruned layers' (see the module docs). Returns why it could not (the fields whose widths differ between
    blocks), or None when it did or the model has no such config."""
    by_config: dict[int, list[nn.Module]] = {}  # models built from one config object (a dual encoder's towers)
    for module in _configured(model):
        by_config.setdefault(id(module.config), []).append(module)
    reasons = [reason for models in by_config.values() if (reason := _sync(models)) is not None]
    return "; ".join(reasons) or None


def _sync(models: list[nn.Module]) -> str | None:
    """Set the config ``models`` share to their widths, when they all have the same ones."""
    config: Any = models[0].config
    widths: dict[str, set[Any]] = {}
    for model in models:
        for name, values in model_widths(model).items():
            widths.setdefault(name, set()).update(values)
    if "num_attention_heads" not in widths:  # attention acps does not read the head counts of: the config is left
        # as it is, and said to be stale when it no longer builds the pruned shapes (BERT's, ALBERT's)
        why = next((why for model in models if (why := rebuild_mismatch(model, config)) is not None), None)
        return None if why is None else f"its config is left as it was (it cannot state this attention's widths): {why}"
    eps_field = next((name for name in EPS_FIELDS if isinstance(getattr(config, name, None), float)), None)
    epsilons = {eps for model in models for eps in norm_epsilons(model)}
    if eps_field is not None and epsilons:
        widths[eps_field] = epsilons  # pruning the hidden width folded C / C' into every norm's epsilon
    differ = [f"{name} {sorted(values)}" for name, values in widths.items() if len(values) > 1]
    if differ:
        return ("its blocks have different widths (" + "; ".join(differ) + "), which a Hugging Face config cannot "
                "state: save its state_dict and rebuild it with restore_prune_retrain_model, not save_pretrained")
    for name, alias in ALIASES.items():
        if name in widths and not hasattr(config, name) and hasattr(config, alias):
            widths[alias] = widths.pop(name)
    names = [name for name in widths if hasattr(config, name) or name == "head_dim"]
    if "hidden_size" in widths:
        for model in models:
            why_not = _fold_output_scale(model, config, next(iter(widths["hidden_size"])))
            if why_not is not None:
                return why_not
    before = {name: getattr(config, name) for name in names if hasattr(config, name)}
    for name in names:
        setattr(config, name, next(iter(widths[name])))
    why_not = next((why for model in models if (why := rebuild_mismatch(model, config)) is not None), None)
    if why_not is not None:
        for name in names:  # leave the config as it was: it cannot describe this model
            if name in before:
                setattr(config, name, before[name])
            else:
                delattr(config, name)
        return why_not
    return None


def _fold_output_scale(model: nn.Module, config: Any, hidden: int) -> str | None:
    """T5 scales its decoder's output by ``model_dim ** -0.5`` before its head (``scale_decoder_outputs``, or a
    head tied to the embedding), with ``model_dim`` the hidden width its config built it with. Rebuilt from a
    config stating the pruned width, it would scale by another factor: the ratio is folded into the decoder's
    final norm, and ``model_dim`` set, so that the model computes what it did and what its rebuild computes.
    Returns why it could not (no such norm), or None."""
    model_any: Any = model
    dim = getattr(model_any, "model_dim", None)
    if not isinstance(dim, int) or dim == hidden:
        return None
    scaled = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", False))
    norm = getattr(getattr(model_any, "decoder", None), "final_layer_norm", None)
    weight = getattr(norm, "weight", None)
    if scaled and not isinstance(weight, nn.Parameter):
        return (f"{type(model).__name__} scales its output by its hidden width, and it has no decoder.final_layer_norm "
                "to fold the change into: save its state_dict and rebuild it with restore_prune_retrain_model, "
                "not save_pretrained")
    if isinstance(weight, nn.Parameter) and scaled:
        with torch.no_grad():
            weight.mul_((hidden / dim) ** 0.5)
    model_any.model_dim = hidden
    return None


def rebuild_mismatch(model: nn.Module, config: Any) -> str | None:
    """Why ``type(model)(config)`` would not rebuild ``model`` (a parameter of another shape, or the config
    refused), or None when it would. The rebuild is made on the meta device: no memory, no weights."""
    try:
        config.validate() if callable(getattr(config, "validate", None)) else None
        with torch.device("meta"):
            rebuilt = type(model)(config)
    except Exception as exc:  # the model class's own checks, whatever they raise
        return (f"its config cannot state the pruned widths ({type(model).__name__} refuses them: {exc}); save its "
                "state_dict and rebuild it with restore_prune_retrain_model, not save_pretrained")
    shapes = {name: tuple(p.shape) for name, p in rebuilt.state_dict().items()}
    wrong = [f"{name} {tuple(p.shape)} (the config builds {shapes[name]})" for name, p in model.state_dict().items()
             if name in shapes and shapes[name] != tuple(p.shape)]
    if wrong:
        return (f"{type(model).__name__} built from the pruned widths has other shapes: {', '.join(wrong[:3])}"
                + (" ..." if len(wrong) > 3 else "") + "; save its state_dict and rebuild it with "
                "restore_prune_retrain_model, not save_pretrained")
    return None


def config_roles(model: nn.Module, graph: ChannelGraph) -> dict[int, str]:
    """For ``uniform_widths``: group id -> the config field its width is (``num_attention_heads``,
    ``intermediate_size``), with the config it is in, for the groups of a Hugging Face model's attention heads
    and MLPs. One config states one width for every block of every stack (T5's encoder, decoder and
    cross-attention), so the groups of one field must keep one count for the model to load with
    ``from_pretrained``."""
    roles: dict[int, str] = {}
    for configured in _configured(model):
        prefix = next(name for name, module in model.named_modules() if module is configured)
        for name, module in configured.named_modules():
            layer_names: list[tuple[str, str]] = []
            if isinstance(adapter_for(module), SplitAttentionAdapter):
                layer_names.append((name, "num_attention_heads"))
            up = next((up for up, down in MLP_PARTS if isinstance(getattr(module, up, None), nn.Linear)
                       and isinstance(getattr(module, down, None), nn.Linear)), None)
            if up is not None:
                layer_names.append((f"{name}.{up}" if name else up, "intermediate_size"))
            for layer_name, field in layer_names:
                full = f"{prefix}.{layer_name}" if prefix else layer_name
                layer = graph.layers.get(full)
                if layer is not None and layer.out_group is not None:
                    roles[layer.out_group] = f"{id(configured.config)}:{field}"
    return roles


def fit_hidden_to_heads(model: nn.Module, graph: ChannelGraph, records: Sequence[SearchRecord],
                        keep: dict[int, list[int]]) -> str | None:
    """Hugging Face configs want ``hidden_size`` a multiple of ``num_attention_heads`` (they refuse to save or
    load otherwise): when a decision with one head count in every block (``uniform_widths``) keeps a hidden width
    that is not, keep the largest allowed multiple below it instead, dropping the hidden channels next in the
    record's removal order. Changes ``keep`` (group id -> kept channels); returns a note saying so, or None."""
    config = getattr(model, "config", None)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    if not hasattr(config, "num_attention_heads") or not isinstance(embedding, nn.Module):
        return None
    names = {module: name for name, module in model.named_modules()}
    by_id = {record.group_id: record for record in records}
    layer = graph.layers.get(names.get(embedding, ""))
    if layer is None or layer.out_group not in by_id:
        return None
    hidden = by_id[layer.out_group]
    heads = set()
    for module, name in names.items():
        counts = head_counts(module) if isinstance(adapter_for(module), SplitAttentionAdapter) else None
        group = graph.layers[name].out_group if counts is not None and name in graph.layers else None
        if counts is not None and group is not None:
            channels = graph.group(group).channels
            heads.add(counts[0] * len(keep.get(group, range(channels))) // channels)
    kept = len(keep.get(hidden.group_id, range(hidden.channels)))
    if len(heads) != 1 or kept % next(iter(heads)) == 0:
        return None
    count = next(iter(heads))
    fits = [k for k in hidden.allowed_kept if k <= kept and k % count == 0]
    if not fits:
        return (f"the hidden width keeps {kept} channels, not a multiple of the {count} attention heads kept, and no "
                "allowed count below it is: save_pretrained will refuse the config")
    keep[hidden.group_id] = [c for c, flag in enumerate(hidden.keep_mask(fits[0])) if flag]
    return (f"the hidden width ({hidden.name}) keeps {fits[0]} channels rather than {kept}: a multiple of the "
            f"{count} attention heads kept, as a Hugging Face config requires of hidden_size")
