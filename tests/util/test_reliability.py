"""The reliability battery: every bad input to the public calls, one case per row.

Each row asserts the error type (always an ``AcpsError`` subclass, or the user's own ``KeyboardInterrupt``), the
words that help, that the model is exactly as before (``ModelSnapshot``: parameters, buffers, modes,
requires_grad, grads, hooks, devices, dtypes), that no output file was created or changed, and that no temporary
file is left. A pre-existing ``prune.cfg`` stands in every folder: it must survive every failure bit for bit.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import acps_core as acps
from acps_core.errors import (
    AcpsError,
    ArgumentError,
    ConfigError,
    DataError,
    GraphError,
    OutputPathError,
    PluginError,
    SearchError,
)
from acps_sensitivity_taylor import TaylorLossSensitivity
from testing.models import ConvChain, randomize_norms
from tests.support.model_snapshot import ModelSnapshot

OLD_OUTPUT = "# the user's previous channel-prune config\n"

# torch.jit is deprecated, but users still hand acps scripted and traced modules.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def chain() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(ConvChain(size=8))


def data(batch: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, 8, 8, generator=generator), torch.randint(0, 10, (batch,), generator=generator)]


class RaisesInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom in forward")


class OnlyOutputLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class NaNGradient(nn.Module):
    """sqrt(0) in the forward pass: a finite loss with infinite gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.sqrt(self.conv(x) * 0).mean((2, 3)))


class InterruptedInForward(ConvChain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt


class SensitivityRaises(acps.SensitivityBase):
    def get_sensitivity(self, search_records):
        raise RuntimeError("plugin exploded")


class SensitivityWrongShape(acps.SensitivityBase):
    def get_sensitivity(self, search_records):
        for record in search_records:
            record.sensitivity = torch.ones(3)


class SensitivityNaN(acps.SensitivityBase):
    def get_sensitivity(self, search_records):
        for record in search_records:
            record.sensitivity = torch.full((record.channels,), float("nan"))


class SensitivityInterrupted(acps.SensitivityBase):
    """A plugin that hangs until the user presses Ctrl-C."""

    def get_sensitivity(self, search_records):
        raise KeyboardInterrupt


class SearchRaises(acps.SearchChannelBase):
    def channel_prune_search(self, graph_info, search_records, prune_config):
        raise ZeroDivisionError("search exploded")


class SearchWrongShape(acps.SearchChannelBase):
    def channel_prune_search(self, graph_info, search_records, prune_config):
        return {record.producers[0]: [1, 0] for record in search_records}


class SearchInterrupted(acps.SearchChannelBase):
    def channel_prune_search(self, graph_info, search_records, prune_config):
        raise KeyboardInterrupt


class GainRaises(acps.GainEstimatorBase):
    def layer_cost(self, layer, in_channels, out_channels):
        raise RuntimeError("no cost for you")


@dataclass
class Case:
    """One row: what to change from a good call, and what must come out."""

    error: type[BaseException]
    words: tuple[str, ...]
    config: str | bytes = "compress_ratio: 2\nascend_optimized: false\n"
    model: Callable[[], Any] = chain
    input_data: Callable[[], Any] = data
    output: Callable[[Path], Any] = lambda folder: folder / "prune.cfg"
    kwargs: Callable[[], dict[str, Any]] = dict
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    files: dict[str, str | bytes] = field(default_factory=dict)


def interrupt_second_replace(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    real = os.replace
    calls = []

    def replace(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(source, target)

    monkeypatch.setattr(os, "replace", replace)


def unwritable_folder(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """A read-only folder (chmod does not stop root, so its refusal is simulated where acps creates files)."""
    real = os.open

    nameless = getattr(os, "O_TMPFILE", 0)

    def refuse(path, flags, *args):
        creates = flags & os.O_CREAT or (nameless and flags & nameless == nameless)
        if str(path).startswith(str(folder / "readonly")) and creates:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *args)

    (folder / "readonly").mkdir()
    monkeypatch.setattr(os, "open", refuse)


SEARCH_CASES: dict[str, Case] = {
    # the search config file
    "config: missing colon": Case(ConfigError, ("search.cfg:1:16", "syntax error", 'Expected ":"'),
                                  "compress_ratio 2\n"),
    "config: unterminated string": Case(ConfigError, ("search.cfg:2:21", "missing ending quote"),
                                        'compress_ratio: 2\noverride_prune_cfg: "abc\n'),
    "config: unclosed message": Case(ConfigError, ("search.cfg:2:1", 'unknown field "foo"', "valid fields"),
                                     "compress_ratio: 2\nfoo {\n"),
    "config: compress_ratio not a number": Case(ConfigError, ("search.cfg:1:17", "Couldn't parse float"),
                                                'compress_ratio: "two"\n'),
    "config: ascend_optimized not a bool": Case(ConfigError, ("search.cfg:2:19", 'Expected "true" or "false"'),
                                                "compress_ratio: 2\nascend_optimized: 3\n"),
    "config: test_iteration not an integer": Case(ConfigError, ("search.cfg:2:17", "Couldn't parse integer"),
                                                  "compress_ratio: 2\ntest_iteration: 1.5\n"),
    "config: max_prune_ratio not a number": Case(ConfigError, ("search.cfg:2", "max_prune_ratio"),
                                                 "compress_ratio: 2\nmax_prune_ratio: none\n"),
    "config: compress_ratio below 1": Case(ConfigError, ("search.cfg:1", "compress_ratio: 0.5 is not valid",
                                                         "greater than 1"), "compress_ratio: 0.5\n"),
    "config: compress_ratio infinite": Case(ConfigError, ("search.cfg:1", "finite number"), "compress_ratio: inf\n"),
    "config: compress_ratio missing": Case(ConfigError, ("search.cfg", "compress_ratio"), "test_iteration: 2\n"),
    "config: max_prune_ratio above 1": Case(ConfigError, ("search.cfg:2", "max_prune_ratio: 1.5 is out of range",
                                                          "(0, 1]"), "compress_ratio: 2\nmax_prune_ratio: 1.5\n"),
    "config: max_prune_ratio zero": Case(ConfigError, ("search.cfg:2", "max_prune_ratio: 0 is out of range"),
                                         "compress_ratio: 2\nmax_prune_ratio: 0\n"),
    "config: test_iteration zero": Case(ConfigError, ("search.cfg:2", "test_iteration: 0 is out of range",
                                                      ">= 1"), "compress_ratio: 2\ntest_iteration: 0\n"),
    "config: test_iteration negative": Case(ConfigError, ("search.cfg:2", "test_iteration: -3"),
                                            "compress_ratio: 2\ntest_iteration: -3\n"),
    "config: unknown field": Case(ConfigError, ("search.cfg:2:1", 'unknown field "foo"', "compress_ratio,"),
                                  "compress_ratio: 2\nfoo: 1\n"),
    "config: duplicated field": Case(ConfigError, ("search.cfg:2:1", "given twice (lines 1 and 2)"),
                                     "compress_ratio: 2\ncompress_ratio: 3\n"),
    "config: binary file": Case(ConfigError, ("search.cfg:1", "binary data"), bytes(range(256)) * 4),
    "config: huge file": Case(ConfigError, ("over the 16777216 byte limit", "ACPS_MAX_CONFIG_BYTES"),
                              b"#" * (20 * 1024 * 1024)),
    "config: not UTF-8": Case(ConfigError, ("search.cfg:2:6", "not UTF-8", "0xe9"),
                              b"compress_ratio: 2\n# caf\xe9\n"),
    "config: override path not a string": Case(ConfigError, ("search.cfg:2", "override_prune_cfg"),
                                               "compress_ratio: 2\noverride_prune_cfg: 3\n"),
    "config: override is the config itself": Case(
        ConfigError, ("search.cfg:2", "is this search config itself"),
        'compress_ratio: 2\noverride_prune_cfg: "search.cfg"\n'),
    "config: override file missing": Case(
        ConfigError, ("search.cfg:2", "'nope.cfg' does not exist", "resolved against the search config's folder"),
        'compress_ratio: 2\noverride_prune_cfg: "nope.cfg"\n'),
    "config: override names a missing layer": Case(
        ConfigError, ("override.cfg", "nolayer"),
        'compress_ratio: 2\noverride_prune_cfg: "override.cfg"\n',
        files={"override.cfg": 'regular_prune_skip_layers: "nolayer"\n'}),
    # input_data
    "data: not a list": Case(DataError, ("must be a list [data, label]", "got a Tensor"),
                             input_data=lambda: torch.randn(4, 3, 8, 8)),
    "data: wrong length": Case(DataError, ("of length 3",),
                               input_data=lambda: [torch.randn(4, 3, 8, 8), torch.randn(4), torch.randn(4)]),
    "data: label not a tensor": Case(DataError, ("input_data[1] (label) must be a torch.Tensor",),
                                     input_data=lambda: [torch.randn(4, 3, 8, 8), [1, 2, 3, 4]]),
    "data: on the meta device": Case(DataError, ("meta device", "holds no values"),
                                     input_data=lambda: [torch.randn(4, 3, 8, 8, device="meta"),
                                                         torch.randint(0, 10, (4,), device="meta")]),
    "data: mixed devices": Case(DataError, ("mixes devices (cpu, meta)",),
                                input_data=lambda: [torch.randn(4, 3, 8, 8), torch.zeros(4, device="meta")]),
    "data: wrong dtype": Case(DataError, ("torch.float64", "torch.float32", "data.to(torch.float32)"),
                              input_data=lambda: [torch.randn(4, 3, 8, 8, dtype=torch.float64),
                                                  torch.randint(0, 10, (4,))]),
    "data: wrong shape for the model": Case(GraphError, ("raised while tracing", "expected input", "3 channels"),
                                            input_data=lambda: [torch.randn(4, 5, 8, 8),
                                                                torch.randint(0, 10, (4,))]),
    "data: batch smaller than test_iteration": Case(
        DataError, ("test_iteration is 8 but input_data holds only 4 samples",),
        "compress_ratio: 2\ntest_iteration: 8\n", input_data=lambda: data(4)),
    "data: batch sizes differ": Case(DataError, ("same batch size",),
                                     input_data=lambda: [torch.randn(4, 3, 8, 8), torch.randint(0, 10, (3,))]),
    "data: labels do not fit the output": Case(DataError, ("label shape [4, 7]", "output shape [4, 10]"),
                                               input_data=lambda: [torch.randn(4, 3, 8, 8), torch.randn(4, 7)]),
    "data: class labels out of range": Case(DataError, ("outside [0, 10)",),
                                            input_data=lambda: [torch.randn(4, 3, 8, 8), torch.full((4,), 12)]),
    "data: NaN": Case(DataError, ("contains NaN or Inf",),
                      input_data=lambda: [torch.full((4, 3, 8, 8), float("nan")), torch.randint(0, 10, (4,))]),
    "data: Inf in labels": Case(DataError, ("label", "NaN or Inf"),
                                input_data=lambda: [torch.randn(4, 3, 8, 8), torch.full((4, 10), float("inf"))]),
    "data: empty": Case(DataError, ("empty or a scalar", "[0, 3, 8, 8]"),
                        input_data=lambda: [torch.randn(0, 3, 8, 8), torch.randint(0, 10, (0,))]),
    "data: NaN gradients": Case(DataError, ("gradient", "NaN or Inf at conv.weight", "sqrt"),
                                model=NaNGradient, input_data=lambda: [torch.randn(8, 3, 8, 8),
                                                                       torch.randint(0, 10, (8,))]),
    "data: NaN loss": Case(DataError, ("the loss on the calibration data is nan",),
                           kwargs=lambda: {"sensitivity": TaylorLossSensitivity(
                               loss_func=lambda output, label: (output * float("nan")).sum())}),
    # the model
    "model: raises in forward": Case(GraphError, ("raised while tracing", "ValueError: boom in forward"),
                                     model=RaisesInForward),
    "model: no prunable layer": Case(GraphError, ("no prunable channel group", "fc: its channels are the model's "
                                                  "output"), model=OnlyOutputLayer),
    "model: on the meta device": Case(DataError, ("meta device", "load trained weights"),
                                      model=lambda: chain().to("meta")),
    "model: scripted": Case(ArgumentError, ("TorchScript", "pass the original nn.Module"),
                            model=lambda: torch.jit.script(chain().eval())),
    "model: traced": Case(ArgumentError, ("TorchScript",),
                          model=lambda: torch.jit.trace(chain().eval(), torch.randn(2, 3, 8, 8))),
    "model: not a module": Case(ArgumentError, ("model must be a torch.nn.Module",), model=lambda: "resnet"),
    # output paths
    "output: a directory": Case(OutputPathError, ("is a directory, not a file",), output=lambda folder: folder),
    "output: missing folder": Case(OutputPathError, ("does not exist", "nope"),
                                   output=lambda folder: folder / "nope" / "prune.cfg"),
    "output: read-only folder": Case(OutputPathError, ("cannot create files", "readonly"),
                                     output=lambda folder: folder / "readonly" / "prune.cfg",
                                     patch=unwritable_folder),
    # plugins
    "plugin: sensitivity raises": Case(PluginError, ("sensitivity method SensitivityRaises raised RuntimeError",
                                                     "plugin exploded"),
                                       kwargs=lambda: {"sensitivity": SensitivityRaises()}),
    "plugin: sensitivity wrong shape": Case(PluginError, ("SensitivityWrongShape gave 3 scores",),
                                            kwargs=lambda: {"sensitivity": SensitivityWrongShape()}),
    "plugin: sensitivity NaN": Case(PluginError, ("SensitivityNaN gave NaN",),
                                    kwargs=lambda: {"sensitivity": SensitivityNaN()}),
    "plugin: search raises": Case(PluginError, ("search method SearchRaises raised ZeroDivisionError",),
                                  kwargs=lambda: {"search_alg": SearchRaises()}),
    "plugin: search wrong shape": Case(SearchError, ("SearchWrongShape returned a mask for layer conv1 with 2",),
                                       kwargs=lambda: {"search_alg": SearchWrongShape()}),
    "plugin: gain raises": Case(PluginError, ("GainRaises raised RuntimeError", "no cost for you"),
                                kwargs=lambda: {"gain": GainRaises()}),
    "plugin: unknown name": Case(PluginError, ("NoSuchMethod", "TaylorLossSensitivity"),
                                 kwargs=lambda: {"sensitivity": "NoSuchMethod"}),
    # Ctrl-C at each stage: the interrupt reaches the user, nothing is left behind
    "interrupt: while tracing": Case(KeyboardInterrupt, (), model=lambda: InterruptedInForward(size=8)),
    "interrupt: in the sensitivity (a hanging plugin)": Case(
        KeyboardInterrupt, (), kwargs=lambda: {"sensitivity": SensitivityInterrupted()}),
    "interrupt: in the search": Case(KeyboardInterrupt, (), kwargs=lambda: {"search_alg": SearchInterrupted()}),
    "interrupt: while writing the outputs": Case(KeyboardInterrupt, (), patch=interrupt_second_replace),
}


def folder_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(SEARCH_CASES))
def test_search_battery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    case = SEARCH_CASES[name]
    config = tmp_path / "search.cfg"
    if isinstance(case.config, bytes):
        config.write_bytes(case.config)
    else:
        config.write_text(case.config)
    for file, content in case.files.items():
        (tmp_path / file).write_text(content) if isinstance(content, str) else (tmp_path / file).write_bytes(content)
    (tmp_path / "prune.cfg").write_text(OLD_OUTPUT)
    model = case.model()
    snapshot = ModelSnapshot.take(model) if isinstance(model, nn.Module) and not _on_meta(model) else None
    input_data, kwargs, output = case.input_data(), case.kwargs(), case.output(tmp_path)
    before = folder_state(tmp_path)
    if case.patch is not None:
        case.patch(monkeypatch, tmp_path)
    with pytest.raises(case.error) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps.auto_channel_prune_search(model, str(config), input_data, str(output), **kwargs)
    monkeypatch.undo()
    if case.error is not KeyboardInterrupt:
        assert isinstance(info.value, AcpsError)
    for words in case.words:
        assert words in str(info.value), f"{words!r} not in: {info.value}"
    assert folder_state(tmp_path) == before, "an output file was created, changed or left half-written"
    if snapshot is not None:
        snapshot.assert_same(model)


def _on_meta(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def test_an_unreachable_target_is_a_warning_with_a_complete_result(tmp_path: Path) -> None:
    (tmp_path / "search.cfg").write_text("compress_ratio: 1000\nmax_prune_ratio: 0.2\nascend_optimized: false\n")
    model = chain()
    snapshot = ModelSnapshot.take(model)
    with pytest.warns(acps.PruneTargetWarning, match="compress_ratio 1000 cannot be reached: at most 1.5"):
        result = acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), data(),
                                                str(tmp_path / "prune.cfg"))
    assert not result.target_reached and "raise max_prune_ratio or lower compress_ratio" in result.notes[0]
    assert {p.name for p in tmp_path.iterdir()} == {"search.cfg", "prune.cfg", "prune.cfg.selection",
                                                    "prune.cfg.report.md", "prune.cfg.report.json"}
    snapshot.assert_same(model)


# The downstream calls ---------------------------------------------------------------------------------------------

@pytest.fixture
def searched(tmp_path: Path) -> Path:
    """A folder with a search's outputs (prune.cfg and its selection) for the downstream calls."""
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps.auto_channel_prune_search(chain(), str(tmp_path / "search.cfg"), data(), str(tmp_path / "prune.cfg"))
    return tmp_path


class Payload:
    """A pickle that would write a file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


DOWNSTREAM: dict[str, tuple[type[BaseException], tuple[str, ...], Callable[[Path, nn.Module], Any]]] = {
    "create: config missing": (ConfigError, ("missing.cfg",), lambda f, m: acps.create_prune_retrain_model(
        m, data()[0][:2], f / "missing.cfg", f / "prune.record")),
    "create: record in a missing folder": (OutputPathError, ("record_file", "does not exist"),
                                           lambda f, m: acps.create_prune_retrain_model(
                                               m, data()[0][:2], f / "prune.cfg", f / "no" / "prune.record")),
    "create: input not a tensor": (DataError, ("input_data",), lambda f, m: acps.create_prune_retrain_model(
        m, "images", f / "prune.cfg", f / "prune.record")),
    "create: interrupted while tracing": (KeyboardInterrupt, (), lambda f, m: acps.create_prune_retrain_model(
        InterruptedInForward(size=8), data()[0][:2], f / "prune.cfg", f / "prune.record")),
    "restore: record missing": (ConfigError, ("record file does not exist",), lambda f, m: (
        acps.restore_prune_retrain_model(m, data()[0][:2], f / "none.record", f / "prune.cfg", f / "w.pth"))),
    "restore: checkpoint with code in it": (DataError, ("w.pth",), lambda f, m: _restore_with_pickle(f, m)),
    "save: path is a directory": (OutputPathError, ("save_path",), lambda f, m: acps.save_prune_retrain_model(
        m, f / "sub.onnx", data()[0][:2]) if (f / "sub.onnx").mkdir() is None else None),
    "save: missing folder": (OutputPathError, ("does not exist",), lambda f, m: acps.save_prune_retrain_model(
        m, f / "no" / "model.onnx", data()[0][:2])),
}


def _restore_with_pickle(folder: Path, model: nn.Module) -> Any:
    pruned = acps.create_prune_retrain_model(model, data()[0][:2], folder / "prune.cfg", folder / "prune.record")
    state = dict(pruned.state_dict())
    state["payload"] = Payload(folder / "pwned.txt")  # type: ignore[assignment]
    torch.save(state, folder / "w.pth")
    return acps.restore_prune_retrain_model(model, data()[0][:2], folder / "prune.record", folder / "prune.cfg",
                                            folder / "w.pth")


@pytest.mark.parametrize("name", list(DOWNSTREAM))
def test_downstream_battery(searched: Path, name: str) -> None:
    error, words, call = DOWNSTREAM[name]
    model = chain()
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(error) as info:
        call(searched, model)
    if error is not KeyboardInterrupt:
        assert isinstance(info.value, AcpsError)
    for text in words:
        assert text in str(info.value), f"{text!r} not in: {info.value}"
    assert not (searched / "pwned.txt").exists(), "a checkpoint's code ran"
    assert not [p for p in searched.rglob("*") if p.name.endswith(".tmp") or ".old" in p.name]
    snapshot.assert_same(model)
