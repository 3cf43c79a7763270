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

from typing import Any

from torch import nn

from acps_core.layers.base import adapter_for
from acps_core.layers.mean_norm import EPS_NAMES, MeanNormAdapter
from acps_core.layers.split_attention import SplitAttentionAdapter, head_counts


class PerLayerWidthsWarning(UserWarning):
    """A pruned Hugging Face model whose blocks have different widths: its config cannot state them."""


#: The config fields a pruned model's widths set, in the order reported.
FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
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
        up, down = getattr(module, "up_proj", None), getattr(module, "down_proj", None)
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
            found["intermediate_size"].add(up.out_features)
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


def sync_config(model: nn.Module) -> str | None:
    """Set ``model.config``'s widths to the pruned layers' (see the module docs). Returns why it could not (the
    fields whose widths differ between blocks), or None when it did or the model has no such config."""
    config: Any = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(config, "num_attention_heads"):
        return None
    widths: dict[str, set[Any]] = dict(model_widths(model))
    if "num_attention_heads" not in widths:
        return None  # attention acps does not read the head counts of: the config is left as it is
    eps_field = next((name for name in EPS_FIELDS if isinstance(getattr(config, name, None), float)), None)
    epsilons = norm_epsilons(model)
    if eps_field is not None and epsilons:
        widths[eps_field] = epsilons  # pruning the hidden width folded C / C' into every norm's epsilon
    differ = [f"{name} {sorted(values)}" for name, values in widths.items() if len(values) > 1]
    if differ:
        return ("its blocks have different widths (" + "; ".join(differ) + "), which a Hugging Face config cannot "
                "state: save its state_dict and rebuild it with restore_prune_retrain_model, not save_pretrained")
    for name, values in widths.items():
        if hasattr(config, name) or name == "head_dim":
            setattr(config, name, next(iter(values)))
    return None
