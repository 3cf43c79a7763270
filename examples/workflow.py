"""The whole acps workflow, runnable: search -> create -> fine-tune -> restore -> export.

    python examples/workflow.py [--out DIR]

It trains a small CNN on scikit-learn's bundled digits (no download), and then:

1. searches for a 2x cheaper model with acps's recommended methods (writes prune.cfg and its reports);
2. creates the pruned model (and prune.record);
3. fine-tunes it for one epoch and saves its weights;
4. rebuilds the architecture, replays the record and loads the weights, as a later process would;
5. exports the restored model to ONNX and checks that onnxruntime computes the same outputs.

Needs ``pip install 'acps-core[demo,onnx]'``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import acps_core as acps
from acps_core.cli.demo import DigitsCNN, accuracy, load_digits_tensors, train


def build_model() -> torch.nn.Module:
    """The architecture, as the training code builds it (the weights come from training or a checkpoint)."""
    return DigitsCNN()


def main(out: Path) -> float:
    train_x, train_y, test_x, test_y = load_digits_tensors(seed=0)
    torch.manual_seed(0)
    model = build_model()
    train(model, train_x, train_y, epochs=4)
    print(f"trained: test accuracy {accuracy(model, test_x, test_y):.1%}")

    # 1. search
    (out / "search.cfg").write_text("compress_ratio: 2\nascend_optimized: false\n")
    result = acps.auto_channel_prune_search(model, str(out / "search.cfg"), [train_x[:256], train_y[:256]],
                                            str(out / "prune.cfg"), sensitivity="GroupMagnitudeSensitivity",
                                            search_alg="GlobalRankSearch")
    print(f"searched: {result.achieved_ratio:.2f}x cheaper ({result.cost_unit})")

    # 2. create the pruned model; calibration_data corrects its BatchNorm statistics for the removed channels
    pruned = acps.create_prune_retrain_model(model, train_x[:2], out / "prune.cfg", out / "prune.record",
                                             calibration_data=train_x[:64])
    print(f"pruned: test accuracy before fine-tuning {accuracy(pruned, test_x, test_y):.1%}")

    # 3. fine-tune as usual, then save the weights
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.01, momentum=0.9)
    pruned.train()
    for batch in torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0)).split(64):
        optimizer.zero_grad()
        F.cross_entropy(pruned(train_x[batch]), train_y[batch]).backward()
        optimizer.step()
    pruned.eval()
    torch.save(pruned.state_dict(), out / "pruned_tuned.pth")
    tuned = accuracy(pruned, test_x, test_y)
    print(f"fine-tuned: test accuracy {tuned:.1%}")

    # 4. later, elsewhere: rebuild, replay the record, load the weights
    restored = acps.restore_prune_retrain_model(build_model(), train_x[:2], out / "prune.record",
                                                out / "prune.cfg", out / "pruned_tuned.pth").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(test_x), pruned(test_x))

    # 5. export to ONNX and check it
    import onnxruntime

    path = acps.save_prune_retrain_model(restored, out / "pruned.onnx", test_x[:1], input_names=["image"])
    (onnx_out,) = onnxruntime.InferenceSession(str(path)).run(None, {"image": test_x[:1].numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_out), restored(test_x[:1]), rtol=1e-4, atol=1e-5)
    print(f"exported: {path} computes what the restored model computes")
    return tuned


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the files (default: a temporary one)")
    args = parser.parse_args()
    if args.out is None:
        with tempfile.TemporaryDirectory() as folder:
            main(Path(folder))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        main(args.out)
