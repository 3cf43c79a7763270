"""The ``acps`` command line.

Exit codes: 0 success, 2 bad input (any acps error: config, data, model, plugin), 1 internal error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from acps_core import __version__
from acps_core.errors import AcpsError, ArgumentError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


def _cmd_demo(args: argparse.Namespace) -> int:
    from acps_core.demo import run_demo

    out = Path(args.out)
    if not out.is_dir():
        raise AcpsError(f"--out {out} is not an existing folder; create it first")
    outcome = run_demo(out, compress_ratio=args.ratio, ascend_optimized=not args.no_align)
    result = outcome.result
    print(f"Trained a small CNN on scikit-learn's digits in {outcome.train_seconds:.1f} s "
          f"(test accuracy {outcome.accuracy_before:.1%}).")
    print(f"Searched at compress_ratio {args.ratio:g} in {outcome.search_seconds:.2f} s "
          f"({result.methods['sensitivity']} + {result.methods['search']} + {result.methods['gain']}):\n")
    print(result.summary())
    print(f"\nTest accuracy with the removed channels masked out (pruned, before fine-tuning): "
          f"{outcome.accuracy_masked:.1%}")
    print(f"Wrote {out / 'demo_search.cfg'}, {result.output_cfg}, {result.selection_file} and the reports "
          f"{result.output_cfg}.report.md / .report.json.")
    return EXIT_OK


def _cmd_explain(args: argparse.Namespace) -> int:
    from acps_core.report import left_alone_text, read_report

    if args.report is not None:
        given = [flag for flag, value in (("--input-shape", args.input_shape), ("--data", args.data),
                                          ("--allow-pickle", args.allow_pickle)) if value]
        if given:
            raise ArgumentError(f"--report reads a saved report; {', '.join(given)} only apply with --model")
        print(left_alone_text(read_report(args.report)), end="")
        return EXIT_OK
    return _explain_model(args)


def _explain_model(args: argparse.Namespace) -> int:
    import torch

    from acps_core.data import model_device
    from acps_core.graph import build_channel_graph
    from acps_core.loading import load_model, load_tensor
    from acps_core.report import explain_text

    shape = _parse_shape(args.input_shape) if args.input_shape is not None else None
    # The input comes first: it is cheap to check, while building the model may take long.
    if args.data is not None:
        data = load_tensor(args.data)
        if shape is not None and tuple(data.shape) != shape:
            raise ArgumentError(f"--data {args.data} holds a tensor of shape {list(data.shape)} but --input-shape "
                                f"says {list(shape)}; drop --input-shape or make them agree")
    elif shape is not None:
        data = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    else:
        raise ArgumentError("give --input-shape (e.g. 1,3,224,224) for a random input, or --data FILE.pt")
    # Like `python -m`, a model module in the current folder can be named without installing it.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    model = load_model(args.model, allow_pickle=args.allow_pickle)
    model.eval()
    graph = build_channel_graph(model, data.to(model_device(model)))
    print(f"Conv/Linear layers of {args.model}, traced on an input of shape {list(data.shape)}:\n")
    print(explain_text(graph), end="")
    return EXIT_OK


def _parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; every size a positive integer."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise ArgumentError(f"--input-shape {text!r} is not a shape; give positive integers separated by commas, "
                            "batch first, e.g. 1,3,224,224")
    return shape


def _cmd_plugins(args: argparse.Namespace) -> int:
    from acps_core.registry import format_plugins_table, get_registry

    print(format_plugins_table(get_registry()), end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acps", description="Automatic channel pruning search for PyTorch (AMCT-compatible).",
        epilog="Exit codes: 0 success, 2 bad input, 1 internal error.")
    parser.add_argument("--version", action="version", version=f"acps {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--quiet", action="store_true", help="only print errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="train a small CNN on bundled digits data and search it",
                               description="Train a small CNN on scikit-learn's bundled digits, run the search "
                                           "at compress_ratio 2 and print per-layer ratios and cost.")
    demo.add_argument("--out", default=".", help="folder for the configs the demo writes (default: current)")
    demo.add_argument("--ratio", type=float, default=2.0, help="compress_ratio to search for (default 2)")
    demo.add_argument("--no-align", action="store_true", help="ascend_optimized: false (no 16-channel steps)")
    demo.set_defaults(func=_cmd_demo)

    explain = commands.add_parser(
        "explain", help="say which Conv/Linear layers can be pruned, in which group, and why not",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Trace a model on one input and list every Conv/Linear layer: prunable or left alone,\n"
                    "its channel group (channels pruned together), and for a layer left alone the exact\n"
                    "reason. With --report, print the layers a saved search report left alone, with why.",
        epilog="examples:\n"
               "  acps explain --model torchvision.models:resnet18 --input-shape 1,3,224,224\n"
               "  acps explain --model mynet.pt --allow-pickle --data calibration.pt\n"
               "  acps explain --report prune.cfg.report.json\n\n"
               "Exit codes: 0 success, 2 bad input, 1 internal error.")
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="SPEC",
                        help="package.module:factory (imported, then called with no arguments to build the model; "
                             "the current folder is importable) or a .pt file holding a whole pickled model "
                             "(torch.save(model, path); needs --allow-pickle)")
    source.add_argument("--report", metavar="PATH.json",
                        help="instead of tracing a model, print the layers left alone in this JSON report "
                             "(<output_cfg>.report.json, written by a search)")
    explain.add_argument("--input-shape", metavar="N,C,H,W",
                         help="shape of a random input to trace with, batch first, e.g. 1,3,224,224 "
                              "(needed unless --data is given)")
    explain.add_argument("--data", metavar="FILE.pt",
                         help="trace with this tensor instead (torch.save(tensor, path); loaded with "
                              "weights_only=True, so no code in it runs)")
    explain.add_argument("--allow-pickle", action="store_true",
                         help="allow loading a .pt model file: unpickling runs any code the file contains, so "
                              "only for files you trust")
    explain.set_defaults(func=_cmd_explain)

    plugins = commands.add_parser("plugins", help="list installed methods and plugins that failed to load",
                                  description="List every sensitivity, search and gain method installed "
                                              "(kind, name, class, distribution, version) and plugins that "
                                              "failed to load, with why.")
    plugins.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING,
                        format="acps: %(levelname)s: %(message)s")
    try:
        return int(args.func(args))
    except AcpsError as exc:
        if args.debug:
            raise
        print(f"acps: error: {exc}", file=sys.stderr)
        print("hint: run with --debug for the full traceback", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        if args.debug:
            raise
        print(f"acps: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("hint: run with --debug for the full traceback, and report it", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
