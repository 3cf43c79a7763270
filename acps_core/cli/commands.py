"""What each ``acps`` command does, once its arguments are parsed (:mod:`acps_core.cli.main` parses them).

Every command checks all the files it reads and writes before any work, builds the model the spec names (with its
``--weights``), and calls the public functions; an :class:`~acps_core.errors.AcpsError` becomes exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from acps_core.errors import ArgumentError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
#: Ctrl-C, as shells count it (128 + SIGINT).
EXIT_INTERRUPTED = 130


def cmd_demo(args: argparse.Namespace) -> int:
    from acps_core.cli.demo import run_demo
    from acps_core.report.figure import available

    if not (math.isfinite(args.ratio) and args.ratio > 1):
        raise ArgumentError(f"--ratio {args.ratio:g} is not a compress ratio; give a finite number greater than 1, "
                            "e.g. 2 (the pruned model costs half as much)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--out {out} exists and is not a folder; give a folder for the demo's files")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(f"--out {out}: cannot create the folder ({exc.strerror or exc}); give another "
                            "folder") from exc
    figure = available()
    outcome = run_demo(out, compress_ratio=args.ratio, ascend_optimized=not args.no_align, figure=figure)
    result = outcome.result
    if args.quiet:
        return EXIT_OK
    print(f"Trained a small CNN on scikit-learn's digits in {outcome.train_seconds:.1f} s "
          f"(test accuracy {outcome.accuracy_before:.1%}).")
    print(f"Searched at compress_ratio {args.ratio:g} in {outcome.search_seconds:.2f} s "
          f"({result.methods['sensitivity']} + {result.methods['search']} + {result.methods['gain']}):\n")
    print(result.summary())
    print(f"\nTest accuracy of the pruned model before fine-tuning: {outcome.accuracy_pruned:.1%} with the "
          f"BatchNorm statistics copied (as AMCT does); with create_prune_retrain_model(..., calibration_data=64 "
          f"images): {outcome.accuracy_corrected:.1%} with the statistics corrected for the removed channels "
          f"(reconstruct=False), {outcome.accuracy_reconstructed:.1%} with the layers that read them re-fitted "
          "too (the default).")
    print(f"Wrote {out / 'demo_search.cfg'}, {result.output_cfg}, {result.selection_file}, "
          f"{out / 'demo_prune.record'} and the reports "
          f"{result.output_cfg}.report.md / .report.json{' / .report.png' if figure else ''}.")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from acps_core.report.documents import left_alone_text, read_report

    if args.report is not None:
        given = [flag for flag, value in (("--input-shape", args.input_shape), ("--data", args.data),
                                          ("--allow-pickle", args.allow_pickle), ("--weights", args.weights))
                 if value]
        if given:
            raise ArgumentError(f"--report reads a saved report; {', '.join(given)} only apply with --model")
        print(left_alone_text(read_report(args.report)), end="")
        return EXIT_OK
    return _explain_model(args)


#: ``acps explain --input-shape`` refuses a random input larger than this many bytes (as float32).
MAX_RANDOM_INPUT_BYTES = 4 << 30


def _explain_model(args: argparse.Namespace) -> int:
    import torch

    from acps_core._util.data import model_device
    from acps_core.cli.loading import load_tensor
    from acps_core.graph.build import build_channel_graph
    from acps_core.report.documents import explain_text

    shape = _parse_shape(args.input_shape) if args.input_shape is not None else None
    # The input comes first: it is cheap to check, while building the model may take long.
    if args.data is not None:
        data = load_tensor(args.data)
        if shape is not None and tuple(data.shape) != shape:
            raise ArgumentError(f"--data {args.data} holds a tensor of shape {list(data.shape)} but --input-shape "
                                f"says {list(shape)}; drop --input-shape or make them agree")
    elif shape is not None:
        data = _random_input(shape, args.input_shape, torch)
    else:
        raise ArgumentError("give --input-shape (e.g. 1,3,224,224) for a random input, or --data FILE.pt")
    model = _build_model(args)
    model.eval()
    graph = build_channel_graph(model, data.to(model_device(model)))
    print(f"Conv/Linear layers of {args.model}, traced on an input of shape {list(data.shape)}:\n")
    print(explain_text(graph), end="")
    return EXIT_OK


def _random_input(shape: tuple[int, ...], text: str, torch: Any) -> Any:
    """A random float32 input of ``shape``, refused when it would not fit in memory."""
    values = math.prod(shape)
    if values * 4 > MAX_RANDOM_INPUT_BYTES:
        raise ArgumentError(f"--input-shape {text} is {values:,} values ({values * 4 / 2 ** 30:.1f} GiB as float32), "
                            f"over the {MAX_RANDOM_INPUT_BYTES >> 30} GiB acps allocates for a random input; give "
                            "the shape of one real input, e.g. 1,3,224,224")
    try:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0))
    except (RuntimeError, MemoryError) as exc:
        raise ArgumentError(f"--input-shape {text}: a random input of this shape does not fit in memory "
                            f"({type(exc).__name__}); give a smaller shape, e.g. 1,3,224,224") from exc


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


def _build_model(args: argparse.Namespace, weights: str | None = "weights") -> Any:
    """The model ``--model`` names, with the state dict of the option ``weights`` (``--weights`` or
    ``--base-weights``) loaded when given."""
    from acps_core._util.checkpoints import load_weights
    from acps_core.cli.loading import load_model

    # Like `python -m`, a model module in the current folder can be named without installing it.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    model = load_model(args.model, allow_pickle=args.allow_pickle)
    path = getattr(args, weights, None) if weights else None
    if weights and path is not None:
        load_weights(model, path, "--" + weights.replace("_", "-"))
    return model


def _model_file(args: argparse.Namespace) -> str | None:
    """``--model`` when it names a file (read), else None (a factory)."""
    from acps_core.cli.loading import MODEL_FILE_SUFFIXES

    spec = args.model
    return spec if spec is not None and (Path(spec).is_file() or spec.endswith(MODEL_FILE_SUFFIXES)) else None


def _factory_source(args: argparse.Namespace) -> str | None:
    """The source file of the module that ``--model package.module:factory`` names (None when it has none, or
    cannot be found without running it)."""
    import importlib.util

    spec = args.model
    if spec is None or _model_file(args) is not None or ":" not in spec:
        return None
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(spec.rpartition(":")[0])
    except (ImportError, ValueError, AttributeError):
        return None
    origin = getattr(found, "origin", None)
    return origin if isinstance(origin, str) and os.path.isfile(origin) else None


def _inputs(args: argparse.Namespace, *extra: tuple[str, Any]) -> list[tuple[str, Any]]:
    """The files a command reads, by option (the model's own source file among them)."""
    return [("--model", _model_file(args)), ("--model's source file", _factory_source(args)), ("--data", args.data),
            ("--weights", getattr(args, "weights", None)), ("--base-weights", getattr(args, "base_weights", None)),
            *extra]


def _model_and_data(args: argparse.Namespace, need_labels: bool, weights: str | None = "weights"
                    ) -> tuple[Any, Any]:
    """The model the spec builds (with its weights, eval mode) and the calibration data from --data, on the model's
    device."""
    import torch

    from acps_core._util.data import model_device, to_device
    from acps_core._util.tensors import tensors_in
    from acps_core.cli.loading import load_data
    from acps_core.errors import DataError

    data = load_data(args.data)  # cheap to check before building the model
    if need_labels and not isinstance(data, list):
        raise ArgumentError(f"--data {args.data} holds only an input tensor; the search needs [input, labels]: "
                            "torch.save([images, labels], path)")
    model = _build_model(args, weights)
    model.eval()
    device = model_device(model)
    if isinstance(data, list):
        inputs, labels = data
        if not tensors_in(inputs) or not isinstance(labels, torch.Tensor):
            raise DataError(f"--data {args.data} must hold [inputs, labels]: inputs a tensor (or a tuple of tensors) "
                            f"and labels a tensor; it holds [{type(inputs).__name__}, {type(labels).__name__}]")
        inputs = to_device(inputs, device)
        return model, [inputs, labels.to(device)] if need_labels else inputs
    return model, data.to(device)


def cmd_search(args: argparse.Namespace) -> int:
    import acps_core as acps
    from acps_core._util.paths import check_paths
    from acps_core.config.selection import selection_path
    from acps_core.methods.registry import resolve_method
    from acps_core.report.documents import report_paths
    from acps_core.report.figure import available, figure_path

    figure = available()
    output = Path(args.output)
    markdown, json_report = report_paths(output)
    check_paths(reads=_inputs(args, ("--config", args.config)),
                writes=[("--output", output), ("--output's selection file", selection_path(output)),
                        ("--output's Markdown report", markdown), ("--output's JSON report", json_report),
                        ("--output's figure", figure_path(output))])
    # The methods and their options are checked before the model is built, which may take long.
    sensitivity = resolve_method("sensitivity", args.sensitivity, "--sensitivity")
    search = resolve_method("search", args.search, "--search")
    gain = resolve_method("gain", args.gain, "--gain")
    model, data = _model_and_data(args, need_labels=True)
    result = acps.auto_channel_prune_search(model, args.config, data, args.output, sensitivity=sensitivity,
                                            search_alg=search, gain=gain, figure=figure,
                                            uniform_widths=args.uniform_widths)
    if not args.quiet:
        print(result.summary())
        print(f"\nWrote {result.output_cfg}, {result.selection_file} and the reports {result.output_cfg}.report.md "
              f"/ .report.json{' / .report.png' if figure else ''}.")
        if not figure:
            print("(pip install 'acps-core[report]' for the report's figure)")
    return EXIT_OK


def _saved_model(model: Any) -> bytes:
    """``torch.save`` of the whole (pruned) model; loading it back needs --allow-pickle."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def _say_saved(path: str | None, quiet: bool) -> None:
    if path is not None and not quiet:
        print(f"Saved the pruned model to {path} (torch.save of the whole model; load it with "
              "--model FILE --allow-pickle, or torch.load(..., weights_only=False) if you trust it).")


#: ``acps prune --calibrate`` passes at most this many of the --data samples as ``calibration_data``.
NORM_SAMPLES = 256


def cmd_prune(args: argparse.Namespace) -> int:
    from acps_core._util.atomic import atomic_write_many
    from acps_core._util.paths import check_paths
    from acps_core.config.selection import selection_path
    from acps_core.graph.trace import trace_sample
    from acps_core.prune.calls import pruned_with_record

    if args.no_reconstruct and not args.calibrate:
        raise ArgumentError("--no-reconstruct only applies with --calibrate: add --calibrate, or drop "
                            "--no-reconstruct")
    # Every output is checked before anything runs, so a bad --save cannot fail after the record is written.
    check_paths(reads=_inputs(args, ("--config", args.config),
                              ("--config's selection file", selection_path(args.config))),
                writes=[("--record", args.record), ("--save", args.save)])
    model, data = _model_and_data(args, need_labels=False)
    calibration = trace_sample(data, NORM_SAMPLES) if args.calibrate else None
    pruned, record_path, record_text = pruned_with_record(
        model, data, args.config, args.record, calibration_data=calibration, reconstruct=not args.no_reconstruct,
        extra_outputs=[("save", args.save)])
    outputs: dict[Any, str | bytes | None] = {record_path: record_text}
    if args.save is not None:
        outputs[args.save] = _saved_model(pruned)
    atomic_write_many(outputs)  # the record and the saved model: one set
    if not args.quiet:
        before, after = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
        print(f"Pruned {args.model}: {before:,} -> {after:,} parameters; wrote the record {args.record}.")
    _say_saved(args.save, args.quiet)
    return EXIT_OK


def _restored(args: argparse.Namespace) -> tuple[Any, Any]:
    import acps_core as acps

    model, data = _model_and_data(args, need_labels=False, weights="base_weights")
    if args.weights is None:  # the pruned, not yet fine-tuned model: replay the record without a checkpoint
        from acps_core.config.prune_config import parse_prune_config
        from acps_core.prune.calls import replay_prune_record

        parse_prune_config(args.config)
        _warn_if_other_weights(model, args.record)
        restored = replay_prune_record(model, data, args.record)
    else:
        restored = acps.restore_prune_retrain_model(model, data, args.record, args.config, args.weights,
                                                    state_dict_name=args.state_dict_name)
    return restored, data


def _warn_if_other_weights(model: Any, record: str) -> None:
    """Without --weights the pruned model keeps the factory's weights: warn when they are not those pruned."""
    from acps_core.config.selection import read_selection, weights_fingerprint

    recorded = read_selection(record, "record file").header.fingerprint
    if recorded is not None and recorded != weights_fingerprint(model, like=recorded):
        warnings.warn(f"the model's weights differ from those {record} was made from, and no --weights checkpoint "
                      "replaces them: pass --base-weights TRAINED.pth (the weights that were pruned) or --weights "
                      "TUNED.pth (the fine-tuned pruned model)", UserWarning, stacklevel=2)


def cmd_restore(args: argparse.Namespace) -> int:
    from acps_core._util.atomic import atomic_write_bytes
    from acps_core._util.paths import check_paths

    check_paths(reads=_inputs(args, ("--config", args.config), ("--record", args.record)),
                writes=[("--save", args.save)])
    restored, _ = _restored(args)
    if not args.quiet:
        print(f"Restored {args.model} from {args.record}" + (f" with the weights of {args.weights}." if args.weights
                                                             else "."))
    if args.save is not None:
        atomic_write_bytes(args.save, _saved_model(restored), "--save")
    _say_saved(args.save, args.quiet)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    import acps_core as acps
    from acps_core._util.paths import check_paths
    from acps_core.prune.onnx import onnx_path

    output = onnx_path(args.output)
    role = "--output" if os.fspath(output) == args.output else "--output (with .onnx added)"
    check_paths(reads=_inputs(args, ("--config", args.config), ("--record", args.record)), writes=[(role, output)])
    restored, data = _restored(args)
    # The batch dimension stays free: the exported model takes any batch size.
    path = acps.save_prune_retrain_model(restored.eval(), args.output, data, input_names=["input"],
                                         output_names=["output"],
                                         dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    if not args.quiet:
        print(f"Exported the pruned model to {path} (ONNX).")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from acps_core.methods.registry import format_plugins_table, get_registry

    print(format_plugins_table(get_registry()), end="")
    return EXIT_OK
