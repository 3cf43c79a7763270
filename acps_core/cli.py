"""The ``acps`` command line.

Exit codes: 0 success, 2 bad input (any acps error: config, data, model, plugin), 1 internal error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from acps_core import __version__
from acps_core.errors import AcpsError

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
    print(f"Wrote {out / 'demo_search.cfg'}, {result.output_cfg} and {result.selection_file}.")
    return EXIT_OK


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
