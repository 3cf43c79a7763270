"""A zoo of small versions of real architectures, written here (no downloads), with hand-checked channel groups.

Every model is a few channels wide and takes a small input, so tracing, pruning and searching it takes a fraction
of a second. Each :class:`ZooCase` names a factory, the per-sample input shape and what the channel graph must
find:

- ``groups``: the producer layers of every channel group (a group per set; a layer called twice gives one group
  per call);
- ``blocked``: every Conv/ConvTranspose/Linear layer that must not be prunable, with words its reason contains
  (all other layers must be prunable; a group is prunable exactly when none of its producers is blocked);
- ``unit`` / ``blocks``: for prunable groups (named by any of their producers) the unit (GroupNorm group,
  attention head) and the number of equal blocks (grouped conv, chunk); 1 for groups not listed;
- ``followers``: what follows a group's channels one to one (norms, PReLU, depthwise convs, and bare parameters
  such as a class token, a position embedding or a layer scale), exactly;
- ``consumers``: ``(layer, offset, block)`` of every layer reading a group's channels, exactly.

The vocabulary of blocks (conv-bn-act, residual, inverted residual, squeeze-excitation, concat, grouped conv, chunk)
is reused by ``tests/graph/test_zoo_properties.py`` to build random networks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from acps_core.graph.build import build_channel_graph
from acps_core.graph.masking import masked_channels
from acps_core.graph.model import ChannelGraph, ChannelGroup
from acps_core.graph.verify import verify_groups
from acps_core.prune.slicing import prune_channels
from testing.models import randomize_norms

CLASSES = 5


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------

def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine parameters for every norm and PReLU (and the free parameters of
    transformers), so that masking or slicing the wrong channel shows in the outputs.

    BatchNorms get ``testing.models.randomize_norms``'s treatment (which needs affine parameters and running
    statistics); norms without them get whatever of the two they have."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if all(m.affine and m.track_running_stats for m in batchnorms):
        randomize_norms(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)):
                if getattr(module, "weight", None) is not None:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)
                if getattr(module, "running_mean", None) is not None:
                    module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            elif isinstance(module, nn.PReLU):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.5)
        for name, param in model.named_parameters():
            if name.split(".")[-1] in ("cls_token", "pos_embed", "gamma"):
                offset = 0.0 if name.endswith(("cls_token", "pos_embed")) else 1.0
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5 + offset)
    return model


def random_keep(graph: ChannelGraph, seed: int) -> dict[int, list[int]]:
    """A random pruning decision: every prunable group loses 30-60 % of its atoms (an atom is one whole unit from
    every block, see ``ChannelGroup.atoms``), at least one, and keeps at least one. Groups of one atom keep all."""
    generator = torch.Generator().manual_seed(seed)
    keep: dict[int, list[int]] = {}
    for group in graph.prunable_groups:
        atoms = group.atoms(torch.zeros(group.channels))
        if len(atoms) < 2:
            continue
        order = torch.randperm(len(atoms), generator=generator).tolist()
        fraction = 0.3 + 0.3 * float(torch.rand((), generator=generator))
        count = max(1, min(len(atoms) - 1, int(fraction * len(atoms))))
        removed = {c for index in order[:count] for c in atoms[index]}
        keep[group.id] = [c for c in range(group.channels) if c not in removed]
        assert group.check_keep(keep[group.id]) is None, (group.producers, keep[group.id])
    return keep


class ConvBNAct(nn.Module):
    """conv -> BatchNorm -> activation (``act`` None: no activation)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: Callable[[torch.Tensor], torch.Tensor] | None = F.relu) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.act(x) if self.act is not None else x


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: a per-channel gate computed from the pooled input multiplies the input."""

    def __init__(self, channels: int, squeeze: int, act: Callable[[torch.Tensor], torch.Tensor] = F.relu,
                 gate: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.act = act
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


# ----------------------------------------------------------------------------------------------------------------
# ResNet, ResNeXt, RegNet
# ----------------------------------------------------------------------------------------------------------------

def shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """The projection a residual block needs when it changes width or resolution (None: identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt/RegNet), optional squeeze-excitation (RegNetY), 1x1 expand."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1, se: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.se = SqueezeExcite(mid, se) if se else None
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        if self.se is not None:
            out = self.se(out)
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, stem: int, layer1: nn.Module, layer2: nn.Module, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(stem)
        self.layer1 = layer1
        self.layer2 = layer2
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_basic() -> nn.Module:
    return ResNet(8, BasicBlock(8, 8), BasicBlock(8, 16, stride=2), 16)


def resnet_bottleneck() -> nn.Module:
    return ResNet(16, Bottleneck(16, 4, 16), Bottleneck(16, 8, 32, stride=2), 32)


def resnext() -> nn.Module:
    return ResNet(16, Bottleneck(16, 8, 16, groups=4), Bottleneck(16, 16, 32, stride=2, groups=4), 32)


def regnety() -> nn.Module:
    """RegNetY: group width 4 convs with squeeze-excitation inside the bottleneck."""
    return ResNet(8, Bottleneck(8, 16, 16, stride=2, groups=4, se=4), Bottleneck(16, 16, 16, groups=4, se=4), 16)


# ----------------------------------------------------------------------------------------------------------------
# MobileNetV2, MobileNetV3, EfficientNet
# ----------------------------------------------------------------------------------------------------------------

class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (skipped when ``expand`` is 1), depthwise conv, optional squeeze-excitation,
    1x1 linear projection; residual when the shape allows."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1, kernel: int = 3, se: int = 0,
                 act: Callable[[torch.Tensor], torch.Tensor] = F.relu6,
                 gate: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid,
                 se_act: Callable[[torch.Tensor], torch.Tensor] = F.relu) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = ConvBNAct(cin, hidden, 1, act=act) if expand != 1 else None
        self.dw = ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=act)
        self.se = SqueezeExcite(hidden, se, act=se_act, gate=gate) if se else None
        self.project = ConvBNAct(hidden, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.dw(out)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3, 2, act=F.relu6)
        self.b0 = MBConv(8, 4, 1)
        self.b1 = MBConv(4, 8, 4, stride=2)
        self.b2 = MBConv(8, 8, 3)
        self.last = ConvBNAct(8, 32, 1, act=F.relu6)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.b2(self.b1(self.b0(self.stem(x)))))
        return self.fc(self.dropout(x.mean((2, 3))))


class MobileNetV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        hs, hsig = F.hardswish, F.hardsigmoid
        self.stem = ConvBNAct(3, 8, 3, 2, act=hs)
        self.b0 = MBConv(8, 8, 1, se=4, act=F.relu, gate=hsig)
        self.b1 = MBConv(8, 12, 3, stride=2, kernel=5, se=8, act=hs, gate=hsig)
        self.last = ConvBNAct(12, 32, 1, act=hs)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.b1(self.b0(self.stem(x))))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(F.hardswish(self.fc1(x)))


class EfficientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        silu = F.silu
        self.stem = ConvBNAct(3, 8, 3, 2, act=silu)
        self.b0 = MBConv(8, 8, 1, se=2, act=silu, se_act=silu)
        self.b1 = MBConv(8, 12, 3, stride=2, se=2, act=silu, se_act=silu)
        self.b2 = MBConv(12, 12, 3, kernel=5, se=3, act=silu, se_act=silu)
        self.head = ConvBNAct(12, 32, 1, act=None)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.b2(self.b1(self.b0(self.stem(x)))))
        x = x * torch.sigmoid(x)  # SiLU written out: the tensor gates itself
        return self.fc(F.dropout(x.mean((2, 3)), 0.2, self.training))


# ----------------------------------------------------------------------------------------------------------------
# DenseNet, Inception, ShuffleNetV2, CSP (chunk + concat)
# ----------------------------------------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    """Pre-activation BN-ReLU-conv1x1-BN-ReLU-conv3x3; its output is concatenated to its input."""

    def __init__(self, cin: int, bottleneck: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bottleneck, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck)
        self.conv2 = nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return torch.cat([x, y], 1)


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(8)
        self.layer1 = DenseLayer(8, 8, 4)
        self.layer2 = DenseLayer(12, 8, 4)
        self.trans_norm = nn.BatchNorm2d(16)
        self.trans_conv = nn.Conv2d(16, 8, 1, bias=False)
        self.norm5 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm0(self.stem(x)))
        x = self.layer2(self.layer1(x))
        x = F.avg_pool2d(self.trans_conv(F.relu(self.trans_norm(x))), 2)
        x = F.relu(self.norm5(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InceptionBlock(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = ConvBNAct(cin, 4, 1)
        self.b2 = nn.Sequential(ConvBNAct(cin, 4, 1), ConvBNAct(4, 6, 3))
        self.b3 = nn.Sequential(ConvBNAct(cin, 2, 1), ConvBNAct(2, 4, 3))
        self.b4 = ConvBNAct(cin, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(x, 3, 1, 1)
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(pooled)], 1)


class Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3)
        self.mixed = InceptionBlock(8)
        self.fc = nn.Linear(18, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixed(F.max_pool2d(self.stem(x), 2))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: stride 1 chunks the input in two halves and transforms one; stride 2 transforms the
    whole input in two branches; the halves are concatenated and channel-shuffled."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        b2_in = cin if stride == 2 else cin // 2
        if stride == 2:
            self.branch1 = nn.Sequential(ConvBNAct(cin, cin, 3, 2, groups=cin, act=None), ConvBNAct(cin, half, 1))
        self.branch2 = nn.Sequential(ConvBNAct(b2_in, half, 1), ConvBNAct(half, half, 3, stride, groups=half, act=None),
                                     ConvBNAct(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3)
        self.ua = ShuffleUnit(8, 8, 1)
        self.ub = ShuffleUnit(8, 16, 2)
        self.conv5 = ConvBNAct(16, 32, 1)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.ub(self.ua(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class ShuffleV1Unit(nn.Module):
    """ShuffleNetV1 unit: grouped 1x1 conv, channel shuffle, depthwise 3x3, grouped 1x1 conv; added to the input
    (stride 1) or concatenated with its average pool (stride 2)."""

    def __init__(self, cin: int, cout: int, mid: int, groups: int, stride: int) -> None:
        super().__init__()
        self.stride, self.groups = stride, groups
        self.gconv1 = ConvBNAct(cin, mid, 1, groups=groups)
        self.dw = ConvBNAct(mid, mid, 3, stride, groups=mid, act=None)
        self.gconv2 = ConvBNAct(mid, cout - cin if stride == 2 else cout, 1, groups=groups, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gconv2(self.dw(channel_shuffle(self.gconv1(x), self.groups)))
        if self.stride == 2:
            return F.relu(torch.cat([F.avg_pool2d(x, 3, 2, 1), y], 1))
        return F.relu(x + y)


class ShuffleNetV1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 24, 3)
        self.ua = ShuffleV1Unit(24, 24, 12, 2, 1)
        self.ub = ShuffleV1Unit(24, 48, 18, 3, 2)
        self.fc = nn.Linear(48, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ub(self.ua(self.stem(x))).mean((2, 3)))


class CSPNet(nn.Module):
    """Cross-stage partial: half the channels (``chunk``) go through a conv, the other half bypass it; concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3)
        self.part = ConvBNAct(4, 4, 3)
        self.fuse = ConvBNAct(8, 12, 1)
        self.fc = nn.Linear(12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stem(x).chunk(2, dim=1)
        x = self.fuse(torch.cat([a, self.part(b)], 1))
        return self.fc(x.mean((2, 3)))


# ----------------------------------------------------------------------------------------------------------------
# U-Net, 1-D audio, 3-D video
# ----------------------------------------------------------------------------------------------------------------

class UNet(nn.Module):
    """Two levels; GroupNorm, InstanceNorm and BatchNorm; ConvTranspose upsampling; skip concats; per-pixel
    output of two classes."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1a, self.gn1a = nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.enc1b, self.gn1b = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.enc2a, self.in2a = nn.Conv2d(4, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.enc2b, self.bn2b = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mid, self.bn_mid = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.up2 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec2, self.bn_dec2 = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.up1 = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.dec1, self.gn_dec1 = nn.Conv2d(8, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = F.relu(self.gn1b(self.enc1b(F.relu(self.gn1a(self.enc1a(x))))))
        e2 = F.relu(self.bn2b(self.enc2b(F.relu(self.in2a(self.enc2a(F.max_pool2d(e1, 2)))))))
        m = F.relu(self.bn_mid(self.mid(F.max_pool2d(e2, 2))))
        d2 = F.relu(self.bn_dec2(self.dec2(torch.cat([self.up2(m), e2], 1))))
        d1 = F.relu(self.gn_dec1(self.dec1(torch.cat([self.up1(d2), e1], 1))))
        return self.head(d1)


class AudioNet(nn.Module):
    """Conv1d/BatchNorm1d/PReLU on a waveform, a residual block, a pooled C x T map flattened into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1, self.act1 = nn.Conv1d(1, 8, 5, stride=2, padding=2), nn.BatchNorm1d(8), nn.PReLU(8)
        self.c2, self.bn2, self.act2 = nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16), nn.PReLU(16)
        self.c3, self.bn3, self.act3 = nn.Conv1d(16, 16, 3, padding=2, dilation=2), nn.BatchNorm1d(16), nn.PReLU(16)
        self.c4, self.act4 = nn.Conv1d(16, 12, 1), nn.PReLU()
        self.fc = nn.Linear(12 * 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.c1(x)))
        h = self.act2(self.bn2(self.c2(h)))
        h = h + self.act3(self.bn3(self.c3(h)))
        h = self.act4(self.c4(h))
        return self.fc(F.adaptive_avg_pool1d(h, 4).flatten(1))


class VideoNet(nn.Module):
    """Conv3d with (2+1)-D factorised residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(8)
        self.spatial, self.bn_s = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(8)
        self.temporal, self.bn_t = nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0)), nn.BatchNorm3d(8)
        self.down, self.bn_d = nn.Conv3d(8, 12, 3, stride=2, padding=1), nn.BatchNorm3d(12)
        self.fc = nn.Linear(12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(h + self.bn_t(self.temporal(F.relu(self.bn_s(self.spatial(h))))))
        h = F.relu(self.bn_d(self.down(h)))
        return self.fc(F.adaptive_avg_pool3d(h, 1).flatten(1))


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an N x C x H x W map, written as ConvNeXt does: permute, norm, permute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, then channels-last LayerNorm and a Linear MLP on the last dim of a 4-D tensor;
    optional layer scale (a per-channel constant)."""

    def __init__(self, dim: int, layer_scale: bool) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5)) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(F.gelu(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Stem, a block, a downsampling layer, a block with layer scale. The LayerNorms over the channels of the
    N x C x H x W maps are ``ChannelsFirstLayerNorm`` modules (torchvision's and timm's ``LayerNorm2d``), or with
    ``subclass_norm=False`` plain LayerNorms called on permuted tensors."""

    def __init__(self, subclass_norm: bool = True) -> None:
        super().__init__()
        norm = ChannelsFirstLayerNorm if subclass_norm else nn.LayerNorm
        self.subclass_norm = subclass_norm
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.stem_norm = norm(8)
        self.block1 = ConvNeXtBlock(8, layer_scale=False)
        self.down_norm = norm(8)
        self.down = nn.Conv2d(8, 16, 2, stride=2)
        self.block2 = ConvNeXtBlock(16, layer_scale=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, CLASSES)

    def norm2d(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return norm(x) if self.subclass_norm else norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.norm2d(self.stem_norm, self.stem(x)))
        x = self.block2(self.down(self.norm2d(self.down_norm, x)))
        return self.head(self.norm(x.mean((2, 3))))


class StdConv2d(nn.Conv2d):
    """Weight-standardised conv (BiT / ResNetV2): every filter is normalised over its inputs before use, so the
    filter's values depend on how many input channels it has."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-6), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class BiT(nn.Module):
    """A plain conv stem, then GroupNorm and weight-standardised convs with a residual, a StdConv head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.gn0 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.pre, self.gn1 = nn.Conv2d(8, 8, 1), nn.GroupNorm(4, 8)
        self.s1, self.gn2 = StdConv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.s2, self.gn3 = StdConv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.head = StdConv2d(8, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gn0(self.stem(x)))
        h = F.relu(self.gn1(self.pre(h)))
        h = h + self.s2(F.relu(self.gn2(self.s1(h))))
        return self.head(F.relu(self.gn3(h))).mean((2, 3))


# ----------------------------------------------------------------------------------------------------------------
# Transformers
# ----------------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v Linear projections, split into heads by a view.

    ``fixed_heads`` writes the head count as a constant in the view (which a pruned model could not follow);
    ``sdpa`` uses ``F.scaled_dot_product_attention`` instead of the hand-written matmuls and softmax.
    """

    def __init__(self, dim: int, heads: int, sdpa: bool = False, fixed_heads: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.sdpa = sdpa
        self.fixed_heads = fixed_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor, b: int, t: int) -> torch.Tensor:
        heads = self.heads if self.fixed_heads else -1
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.split(self.q(x), b, t), self.split(self.k(x), b, t), self.split(self.v(x), b, t)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class TimmAttention(nn.Module):
    """Attention as timm writes it: one fused qkv Linear, the head count as a constant, and the output reshaped
    to the channel count ``C`` read from the input's shape."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa: bool, timm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn: nn.Module = TimmAttention(dim, heads) if timm else Attention(dim, heads, sdpa)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch-embedding conv, optional class token and position embedding, pre-norm blocks, a final LayerNorm,
    and a head on the class token (or on the mean of the tokens without one). 3x8x8 input: 4 patches."""

    def __init__(self, cls_token: bool = True, pos_embed: bool = True, sdpa: bool = False, dim: int = 16,
                 heads: int = 2, depth: int = 2, timm: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        tokens = 4 + int(cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim)) if pos_embed else None
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, sdpa, timm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


class FixedHeadsAttentionNet(nn.Module):
    """Tokens in (B, T, 6): an embedding Linear on the last dim, attention whose view names the head count."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = Attention(16, 2, fixed_heads=True)
        self.fc = nn.Linear(16, 24)
        self.head = nn.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = F.relu(self.fc(self.attn(h)))
        return self.head(h.mean(1))


class MHANet(nn.Module):
    """nn.MultiheadAttention, whose three projections live inside one module, on a residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        h = self.norm(h + a)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


# ----------------------------------------------------------------------------------------------------------------
# Patterns acps must leave alone
# ----------------------------------------------------------------------------------------------------------------

class SharedWeights(nn.Module):
    """Two convs sharing one weight tensor, and a conv called twice in one forward (on its own output)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.mid = nn.Conv2d(8, 8, 1)
        self.twice = nn.Conv2d(8, 8, 1)
        self.last = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(self.b(F.relu(self.a(h))))
        h = F.relu(self.mid(h))
        h = self.twice(F.relu(self.twice(h)))
        h = F.relu(self.last(h))
        return self.fc(h.mean((2, 3)))


class SharedParameter(nn.Module):
    """One bias parameter added to the outputs of two convs that nothing else couples: the parameter ties their
    channels together."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1) * 0.5)
        self.ca = nn.Conv2d(8, 4, 1)
        self.cb = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ca(F.relu(self.a(x) + self.shift)) + self.cb(F.relu(self.b(x) + self.shift))
        return self.fc(h.mean((2, 3)))


class BlockedPatterns(nn.Module):
    """Branches of one stem: a LayerNorm over C x H x W, a split with fixed sizes, a per-channel constant that
    is neither a layer nor a parameter (computed in the forward), and a plain branch; pooled and concatenated
    into the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.ln_conv = nn.Conv2d(8, 6, 3, padding=1)
        self.ln = nn.LayerNorm([6, 8, 8])
        self.split_conv = nn.Conv2d(8, 8, 1)
        self.const_conv = nn.Conv2d(8, 4, 1)
        self.ok_conv = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(6 + 8 + 4 + 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        p1 = F.relu(self.ln(self.ln_conv(h))).mean((2, 3))
        s1, s2 = torch.split(self.split_conv(h), [3, 5], dim=1)
        p2 = torch.cat([s1.mean((2, 3)), s2.amax((2, 3))], 1)
        scale = torch.linspace(0.5, 1.5, 4, dtype=h.dtype).view(1, 4, 1, 1)
        p3 = (self.const_conv(h) * scale).mean((2, 3))
        p4 = F.relu(self.ok_conv(h)).mean((2, 3))
        return self.fc(torch.cat([p1, p2, p3, p4], 1))


# ----------------------------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------------------------

OUTPUT = ("model's output",)


@dataclass(frozen=True)
class ZooCase:
    """A zoo model and what its channel graph must be (see the module docstring)."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    groups: list[set[str]]
    blocked: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unit: Mapping[str, int] = field(default_factory=dict)
    blocks: Mapping[str, int] = field(default_factory=dict)
    aligned: Mapping[str, int] = field(default_factory=dict)
    followers: Mapping[str, set[str]] = field(default_factory=dict)
    consumers: Mapping[str, set[tuple[str, int, int]]] = field(default_factory=dict)
    #: "classes": the output is (N, CLASSES) logits; "map": any other shape (labels shaped like the output)
    output: str = "classes"

    def build(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return randomize(self.factory(), seed).to(dtype).eval()

    def inputs(self, batch: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape, generator=torch.Generator().manual_seed(seed)).to(dtype)

    @property
    def prunable_groups(self) -> int:
        return sum(1 for producers in self.groups if not producers & set(self.blocked))


def _cases() -> list[ZooCase]:
    bb = "layer{}.{}".format
    cases = [
        ZooCase(
            "resnet_basic", resnet_basic, (3, 8, 8),
            groups=[{"stem", bb(1, "conv2")}, {bb(1, "conv1")}, {bb(2, "conv1")},
                    {bb(2, "conv2"), bb(2, "downsample.0")}, {"fc"}],
            blocked={"fc": OUTPUT},
            followers={"stem": {"bn", "layer1.bn2"}, "layer2.conv2": {"layer2.bn2", "layer2.downsample.1"}},
            consumers={"stem": {("layer1.conv1", 0, 1), ("layer2.conv1", 0, 1), ("layer2.downsample.0", 0, 1)},
                       "layer2.conv2": {("fc", 0, 1)}},
        ),
        ZooCase(
            "resnet_bottleneck", resnet_bottleneck, (3, 8, 8),
            groups=[{"stem", bb(1, "conv3")}, {bb(1, "conv1")}, {bb(1, "conv2")}, {bb(2, "conv1")},
                    {bb(2, "conv2")}, {bb(2, "conv3"), bb(2, "downsample.0")}, {"fc"}],
            blocked={"fc": OUTPUT},
            consumers={"layer1.conv1": {("layer1.conv2", 0, 1)},
                       "stem": {("layer1.conv1", 0, 1), ("layer2.conv1", 0, 1), ("layer2.downsample.0", 0, 1)}},
        ),
        ZooCase(
            "resnext", resnext, (3, 8, 8),
            groups=[{"stem", bb(1, "conv3")}, {bb(1, "conv1")}, {bb(1, "conv2")}, {bb(2, "conv1")},
                    {bb(2, "conv2")}, {bb(2, "conv3"), bb(2, "downsample.0")}, {"fc"}],
            blocked={"fc": OUTPUT},
            # The grouped 3x3 convs: every conv group keeps as many inputs and as many outputs as the others.
            blocks={bb(1, "conv1"): 4, bb(1, "conv2"): 4, bb(2, "conv1"): 4, bb(2, "conv2"): 4},
        ),
        ZooCase(
            "regnety", regnety, (3, 8, 8),
            # The squeeze-excitation gate's producer joins the gated grouped conv's group (4 blocks).
            groups=[{"stem"}, {bb(1, "conv1")}, {bb(1, "conv2"), bb(1, "se.expand")}, {bb(1, "se.reduce")},
                    {bb(1, "conv3"), bb(1, "downsample.0"), bb(2, "conv3")}, {bb(2, "conv1")},
                    {bb(2, "conv2"), bb(2, "se.expand")}, {bb(2, "se.reduce")}, {"fc"}],
            blocked={"fc": OUTPUT},
            blocks={bb(1, "conv1"): 4, bb(1, "conv2"): 4, bb(2, "conv1"): 4, bb(2, "conv2"): 4},
            consumers={bb(1, "conv2"): {(bb(1, "se.reduce"), 0, 1), (bb(1, "conv3"), 0, 1)}},
        ),
        ZooCase(
            "mobilenet_v2", MobileNetV2, (3, 16, 16),
            groups=[{"stem.conv"}, {"b0.project.conv"}, {"b1.expand.conv"}, {"b1.project.conv", "b2.project.conv"},
                    {"b2.expand.conv"}, {"last.conv"}, {"fc"}],
            blocked={"fc": OUTPUT},
            # A depthwise conv follows its input's channels (its output is that group again).
            followers={"stem.conv": {"stem.bn", "b0.dw.conv", "b0.dw.bn"},
                       "b1.expand.conv": {"b1.expand.bn", "b1.dw.conv", "b1.dw.bn"},
                       "b1.project.conv": {"b1.project.bn", "b2.project.bn"}},
            consumers={"stem.conv": {("b0.project.conv", 0, 1)},
                       "b1.project.conv": {("b2.expand.conv", 0, 1), ("last.conv", 0, 1)}},
        ),
        ZooCase(
            "mobilenet_v3", MobileNetV3, (3, 16, 16),
            groups=[{"stem.conv", "b0.se.expand", "b0.project.conv"}, {"b0.se.reduce"},
                    {"b1.expand.conv", "b1.se.expand"}, {"b1.se.reduce"}, {"b1.project.conv"}, {"last.conv"},
                    {"fc1"}, {"fc2"}],
            blocked={"fc2": OUTPUT},
            consumers={"stem.conv": {("b0.se.reduce", 0, 1), ("b0.project.conv", 0, 1), ("b1.expand.conv", 0, 1)},
                       "b0.se.reduce": {("b0.se.expand", 0, 1)}},
        ),
        ZooCase(
            "efficientnet", EfficientNet, (3, 16, 16),
            groups=[{"stem.conv", "b0.se.expand", "b0.project.conv"}, {"b0.se.reduce"},
                    {"b1.expand.conv", "b1.se.expand"}, {"b1.se.reduce"}, {"b1.project.conv", "b2.project.conv"},
                    {"b2.expand.conv", "b2.se.expand"}, {"b2.se.reduce"}, {"head.conv"}, {"fc"}],
            blocked={"fc": OUTPUT},
            followers={"b2.expand.conv": {"b2.expand.bn", "b2.dw.conv", "b2.dw.bn"}},
        ),
        ZooCase(
            "densenet", DenseNet, (3, 8, 8),
            groups=[{"stem"}, {"layer1.conv1"}, {"layer1.conv2"}, {"layer2.conv1"}, {"layer2.conv2"},
                    {"trans_conv"}, {"fc"}],
            blocked={"fc": OUTPUT},
            # Each group keeps its place in every concat that holds it.
            followers={"stem": {"norm0", "layer1.norm1", "layer2.norm1", "trans_norm"},
                       "layer1.conv2": {"layer2.norm1", "trans_norm"}, "layer2.conv2": {"trans_norm"},
                       "trans_conv": {"norm5"}},
            consumers={"stem": {("layer1.conv1", 0, 1), ("layer2.conv1", 0, 1), ("trans_conv", 0, 1)},
                       "layer1.conv2": {("layer2.conv1", 8, 1), ("trans_conv", 8, 1)},
                       "layer2.conv2": {("trans_conv", 12, 1)}},
        ),
        ZooCase(
            "inception", Inception, (3, 8, 8),
            groups=[{"stem.conv"}, {"mixed.b1.conv"}, {"mixed.b2.0.conv"}, {"mixed.b2.1.conv"},
                    {"mixed.b3.0.conv"}, {"mixed.b3.1.conv"}, {"mixed.b4.conv"}, {"fc"}],
            blocked={"fc": OUTPUT},
            consumers={"stem.conv": {("mixed.b1.conv", 0, 1), ("mixed.b2.0.conv", 0, 1), ("mixed.b3.0.conv", 0, 1),
                                     ("mixed.b4.conv", 0, 1)},
                       "mixed.b1.conv": {("fc", 0, 1)}, "mixed.b2.1.conv": {("fc", 4, 1)},
                       "mixed.b3.1.conv": {("fc", 10, 1)}, "mixed.b4.conv": {("fc", 14, 1)}},
        ),
        ZooCase(
            "shufflenet_v2", ShuffleNetV2, (3, 8, 8),
            groups=[{"stem.conv"}, {"ua.branch2.0.conv"}, {"ua.branch2.2.conv"},
                    {"ub.branch1.1.conv", "ub.branch2.2.conv"}, {"ub.branch2.0.conv"}, {"conv5.conv"}, {"fc"}],
            # ub's two branches are interleaved by its shuffle: one group keeping the same channels in both,
            # read by conv5 at every other input. ua's shuffle interleaves the half of stem's channels that
            # bypasses it with its branch: stem's other half stays, so both are left alone; ub's inputs come out
            # of that shuffle, so its depthwise conv has no group to follow.
            blocked={"stem.conv": ("part of these channels",), "ua.branch2.2.conv": ("part of these channels",),
                     "ub.branch1.0.conv": ("no prunable layer",), "fc": OUTPUT},
            followers={"ua.branch2.0.conv": {"ua.branch2.0.bn", "ua.branch2.1.conv", "ua.branch2.1.bn"},
                       "ub.branch1.1.conv": {"ub.branch1.1.bn", "ub.branch2.2.bn"}},
            consumers={"ua.branch2.0.conv": {("ua.branch2.2.conv", 0, 1)}, "conv5.conv": {("fc", 0, 1)},
                       "ub.branch1.1.conv": {("conv5.conv", 0, 1), ("conv5.conv", 1, 1)}},
        ),
        ZooCase(
            "shufflenet_v1", ShuffleNetV1, (3, 8, 8),
            # The channels gconv1 makes are shuffled: 2 (3) units that keep the same channels (aligned), each
            # spread over gconv2's 2 (3) groups, and gconv1's own groups: equal counts in 4 (9) blocks.
            groups=[{"stem.conv", "ua.gconv2.conv"}, {"ua.gconv1.conv"}, {"ub.gconv1.conv"}, {"ub.gconv2.conv"},
                    {"fc"}],
            blocked={"fc": OUTPUT},
            blocks={"stem.conv": 6, "ua.gconv1.conv": 4, "ub.gconv1.conv": 9, "ub.gconv2.conv": 3},
            aligned={"ua.gconv1.conv": 2, "ub.gconv1.conv": 3},
            followers={"ua.gconv1.conv": {"ua.gconv1.bn", "ua.dw.conv", "ua.dw.bn"},
                       "ub.gconv1.conv": {"ub.gconv1.bn", "ub.dw.conv", "ub.dw.bn"}},
            consumers={"ua.gconv1.conv": {("ua.gconv2.conv", 0, 1), ("ua.gconv2.conv", 1, 1)},
                       "ub.gconv1.conv": {("ub.gconv2.conv", k, 1) for k in range(3)},
                       "stem.conv": {("ua.gconv1.conv", 0, 1), ("ub.gconv1.conv", 0, 1), ("fc", 0, 1)},
                       "ub.gconv2.conv": {("fc", 24, 1)}},
        ),
        ZooCase(
            "csp_chunk", CSPNet, (3, 8, 8),
            groups=[{"stem.conv"}, {"part.conv"}, {"fuse.conv"}, {"fc"}],
            blocked={"fc": OUTPUT},
            blocks={"stem.conv": 2},  # the two halves of the chunk keep equal counts
            consumers={"stem.conv": {("part.conv", 0, 1), ("fuse.conv", 0, 1)}, "part.conv": {("fuse.conv", 4, 1)}},
        ),
        ZooCase(
            "unet", UNet, (3, 8, 8),
            groups=[{"enc1a"}, {"enc1b"}, {"enc2a"}, {"enc2b"}, {"mid"}, {"up2"}, {"dec2"}, {"up1"}, {"dec1"},
                    {"head"}],
            blocked={"head": OUTPUT},
            unit={"enc1a": 2, "enc1b": 2, "dec1": 2},  # GroupNorm(2, 4): whole norm groups of 2
            followers={"enc1a": {"gn1a"}, "enc1b": {"gn1b"}, "enc2a": {"in2a"}, "dec1": {"gn_dec1"}},
            consumers={"enc1b": {("enc2a", 0, 1), ("dec1", 4, 1)}, "enc2b": {("mid", 0, 1), ("dec2", 8, 1)},
                       "mid": {("up2", 0, 1)}, "up2": {("dec2", 0, 1)}, "up1": {("dec1", 0, 1)}},
            output="map",
        ),
        ZooCase(
            "audio_1d", AudioNet, (1, 32),
            groups=[{"c1"}, {"c2", "c3"}, {"c4"}, {"fc"}],
            blocked={"fc": OUTPUT},
            followers={"c1": {"bn1", "act1"}, "c2": {"bn2", "act2", "bn3", "act3"}, "c4": set()},
            consumers={"c4": {("fc", 0, 4)}},  # pooled to 4 steps, flattened: 4 inputs per channel
        ),
        ZooCase(
            "video_3d", VideoNet, (3, 4, 8, 8),
            groups=[{"stem", "temporal"}, {"spatial"}, {"down"}, {"fc"}],
            blocked={"fc": OUTPUT},
            followers={"stem": {"bn", "bn_t"}},
        ),
        ZooCase(
            "convnext", ConvNeXt, (3, 16, 16),
            # torchvision/timm's LayerNorm2d subclasses LayerNorm with its own (permuting) forward: acps traces it
            # function by function and maps its layer_norm over the channels by what it computes, so the module
            # follows stage 1's channels (and is masked over the kept channels); stage 2's layer scale is sliced.
            groups=[{"stem", "block1.pwconv2"}, {"block1.pwconv1"}, {"down", "block2.pwconv2"},
                    {"block2.pwconv1"}, {"head"}],
            blocked={"head": OUTPUT},
            followers={"stem": {"stem_norm", "block1.dwconv", "block1.norm", "down_norm"},
                       "down": {"block2.dwconv", "block2.norm", "block2.gamma", "norm"}},
            consumers={"block1.pwconv1": {("block1.pwconv2", 0, 1)}, "stem": {("block1.pwconv1", 0, 1), ("down", 0, 1)},
                       "down": {("block2.pwconv1", 0, 1), ("head", 0, 1)}},
        ),
        ZooCase(
            "convnext_permute", lambda: ConvNeXt(subclass_norm=False), (3, 16, 16),
            # The layer scale of block2 is a parameter holding stage 2's channels: it follows their group.
            groups=[{"stem", "block1.pwconv2"}, {"block1.pwconv1"}, {"down", "block2.pwconv2"}, {"block2.pwconv1"},
                    {"head"}],
            blocked={"head": OUTPUT},
            # The channels-first LayerNorms (stem_norm, down_norm) follow the channels like the block's own.
            followers={"stem": {"stem_norm", "block1.dwconv", "block1.norm", "down_norm"},
                       "down": {"block2.dwconv", "block2.norm", "block2.gamma", "norm"}},
            consumers={"stem": {("block1.pwconv1", 0, 1), ("down", 0, 1)},
                       "block1.pwconv1": {("block1.pwconv2", 0, 1)},
                       "down": {("block2.pwconv1", 0, 1), ("head", 0, 1)}},
        ),
        ZooCase(
            "bit_stdconv", BiT, (3, 8, 8),
            # A weight-standardised conv normalises each filter over its inputs: removing input channels changes
            # the filter, so nothing it reads may be pruned.
            # The weight-standardised convs are subclasses with their own forward: acps traces them function by
            # function, so they are not layers of any group and what they read is left alone.
            groups=[{"stem"}, {"pre"}],
            blocked={"pre": ("conv2d",), "s2": ("its own forward",), "s1": ("its own forward",),
                     "head": ("its own forward",)},
            unit={"stem": 2, "pre": 2},  # GroupNorm(4, 8): whole norm groups of 2
            followers={"stem": {"gn0"}},
            consumers={"stem": {("pre", 0, 1)}},
        ),
        ZooCase(
            "vit", ViT, (3, 8, 8),
            # The class token and the position embedding are parameters holding the residual stream's channels:
            # they follow its group and are sliced with it.
            groups=[{"patch", "blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.attn.proj", "blocks.1.mlp.fc2"},
                    {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"}, {"blocks.0.mlp.fc1"},
                    {"blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v"}, {"blocks.1.mlp.fc1"}, {"head"}],
            blocked={"head": OUTPUT},
            unit={"blocks.0.attn.q": 8, "blocks.1.attn.q": 8},  # whole heads of 8
            followers={"patch": {"cls_token", "pos_embed", "blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1",
                                 "blocks.1.norm2", "norm"}},
            consumers={"blocks.0.attn.q": {("blocks.0.attn.proj", 0, 1)},
                       "blocks.1.mlp.fc1": {("blocks.1.mlp.fc2", 0, 1)},
                       "patch": {(f"blocks.{i}.{layer}", 0, 1) for i in (0, 1)
                                 for layer in ("attn.q", "attn.k", "attn.v", "mlp.fc1")} | {("head", 0, 1)}},
        ),
        ZooCase(
            "vit_gap_sdpa", lambda: ViT(cls_token=False, pos_embed=False, sdpa=True), (3, 8, 8),
            groups=[{"patch", "blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.attn.proj", "blocks.1.mlp.fc2"},
                    {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"}, {"blocks.0.mlp.fc1"},
                    {"blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v"}, {"blocks.1.mlp.fc1"}, {"head"}],
            blocked={"head": OUTPUT},
            unit={"blocks.0.attn.q": 8, "blocks.1.attn.q": 8},
            # The residual stream: every LayerNorm follows it, every projection into a block reads it.
            followers={"patch": {"blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"}},
            consumers={"patch": {(f"blocks.{i}.{layer}", 0, 1) for i in (0, 1)
                                 for layer in ("attn.q", "attn.k", "attn.v", "mlp.fc1")} | {("head", 0, 1)},
                       "blocks.1.attn.v": {("blocks.1.attn.proj", 0, 1)}},
        ),
        ZooCase(
            "vit_timm", lambda: ViT(cls_token=False, pos_embed=False, depth=1, timm=True), (3, 8, 8),
            # The attention output is reshaped to the residual stream's width C, read from x.shape: the attention
            # is traced whole and its forward follows its pruned heads, so both the heads and the stream prune.
            groups=[{"patch", "blocks.0.attn.proj", "blocks.0.mlp.fc2"}, {"blocks.0.attn"},
                    {"blocks.0.mlp.fc1"}, {"head"}],
            blocked={"head": OUTPUT},
            unit={"blocks.0.attn": 8},
            consumers={"blocks.0.mlp.fc1": {("blocks.0.mlp.fc2", 0, 1)}},
        ),
        ZooCase(
            "attention_fixed_heads", FixedHeadsAttentionNet, (5, 6),
            # A head count written as a constant stops the projections before they meet in q @ k^T.
            groups=[{"embed"}, {"attn.q"}, {"attn.k"}, {"attn.v"}, {"attn.proj"}, {"fc"}, {"head"}],
            blocked={"attn.q": ("constant size",), "attn.k": ("constant size",), "attn.v": ("constant size",),
                     "head": OUTPUT},
            consumers={"embed": {("attn.q", 0, 1), ("attn.k", 0, 1), ("attn.v", 0, 1)},
                       "attn.proj": {("fc", 0, 1)}},
        ),
        ZooCase(
            "multihead_attention", MHANet, (5, 6),
            # The residual stream (embed, the out projection, fc2) is read by the packed q/k/v projection's
            # columns; the 2 heads of 8 are a group of their own: the packed q/k/v rows and the out projection's
            # inputs.
            groups=[{"embed", "mha.out_proj", "fc2"}, {"mha"}, {"fc1"}, {"head"}],
            blocked={"head": OUTPUT},
            unit={"mha": 8},
            followers={"embed": {"norm"}, "fc1": set()},
            consumers={"embed": {("mha", 0, 1), ("fc1", 0, 1), ("head", 0, 1)}, "mha": {("mha.out_proj", 0, 1)},
                       "fc1": {("fc2", 0, 1)}},
        ),
        ZooCase(
            "shared_weights", SharedWeights, (3, 8, 8),
            groups=[{"stem"}, {"a"}, {"b"}, {"mid", "twice"}, {"last"}, {"fc"}],
            # stem feeds a, whose weight is b's: slicing a's inputs would slice b's too. twice's second call
            # reads its own outputs where its first read mid's: one set of channels.
            blocked={"stem": ("shared",), "a": ("shared",), "b": ("shared",), "fc": OUTPUT},
        ),
        ZooCase(
            "shared_parameter", SharedParameter, (3, 8, 8),
            # a and b must keep the same channels, or the shared shift cannot be sliced for both.
            groups=[{"a", "b"}, {"ca", "cb"}, {"fc"}],
            blocked={"fc": OUTPUT},
            followers={"a": {"shift"}},
        ),
        ZooCase(
            "blocked_patterns", BlockedPatterns, (3, 8, 8),
            groups=[{"stem"}, {"ln_conv"}, {"split_conv"}, {"const_conv"}, {"ok_conv"}, {"fc"}],
            blocked={"ln_conv": ("several dims",), "split_conv": ("splits",),
                     "const_conv": ("no prunable layer produces",), "fc": OUTPUT},
            consumers={"stem": {("ln_conv", 0, 1), ("split_conv", 0, 1), ("const_conv", 0, 1), ("ok_conv", 0, 1)},
                       "ok_conv": {("fc", 18, 1)}},
        ),
    ]
    return cases


CASES: dict[str, ZooCase] = {case.name: case for case in _cases()}


def pruned_and_masked(model: nn.Module, x: torch.Tensor, graph: Any, keep: dict[int, list[int]]
                      ) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """The pruned copy's output, the masked model's output (what it must equal) and the pruned copy; checks that
    the output shape is kept."""
    with torch.no_grad():
        original = model(x)
    pruned = copy.deepcopy(model)
    prune_channels(pruned, graph, keep)
    with torch.no_grad():
        out = pruned(x)
    with masked_channels(model, graph, keep), torch.no_grad():
        expected = model(x)
    assert out.shape == original.shape
    return out, expected, pruned


def checked_graph(model: nn.Module, x: torch.Tensor, unprunable: list[str] | None = None) -> ChannelGraph:
    """The model's channel graph, every group of which the check by execution passed (and, given
    ``unprunable``, whose only unprunable groups are those these layers produce)."""
    graph = build_channel_graph(model, x)
    assert verify_groups(model, graph, x) == [], "a group the graph calls prunable broke the check by execution"
    if unprunable is not None:
        assert sorted(p for g in graph.groups if not g.prunable for p in g.producers) == sorted(unprunable)
    return graph


def producer_group(graph: ChannelGraph, producer: str) -> ChannelGroup:
    """The group ``producer`` produces."""
    return next(g for g in graph.groups if producer in g.producers)
