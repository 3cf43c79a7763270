"""One model of every timm vision family, built with random weights (nothing is downloaded), and a FLOP counter
that sees everything they compute: what the timm tests and ``bench/coverage.py`` share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class TimmCase:
    """A timm model and the image size it is traced at (its own when fixed, else a smaller one for speed)."""

    family: str
    model: str
    size: int
    #: Why acps cannot reach a 1.5x target on it (None: it must).
    limit: str | None = None
    #: Whether acps prunes its attention heads.
    heads: bool = False


#: Models acps cannot prune to 1.5x fewer FLOPs, and why (the README repeats these).
NFNET_LIMIT = ("every convolution is weight-standardised: its weight is normalised over each filter's inputs in the "
               "forward pass, so removing an input channel changes the mean and variance, hence every kept weight")

CASES: list[TimmCase] = [
    TimmCase("resnet", "resnet18", 128),
    TimmCase("resnetd", "resnet26d", 128),
    TimmCase("seresnext", "seresnext26d_32x4d", 128),
    TimmCase("efficientnet", "efficientnet_b0", 128),
    TimmCase("tinynet", "tinynet_e", 106),
    TimmCase("mobilenetv3", "mobilenetv3_large_100", 128),
    TimmCase("mobilenetv4", "mobilenetv4_conv_small", 128),
    TimmCase("ghostnet", "ghostnet_100", 128),
    TimmCase("rexnet", "rexnet_100", 128),
    TimmCase("regnet", "regnety_002", 128),
    TimmCase("dla", "dla34", 128),
    TimmCase("dpn", "dpn68", 128),
    TimmCase("cspnet", "cspresnet50", 128),
    TimmCase("cspdarknet", "cspdarknet53", 128),
    TimmCase("hrnet", "hrnet_w18_small", 128),
    TimmCase("res2net", "res2net50_26w_4s", 128),
    TimmCase("repvgg", "repvgg_a0", 128),
    TimmCase("convnext", "convnext_atto", 128),
    TimmCase("convnextv2", "convnextv2_atto", 128),
    TimmCase("efficientformer", "efficientformer_l1", 224, heads=True),
    TimmCase("levit", "levit_128s", 224, heads=True),
    TimmCase("mobilevit", "mobilevit_xxs", 256, heads=True),
    TimmCase("deit", "deit_tiny_patch16_224", 224, heads=True),
    TimmCase("vit", "vit_tiny_patch16_224", 224, heads=True),
    TimmCase("swin", "swin_tiny_patch4_window7_224", 224, heads=True),
    TimmCase("pvt_v2", "pvt_v2_b0", 128, heads=True),
    TimmCase("poolformer", "poolformer_s12", 128),
    TimmCase("coat", "coat_lite_tiny", 224, heads=True),
    TimmCase("edgenext", "edgenext_xx_small", 128, heads=True),
    TimmCase("fastvit", "fastvit_t8", 128),
    TimmCase("inception", "inception_v3", 160),
    TimmCase("inception_v4", "inception_v4", 160),
    TimmCase("xception", "xception41", 160),
    TimmCase("nfnet", "nfnet_l0", 128, NFNET_LIMIT),
    TimmCase("botnet", "botnet26t_256", 256, heads=True),
    TimmCase("maxvit", "maxvit_nano_rw_256", 256, heads=True),
    TimmCase("vgg", "vgg11", 64),
]
BY_MODEL = {case.model: case for case in CASES}


def build(case: TimmCase, seed: int = 0) -> nn.Module:
    """The model with random weights (and random norm statistics, and no parameter left at zero, such as a
    response norm's gain or an attention bias, so that masking is tested), in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(case.model, pretrained=False, num_classes=10)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and not param.any():
                param.normal_(0, 0.5, generator=generator)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def head_counts(model: nn.Module) -> dict[str, int]:
    """``num_heads`` of every module that has one."""
    return {name: int(m.num_heads) for name, m in model.named_modules()
            if isinstance(getattr(m, "num_heads", None), int)}


def images(case: TimmCase, count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, case.size, case.size, generator=torch.Generator().manual_seed(seed))


def _cpu_attention_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of the CPU kernel of scaled_dot_product_attention (torch's FLOP counter knows only the GPU ones):
    the query-key product and the weighted sum of values."""
    return 2 * math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def counted_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass as ``torch.utils.flop_counter.FlopCounterMode`` counts them, the CPU attention
    kernel included."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())
