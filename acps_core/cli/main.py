"""The ``acps`` command line: the parser, the entry point and the exit codes.

Exit codes: 0 success, 2 bad input (any acps error: config, data, model, plugin), 1 internal error, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

from acps_core._version import __version__
from acps_core.cli.commands import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    NORM_SAMPLES,
    cmd_demo,
    cmd_explain,
    cmd_export,
    cmd_plugins,
    cmd_prune,
    cmd_restore,
    cmd_search,
)
from acps_core.errors import AcpsError

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acps", description="Automatic channel pruning search for PyTorch (AMCT-compatible).",
        epilog="Exit codes: 0 success, 2 bad input, 1 internal error.")
    parser.add_argument("--version", action="version", version=f"acps {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--quiet", action="store_true", help="only print errors (no progress, no warnings)")
    # The same two options after the command (acps search ... --quiet); SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only print errors (no progress, no warnings)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", parents=[common],
                               help="train a small CNN on bundled digits data and search it",
                               description="Train a small CNN on scikit-learn's bundled digits, run the search "
                                           "at compress_ratio 2 and print per-layer ratios and cost.")
    demo.add_argument("--out", default="acps-demo",
                      help="folder for the files the demo writes, created if missing (default: acps-demo)")
    demo.add_argument("--ratio", type=float, default=2.0, help="compress_ratio to search for (default 2)")
    demo.add_argument("--no-align", action="store_true", help="ascend_optimized: false (no 16-channel steps)")
    demo.set_defaults(func=cmd_demo)

    explain = commands.add_parser(
        "explain", parents=[common], help="say which Conv/Linear layers can be pruned, in which group, and why not",
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
    explain.add_argument("--weights", metavar="TRAINED.pth",
                         help="load this state dict into the model --model builds (torch.save(model.state_dict(), "
                              "path); loaded with weights_only=True)")
    explain.add_argument("--allow-pickle", action="store_true",
                         help="allow loading a .pt model file: unpickling runs any code the file contains, so "
                              "only for files you trust")
    explain.set_defaults(func=cmd_explain)

    model_help = ("package.module:factory (imported, then called with no arguments; the current folder is "
                  "importable) or a .pt file holding a whole pickled model (needs --allow-pickle)")
    data_help = ("calibration data saved with torch.save: [input, labels] (a list of two tensors) or, where labels "
                 "are not needed, the input tensor; loaded with weights_only=True, so no code in it runs")
    pickle_help = "allow loading a .pt model file: unpickling runs any code it contains, so only for files you trust"
    methods = "acps plugins lists the installed names and their options; with options: Name(option=value, ...)"
    weights_help = ("the trained weights: a state dict (torch.save(model.state_dict(), path)) loaded into the model "
                    "--model builds, with weights_only=True; without it a factory's own weights are used, so give "
                    "the same file to search and prune")

    search = commands.add_parser(
        "search", parents=[common], help="search how many channels each layer keeps; write the channel-prune config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run auto_channel_prune_search: write OUTPUT (the channel-prune config), OUTPUT.selection\n"
                    "(the channels chosen) and OUTPUT.report.md / .report.json, and print the per-layer decision.",
        epilog="example:\n  acps search --model mypkg.models:resnet18 --data calib.pt --config search.cfg "
               "--output prune.cfg\n\nExit codes: 0 success, 2 bad input, 1 internal error.")
    search.add_argument("--model", required=True, metavar="SPEC", help=model_help)
    search.add_argument("--weights", metavar="TRAINED.pth", help=weights_help)
    search.add_argument("--data", required=True, metavar="DATA.pt", help=data_help)
    search.add_argument("--config", required=True, metavar="SEARCH.cfg",
                        help="the search config (AutoChannelPruneConfig, protobuf text format)")
    search.add_argument("--output", required=True, metavar="PRUNE.cfg", help="the channel-prune config to write")
    search.add_argument("--sensitivity", default="TaylorLossSensitivity",
                        help=f"sensitivity method (default: the reference's TaylorLossSensitivity; {methods}, e.g. "
                             "\"GroupTaylorSensitivity(terms=all)\")")
    search.add_argument("--search", default="GreedySearch",
                        help=f"search method (default: the reference's GreedySearch; {methods})")
    search.add_argument("--gain", default="BitComplexity",
                        help=f"cost model (default: the reference's BitComplexity; {methods}, e.g. "
                             "\"AscendLatency(chip=Ascend310, batch=8)\")")
    search.add_argument("--uniform-widths", action="store_true",
                        help="keep the widths of repeated blocks uniform (one count per role in every block)")
    search.add_argument("--allow-pickle", action="store_true", help=pickle_help)
    search.set_defaults(func=cmd_search)

    prune = commands.add_parser(
        "prune", parents=[common], help="prune a model as a channel-prune config says (create_prune_retrain_model)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Apply PRUNE.cfg to the model: remove the channels the search chose (or, for a config\n"
                    "written by hand, those with the smallest filter norms), write the record of what was\n"
                    "removed, and optionally save the pruned model.",
        epilog="example:\n  acps prune --model mypkg.models:resnet18 --data calib.pt --config prune.cfg "
               "--record prune.record --save pruned.pt\n\nExit codes: 0 success, 2 bad input, 1 internal error.")
    prune.add_argument("--model", required=True, metavar="SPEC", help=model_help)
    prune.add_argument("--weights", metavar="TRAINED.pth", help=weights_help)
    prune.add_argument("--data", required=True, metavar="DATA.pt", help=data_help)
    prune.add_argument("--config", required=True, metavar="PRUNE.cfg", help="the channel-prune config")
    prune.add_argument("--record", required=True, metavar="PRUNE.record", help="the record file to write")
    prune.add_argument("--save", metavar="PRUNED.pt",
                       help="also save the whole pruned model (torch.save), written with the record as one set")
    prune.add_argument("--calibrate", "--correct-norms", dest="calibrate", action="store_true",
                       help=f"pass the first {NORM_SAMPLES} --data samples (real ones) as calibration_data: the "
                            "layers that read removed channels are re-fitted and the BatchNorm running statistics "
                            "corrected, so the pruned model is usable before fine-tuning")
    prune.add_argument("--no-reconstruct", action="store_true",
                       help="with --calibrate, only correct the BatchNorm statistics (reconstruct=False)")
    prune.add_argument("--allow-pickle", action="store_true", help=pickle_help)
    prune.set_defaults(func=cmd_prune)

    for name, summary in (("restore", "replay a record onto a freshly built model and load fine-tuned weights"),
                          ("export", "replay a record (and fine-tuned weights) and export the model to ONNX")):
        command = commands.add_parser(
            name, parents=[common], help=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=summary[0].upper() + summary[1:] + " (restore_prune_retrain_model"
                        + (", then save_prune_retrain_model; needs the onnx extra)." if name == "export" else ")."),
            epilog=("example:\n  acps " + name + " --model mypkg.models:resnet18 --data calib.pt --config prune.cfg "
                    "--record prune.record --weights tuned.pth "
                    + ("--output model.onnx" if name == "export" else "--save restored.pt")
                    + "\n\nExit codes: 0 success, 2 bad input, 1 internal error."))
        command.add_argument("--model", required=True, metavar="SPEC", help=model_help)
        command.add_argument("--data", required=True, metavar="DATA.pt", help=data_help)
        command.add_argument("--config", required=True, metavar="PRUNE.cfg", help="the channel-prune config used")
        command.add_argument("--record", required=True, metavar="PRUNE.record",
                             help="the record acps prune (create_prune_retrain_model) wrote")
        command.add_argument("--weights", metavar="TUNED.pth",
                             help="a checkpoint of the pruned, fine-tuned model (a state dict; loaded with "
                                  "weights_only=True); without it the pruned model keeps the original weights")
        command.add_argument("--state-dict-name", metavar="KEY",
                             help="the key of the state dict inside the checkpoint, if it is nested")
        command.add_argument("--base-weights", metavar="TRAINED.pth",
                             help="the trained, unpruned weights (a state dict) loaded into the model --model builds "
                                  "before the record is replayed; needed without --weights when the factory does "
                                  "not build the trained model itself")
        if name == "export":
            command.add_argument("--output", required=True, metavar="MODEL.onnx", help="the ONNX file to write")
        else:
            command.add_argument("--save", metavar="RESTORED.pt", help="save the whole restored model (torch.save)")
        command.add_argument("--allow-pickle", action="store_true", help=pickle_help)
        command.set_defaults(func=cmd_export if name == "export" else cmd_restore)

    plugins = commands.add_parser("plugins", parents=[common],
                                  help="list installed methods and plugins that failed to load",
                                  description="List every sensitivity, search and gain method installed "
                                              "(kind, name, class, distribution, version), the options each "
                                              "takes (name, type, default) and plugins that failed to load, "
                                              "with why.")
    plugins.set_defaults(func=cmd_plugins)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Warnings as one readable line, like the errors (not Python's file:line form)."""
    print(f"acps: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING,
                        format="acps: %(levelname)s: %(message)s")
    if args.quiet:
        os.environ["ACPS_PROGRESS"] = "0"  # no progress bars either
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        if args.quiet:
            warnings.simplefilter("ignore")
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except AcpsError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"acps: error: {exc}", file=sys.stderr)
        if not args.debug:
            print("hint: run with --debug for the full traceback", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("acps: interrupted; every output is as it was before the command, or complete", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(f"acps: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("hint: run with --debug for the full traceback, and report it" if not args.debug else
              "hint: report it, with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
