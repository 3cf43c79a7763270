"""The checks on ``auto_channel_prune_search``'s arguments, run before anything is traced or written: the model,
the config files, the output paths, the three methods and the calibration data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from acps_core._util.data import check_calibration, model_device
from acps_core._util.distributed import Communicator
from acps_core._util.paths import check_paths
from acps_core._util.wrappers import unwrap
from acps_core.config.prune_config import load_override_config
from acps_core.config.search_config import load_search_config
from acps_core.config.selection import selection_path
from acps_core.config.settings import AMCTRetrainConfig, SearchSettings
from acps_core.errors import ArgumentError
from acps_core.methods.bases import GainEstimatorBase, SearchChannelBase, SensitivityBase
from acps_core.methods.registry import resolve_method
from acps_core.report.documents import report_paths
from acps_core.report.figure import available as figure_available
from acps_core.report.figure import figure_path

#: The packages whose methods are acps's own (they never write to a parameter, see :func:`is_acps_own`).
OWN_PACKAGES = ("acps_core", "acps_sensitivity_taylor", "acps_search_greedy", "acps_search_knapsack",
                "acps_gain_ascend")


class Call(NamedTuple):
    """A search call's arguments, checked and in the form the search uses.

    Attributes:
        model: the model without its wrappers (``DataParallel``, ``torch.compile``, ...).
        wrappers: the wrappers taken off, outermost first.
        settings: the search config.
        out_path: ``output_cfg`` as given, made absolute (a symbolic link is not followed: the side files go
            beside the link, where they are read again).
        sensitivity, search, gain: the three methods.
        override: the override file, or None.
        calibration: the calibration data on the model's device.
        device: the model's device.
        uniform_widths: repeated blocks keep uniform widths (see :mod:`acps_core.search.ties`).
    """

    model: nn.Module
    wrappers: list[str]
    settings: SearchSettings
    out_path: Path
    sensitivity: SensitivityBase
    search: SearchChannelBase
    gain: GainEstimatorBase
    override: AMCTRetrainConfig | None
    calibration: Any
    device: torch.device
    uniform_widths: bool


def check_arguments(model: Any, config: Any, input_data: Any, output_cfg: Any, sensitivity: Any,
                    search_alg: Any, gain: Any, switches: tuple[Any, Any], comm: Communicator) -> Call:
    """Check a search call's arguments (see :func:`acps_core.auto_channel_prune_search`); ``switches`` are its
    ``figure`` and ``uniform_widths``.

    Raises:
        ArgumentError, ConfigError, OutputPathError, PluginError, DataError: the first argument at fault.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, wrappers = unwrap(model)
    figure, uniform_widths = switches
    for name, value in (("figure", figure), ("uniform_widths", uniform_widths)):
        if not isinstance(value, bool):
            raise ArgumentError(f"{name} must be True or False, got {value!r}")
    if figure and not figure_available():
        raise ArgumentError("figure=True needs matplotlib: pip install 'acps-core[report]' (or leave figure out)")
    if isinstance(model, torch.jit.ScriptModule):
        raise ArgumentError("model is a TorchScript module; pass the original nn.Module (scripted and traced "
                            "modules cannot be pruned)")
    for parameter, value in (("config", config), ("output_cfg", output_cfg)):
        if not isinstance(value, (str, Path)):
            raise ArgumentError(f"{parameter} must be a file path (str or pathlib.Path), got {type(value).__name__}")
    settings = load_search_config(config)
    out_path = Path(output_cfg).absolute()
    if comm.rank == 0:  # only rank 0 writes
        inputs = [("config", config), ("override_prune_cfg in the search config", settings.override_prune_cfg)]
        check_paths(reads=inputs, writes=output_roles(out_path, figure))
    sensitivity_method = resolve_method("sensitivity", sensitivity, "sensitivity")
    search_method = resolve_method("search", search_alg, "search_alg")
    gain_method = resolve_method("gain", gain, "gain")
    override = load_override_config(settings.override_prune_cfg) if settings.override_prune_cfg else None
    device = model_device(model)
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    calibration = check_calibration(input_data, settings.test_iteration, device,
                                    floating.pop() if len(floating) == 1 else None)
    return Call(model, wrappers, settings, out_path, sensitivity_method, search_method, gain_method, override,
                calibration, device, uniform_widths)


def output_roles(out_path: Path, figure: bool) -> list[tuple[str, Path]]:
    """Every file a search writes (or, for the figure without ``figure``, removes), with the role named in
    errors."""
    markdown, json_report = report_paths(out_path)
    return [("output_cfg", out_path), ("output_cfg's selection file", selection_path(out_path)),
            ("output_cfg's Markdown report", markdown), ("output_cfg's JSON report", json_report),
            ("output_cfg's figure" if figure else "output_cfg's figure (removed, as figure=False)",
             figure_path(out_path))]


def is_acps_own(method: object) -> bool:
    """Whether ``method`` is one of acps's own classes (not a subclass defined elsewhere)."""
    return type(method).__module__.split(".")[0] in OWN_PACKAGES

