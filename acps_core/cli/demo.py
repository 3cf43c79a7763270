"""``acps demo``: the whole search on a small CNN trained on real data, in well under a minute on 2 CPU cores.

The data is scikit-learn's bundled handwritten digits (1,797 8x8 images, shipped inside its wheel, so nothing
is downloaded). The demo trains a small conv/BN/ReLU/pool CNN with a flatten-to-linear head, writes a search
config, runs ``auto_channel_prune_search`` at compress_ratio 2 and reports per-layer ratios, cost before and
after, and the test accuracy before any fine-tuning of the model ``create_prune_retrain_model`` makes from the
decision: as AMCT makes it (BatchNorm statistics copied), with ``calibration_data`` and ``reconstruct=False``
(statistics corrected), and with ``calibration_data`` (the layers that read removed channels re-fitted too).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from acps_core._util.atomic import atomic_write_text
from acps_core.errors import AcpsError
from acps_core.prune.calls import create_prune_retrain_model
from acps_core.report.result import SearchResult
from acps_core.search.run import auto_channel_prune_search

logger = logging.getLogger(__name__)

SEARCH_CONFIG = """\
# acps demo search config (protobuf text format of AutoChannelPruneConfig)
compress_ratio: {ratio}
ascend_optimized: {aligned}
max_prune_ratio: 0.8
test_iteration: 4
"""


class DigitsCNN(nn.Module):
    """A small VGG-style chain: three conv/BN/ReLU stages, a max pool, and a two-layer linear head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


@dataclass
class DemoOutcome:
    result: SearchResult
    accuracy_before: float
    #: Test accuracy of the pruned model before fine-tuning, BatchNorm statistics as copied (AMCT's behaviour).
    accuracy_pruned: float
    #: The same with ``calibration_data`` and ``reconstruct=False``: BatchNorm statistics corrected.
    accuracy_corrected: float
    #: The same with ``calibration_data``: the layers that read removed channels re-fitted, statistics corrected.
    accuracy_reconstructed: float
    train_seconds: float
    search_seconds: float


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (train_x, train_y, test_x, test_y): images in [0, 1], a fixed 75/25 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise AcpsError("acps demo needs scikit-learn for its bundled digits data: pip install "
                        "'acps-core[demo]' (or pip install scikit-learn)") from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.75 * len(labels))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(dim=1) == labels).float().mean())


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int = 8, seed: int = 0) -> None:
    """Adam with cross-entropy, batch 64; a few seconds on a CPU."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
    model.eval()


def run_demo(out_dir: str | Path = "acps-demo", compress_ratio: float = 2.0, ascend_optimized: bool = True,
             seed: int = 0, figure: bool = False) -> DemoOutcome:
    """Train the demo CNN, write ``demo_search.cfg``, search, and write ``demo_prune.cfg`` (+ ``.selection``, the
    reports and with ``figure`` the figure) and ``demo_prune.record`` into ``out_dir`` (an existing folder)."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = load_digits_tensors(seed)
    model = DigitsCNN()
    start = time.perf_counter()
    train(model, train_x, train_y, seed=seed)
    train_seconds = time.perf_counter() - start
    accuracy_before = accuracy(model, test_x, test_y)

    config = out / "demo_search.cfg"
    atomic_write_text(config, SEARCH_CONFIG.format(ratio=compress_ratio, aligned=str(ascend_optimized).lower()))
    calibration = [train_x[:256], train_y[:256]]
    start = time.perf_counter()
    result = auto_channel_prune_search(model, config, calibration, out / "demo_prune.cfg",
                                       sensitivity="TaylorLossSensitivity", search_alg="GreedySearch", figure=figure)
    search_seconds = time.perf_counter() - start

    record = out / "demo_prune.record"
    pruned = create_prune_retrain_model(model, train_x[:2], out / "demo_prune.cfg", record)
    corrected = create_prune_retrain_model(model, train_x[:2], out / "demo_prune.cfg", record,
                                           calibration_data=train_x[:64], reconstruct=False)
    reconstructed = create_prune_retrain_model(model, train_x[:2], out / "demo_prune.cfg", record,
                                               calibration_data=train_x[:64])
    return DemoOutcome(result, accuracy_before, accuracy(pruned, test_x, test_y), accuracy(corrected, test_x, test_y),
                       accuracy(reconstructed, test_x, test_y), train_seconds, search_seconds)
