"""The reliability battery, continued: models and data that torch rejects far from their cause.

A forward pass that writes to its own weights, NaN or Inf weights and damaged BatchNorm statistics, lazy modules
never run, an in-place operation on a tensor autograd needs, integer / bool / complex / quantized images, sparse
or nested tensors, class labels stored as floats, and a ``compress_ratio`` of ``-inf``. Each row asserts the error
type (an ``AcpsError`` subclass), the words that help (what is at fault and the fix), that the model is exactly as
before (``ModelSnapshot``) and that the output folder is unchanged (a pre-existing ``prune.cfg`` survives bit for
bit, no file is added). The checks the downstream calls can use are tested directly at the end.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

import acps_core as acps
from acps_core._util.data import check_dense
from acps_core._util.model_checks import check_initialized, check_model, check_weights, same_bits
from acps_core._util.state import CopyOnWrite, PreservedState, preserved_model_state
from acps_core.errors import AcpsError, ConfigError, DataError, GraphError, PluginError
from acps_sensitivity_taylor import BalancedL2NormSensitivity
from testing.models import ConvChain
from tests.support.model_snapshot import ModelSnapshot
from tests.util.test_reliability import OLD_OUTPUT, Case, chain, data, folder_state

# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class WritesEveryCall(ConvChain):
    """Decays a weight in every forward pass, as some hand-written EMA or weight-norm code does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.conv1.weight.mul_(0.99)
        return super().forward(x)


class WritesThroughData(ConvChain):
    """Writes through ``.data``, which no version counter sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fc1.weight.data.mul_(0.5)
        return super().forward(x)


class AssignsData(ConvChain):
    """Replaces a weight's values by assigning ``.data``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.conv2.weight.data = self.conv2.weight.data * 0.5
        return super().forward(x)


class ReinitialisesInForward(ConvChain):
    """Calls an ``nn.init`` function in its forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nn.init.zeros_(self.fc2.bias)
        return super().forward(x)


class WritesThroughNumpy(ConvChain):
    """Writes into a weight through a NumPy view of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.conv3.weight.detach().numpy()[0] = 0.0
        return super().forward(x)


class WritesOnSecondCall(ConvChain):
    """Writes to a weight only on its second forward pass (after acps has traced it once)."""

    def __init__(self) -> None:
        super().__init__(size=8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            with torch.no_grad():
                self.conv2.bias.add_(1.0)
        return super().forward(x)


class WritesWithGradients(ConvChain):
    """Writes to a weight only when gradients are enabled: never while acps traces it, only while it scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            with torch.no_grad():
                self.conv1.bias.add_(1.0)
        return super().forward(x)


class InPlaceResidual(nn.Module):
    """``z = relu(conv(y)); z += y``: ReLU's backward pass needs its output, which the sum overwrote."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        z = torch.relu(self.conv2(y))
        z += y
        return self.fc(z.mean((2, 3)))


class InPlaceGate(nn.Module):
    """A sigmoid gate scaled in place: sigmoid's backward pass needs its output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.conv(x))
        gate.mul_(2.0)
        return self.fc(gate.mean((2, 3)))


class ZeroesItsOutput(nn.Module):
    """Writes into a ReLU's output with an index assignment (the stem's channels stay prunable)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(torch.relu(self.stem(x))))
        y[:, :1] = 0.0
        return self.fc(y.mean((2, 3)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv(x))
        out += x
        return out


class InPlaceInABlock(nn.Module):
    """The in-place residual inside a submodule: the error names it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(torch.relu(self.stem(x))).mean((2, 3)))


class InPlaceReluAfterNorm(ConvChain):
    """``nn.ReLU(inplace=True)`` after a BatchNorm: legitimate, the norm does not need its output."""

    def __init__(self) -> None:
        super().__init__(size=8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.pool(self.act(self.bn2(self.conv2(x))))
        x = self.act(self.bn3(self.conv3(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class Lazy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.LazyConv2d(8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def lazy_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))


def lazy_norm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


class TwoInputs(ConvChain):
    """Images and a one-channel side map, each through its own conv."""

    def __init__(self) -> None:
        super().__init__(size=8)
        self.side = nn.Conv2d(1, 32, 1)

    def forward(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = torch.relu(self.bn1(self.conv1(x) + self.side(extra)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class TokenModel(nn.Module):
    """Token ids into an embedding: integer inputs are this model's own."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.embed(ids).mean(1))))


class MaskBuffer(ConvChain):
    """A buffer holding -inf on purpose (an attention-style mask): not an error."""

    def __init__(self) -> None:
        super().__init__(size=8)
        self.register_buffer("mask", torch.tensor([0.0, float("-inf")]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.softmax(self.mask, 0)[0]


class InPlaceSensitivity(acps.SensitivityBase):
    """A plugin whose own code breaks autograd: the error stays the plugin's."""

    def get_sensitivity(self, search_records):
        raise RuntimeError("one of the variables needed for gradient computation has been modified by an inplace "
                           "operation: [torch.FloatTensor [3]]")


class WritingSensitivity(BalancedL2NormSensitivity):
    """Someone else's method (so acps copies every parameter): still a writing forward pass is named."""


def seeded(factory: Any) -> Any:
    def build() -> nn.Module:
        torch.manual_seed(0)
        model = factory()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None \
                    and not isinstance(module.running_var, nn.parameter.UninitializedBuffer):
                module.running_var.uniform_(0.5, 1.5)
        return model
    return build


def broken(name: str, value: float, index: int = 0) -> Any:
    """``chain()`` with one value of the parameter or buffer ``name`` set to ``value``."""
    def build() -> nn.Module:
        model = chain()
        tensor = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
        with torch.no_grad():
            tensor.view(-1)[index] = value
        return model
    return build


def with_buffer(name: str, value: torch.Tensor) -> Any:
    def build() -> nn.Module:
        model = chain()
        model.register_buffer(name, value)
        return model
    return build


def images(dtype: torch.dtype, batch: int = 16) -> Any:
    def build() -> list[torch.Tensor]:
        x, y = data(batch)
        if dtype == torch.bool:
            return [x > 0, y]
        if dtype.is_complex:
            return [x.to(dtype), y]
        return [(x.abs() * 40).to(dtype), y]
    return build


def labels(transform: Any) -> Any:
    def build() -> list[torch.Tensor]:
        x, y = data()
        return [x, transform(y)]
    return build


def tokens(low: int, high: int) -> Any:
    def build() -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(low, high, (16, 5), generator=generator), torch.randint(0, 10, (16,),
                                                                                   generator=generator)]
    return build


WRITE_FIX = ("make forward() leave its parameters alone", "self.training")

CASES: dict[str, Case] = {
    # A forward pass that writes to the model's own weights: named, put back bit for bit.
    "writes: every call (no_grad mul_)": Case(
        GraphError, ("parameter(s) conv1.weight were changed in place", "Conv2d conv1", "put them back bit for bit",
                     *WRITE_FIX), model=lambda: WritesEveryCall(size=8)),
    "writes: through .data": Case(GraphError, ("fc1.weight were changed in place", "Linear fc1", *WRITE_FIX),
                                  model=lambda: WritesThroughData(size=8)),
    "writes: assigns .data": Case(GraphError, ("conv2.weight were changed in place", *WRITE_FIX),
                                  model=lambda: AssignsData(size=8)),
    "writes: nn.init in forward": Case(GraphError, ("fc2.bias were changed in place", *WRITE_FIX),
                                       model=lambda: ReinitialisesInForward(size=8)),
    "writes: through a NumPy view": Case(GraphError, ("conv3.weight were changed in place",),
                                         model=lambda: WritesThroughNumpy(size=8)),
    "writes: only on its second call": Case(GraphError, ("conv2.bias were changed in place", "put them back"),
                                            model=WritesOnSecondCall),
    "writes: with someone else's method (full copies)": Case(
        GraphError, ("conv1.weight were changed in place", *WRITE_FIX), model=lambda: WritesEveryCall(size=8),
        kwargs=lambda: {"sensitivity": WritingSensitivity()}),
    # NaN / Inf weights and damaged statistics: named before any heavy work, not blamed on the data.
    "weights: NaN in a conv weight": Case(GraphError, ("parameter conv2.weight", "Conv2d conv2", "1 NaN",
                                                       "load a good checkpoint"),
                                          model=broken("conv2.weight", float("nan"))),
    "weights: Inf in a linear bias": Case(GraphError, ("parameter fc1.bias", "Linear fc1", "1 infinite"),
                                          model=broken("fc1.bias", float("inf"))),
    "weights: -Inf in a norm's weight": Case(GraphError, ("parameter bn3.weight", "BatchNorm2d bn3"),
                                             model=broken("bn3.weight", float("-inf"), 5)),
    "weights: NaN in a running mean": Case(GraphError, ("buffer bn2.running_mean", "BatchNorm2d bn2", "1 NaN",
                                                        "update_bn"), model=broken("bn2.running_mean", float("nan"))),
    "weights: Inf in a running variance": Case(GraphError, ("buffer bn1.running_var", "1 infinite"),
                                               model=broken("bn1.running_var", float("inf"))),
    "weights: negative running variance": Case(
        GraphError, ("running variance bn1.running_var", "BatchNorm2d bn1", "1 negative value(s)", "-1",
                     "cannot be negative", "update_bn"), model=broken("bn1.running_var", -1.0)),
    "weights: NaN in a model's own buffer": Case(
        GraphError, ("buffer scale", "of the model itself, a ConvChain", "1 NaN"),
        model=with_buffer("scale", torch.tensor([1.0, float("nan")]))),
    # Lazy modules never run.
    "lazy: LazyConv2d": Case(GraphError, ("conv (LazyConv2d)", "lazy modules", "run one forward pass with a real "
                                          "batch first"), model=seeded(Lazy)),
    "lazy: LazyLinear in a Sequential": Case(GraphError, ("3 (LazyLinear)", "model(images[:1])"), model=lazy_head),
    "lazy: LazyBatchNorm2d": Case(GraphError, ("1 (LazyBatchNorm2d)",), model=lazy_norm),
    # In-place operations on tensors autograd needs: the model's fault, named, not the plugin's.
    "in-place: z += y after a ReLU": Case(
        GraphError, ("modifies in place a tensor that autograd needs", "z = torch.relu(self.conv2(y))",
                     "test_reliability_model.py:", "in the model's own forward", "`z = z + y` instead of `z += y`",
                     "BalancedL2NormSensitivity"), model=seeded(InPlaceResidual)),
    "in-place: a sigmoid gate scaled with mul_": Case(
        GraphError, ("modifies in place", "gate = torch.sigmoid(self.conv(x))"), model=seeded(InPlaceGate)),
    "in-place: an index assignment": Case(GraphError, ("modifies in place", "y = torch.relu(self.conv(torch.relu("),
                                          model=seeded(ZeroesItsOutput)),
    "in-place: inside a submodule": Case(GraphError, ("out = torch.relu(self.conv(x))", "in the forward of block"),
                                         model=seeded(InPlaceInABlock)),
    "in-place: GroupTaylor too": Case(GraphError, ("modifies in place",), model=seeded(InPlaceResidual),
                                      kwargs=lambda: {"sensitivity": "GroupTaylorSensitivity"}),
    "in-place: the plugin's own": Case(PluginError, ("InPlaceSensitivity raised RuntimeError",),
                                       kwargs=lambda: {"sensitivity": InPlaceSensitivity()}),
    # Images of a dtype the model cannot take.
    "dtype: int64 images": Case(DataError, ("torch.int64", "torch.float32", "data.to(torch.float32)"),
                                input_data=images(torch.int64)),
    "dtype: int32 images": Case(DataError, ("torch.int32", "data.to(torch.float32)"), input_data=images(torch.int32)),
    "dtype: int16 images": Case(DataError, ("torch.int16",), input_data=images(torch.int16)),
    "dtype: int8 images": Case(DataError, ("torch.int8",), input_data=images(torch.int8)),
    "dtype: uint8 images": Case(DataError, ("torch.uint8", "data.float() / 255"), input_data=images(torch.uint8)),
    "dtype: bool images": Case(DataError, ("torch.bool", "data.to(torch.float32)"), input_data=images(torch.bool)),
    "dtype: complex64 images": Case(DataError, ("torch.complex64", "pass real data", "data.real"),
                                    input_data=images(torch.complex64)),
    "dtype: complex128 images": Case(DataError, ("torch.complex128", "pass real data"),
                                     input_data=images(torch.complex128)),
    "dtype: an integer second input": Case(DataError, ("input tensor 1 is torch.int64",),
                                           model=seeded(TwoInputs),
                                           input_data=lambda: [(data()[0], torch.ones(16, 1, 8, 8, dtype=torch.long)),
                                                               data()[1]]),
    "dtype: token ids out of range stay torch's error": Case(GraphError, ("raised while tracing", "index out of "
                                                                          "range"), model=seeded(TokenModel),
                                                            input_data=tokens(40, 90)),
    # Tensors of another layout.
    "layout: sparse COO images": Case(DataError, ("input_data data is a sparse tensor", "torch.sparse_coo",
                                                  "data.to_dense()"), input_data=lambda: [data()[0].to_sparse(),
                                                                                          data()[1]]),
    "layout: sparse CSR images": Case(DataError, ("sparse tensor", "torch.sparse_csr", "to_dense()"),
                                      input_data=lambda: [data()[0].reshape(16, -1).to_sparse_csr(), data()[1]]),
    "layout: sparse labels": Case(DataError, ("input_data label is a sparse tensor", "to_dense()"),
                                  input_data=lambda: [data()[0], torch.randn(16, 10).to_sparse()]),
    "layout: nested images": Case(DataError, ("nested tensor", "to_padded_tensor"),
                                  input_data=lambda: [torch.nested.nested_tensor(list(data()[0])), data()[1]]),
    "layout: quantized images": Case(DataError, ("quantized tensor", "torch.quint8", "data.dequantize()"),
                                     input_data=lambda: [torch.quantize_per_tensor(data()[0], 0.1, 128, torch.quint8),
                                                         data()[1]]),
    # Labels: class indices stored as floats.
    "labels: float class indices": Case(DataError, ("look like class indices stored as floats", "torch.float32",
                                                    "[0, 10)", "labels.long()"),
                                        input_data=labels(lambda y: y.float())),
    "labels: float64 class indices": Case(DataError, ("torch.float64", "labels.long()"),
                                          input_data=labels(lambda y: y.double())),
    "labels: bool class indices": Case(DataError, ("stored as bools", "labels.long()"),
                                       input_data=labels(lambda y: y > 4)),
    "labels: float class indices in a list of batches": Case(
        DataError, ("stored as floats", "labels.long()"),
        input_data=lambda: [(data()[0][:8], data()[1][:8].float()), (data()[0][8:], data()[1][8:].float())]),
    "labels: whole floats out of range": Case(DataError, ("label shape [16]", "whole numbers", "outside [0, 10)"),
                                              input_data=labels(lambda y: y.float() + 20)),
    "labels: fractional floats": Case(DataError, ("label shape [16] does not fit the model output shape [16, 10]",),
                                      input_data=labels(lambda y: y.float() + 0.5)),
    "labels: complex, output real": Case(DataError, ("labels are complex", "label.real"),
                                         input_data=lambda: [data()[0], torch.randn(16, 10, dtype=torch.complex64)]),
    # The search config.
    "config: compress_ratio -inf": Case(ConfigError, ("compress_ratio: -inf is not valid", "greater than 1"),
                                        "compress_ratio: -inf\n"),
    "config: compress_ratio inf": Case(ConfigError, ("compress_ratio: inf is not valid", "finite number"),
                                       "compress_ratio: inf\n"),
    "config: compress_ratio nan": Case(ConfigError, ("compress_ratio: nan is not valid",), "compress_ratio: nan\n"),
    "config: compress_ratio -1e39": Case(ConfigError, ("compress_ratio: -1e39 is not valid", "greater than 1"),
                                         "compress_ratio: -1e39\n"),
    "config: compress_ratio 1e39 (overflows)": Case(ConfigError, ("compress_ratio: 1e39 is not valid (too large "
                                                                  "for a 32-bit float)",), "compress_ratio: 1e39\n"),
}

#: Words a case's message must not hold (what the old messages wrongly said).
MUST_NOT_SAY = {
    "config: compress_ratio -inf": "too large",
    "config: compress_ratio inf": "too large",
    "config: compress_ratio -1e39": "too large",
    "labels: whole floats out of range": "labels.long() so",
    "labels: fractional floats": "class indices stored",
}


def take(model: nn.Module) -> Any:
    """A ModelSnapshot, or for a model with lazy modules (whose tensors cannot be read) what can be compared:
    each parameter's and buffer's object and class, the modes and the hooks."""
    if any(is_lazy(t) for t in (*model.parameters(), *model.buffers())):
        return [(name, id(t), type(t)) for name, t in (*model.named_parameters(), *model.named_buffers())] + [
            (name, m.training, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()]
    return ModelSnapshot.take(model)


def assert_unchanged(snapshot: Any, model: nn.Module) -> None:
    """``snapshot.assert_same(model)``, with the tensors compared bit for bit (a NaN weight equals itself)."""
    if isinstance(snapshot, list):
        assert take(model) == snapshot, "a lazy model changed"
        return
    other = ModelSnapshot.take(model)
    assert other.tensors.keys() == snapshot.tensors.keys(), "parameters or buffers were added or removed"
    for key, value in snapshot.tensors.items():
        assert same_bits(other.tensors[key], value), f"{key} changed"
    for key, grad in snapshot.grads.items():
        assert (grad is None) == (other.grads[key] is None) and (grad is None or same_bits(other.grads[key], grad))
    for attribute in ("grad_ids", "training", "requires_grad", "hooks", "devices_dtypes", "param_ids"):
        assert getattr(other, attribute) == getattr(snapshot, attribute), f"{attribute} changed"


def run_search(folder: Path, case: Case, model: Any) -> pytest.ExceptionInfo[BaseException]:
    config = folder / "search.cfg"
    config.write_text(case.config) if isinstance(case.config, str) else config.write_bytes(case.config)
    with pytest.raises(case.error) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps.auto_channel_prune_search(model, str(config), case.input_data(), str(folder / "prune.cfg"),
                                       **case.kwargs())
    return info


@pytest.mark.parametrize("name", list(CASES))
def test_model_battery(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    (tmp_path / "prune.cfg").write_text(OLD_OUTPUT)
    model = case.model()
    snapshot = take(model)
    before = folder_state(tmp_path)
    info = run_search(tmp_path, case, model)
    assert isinstance(info.value, AcpsError)
    for words in case.words:
        assert words in str(info.value), f"{words!r} not in: {info.value}"
    if name in MUST_NOT_SAY:
        assert MUST_NOT_SAY[name] not in str(info.value)
    assert "bug in acps" not in str(info.value)
    before["search.cfg"] = (tmp_path / "search.cfg").read_bytes()
    assert folder_state(tmp_path) == before, "an output file was created or changed"
    assert_unchanged(snapshot, model)


def test_a_forward_that_writes_only_while_scoring_is_named_without_blaming_acps(tmp_path: Path) -> None:
    """Writes that start after the watched first forward passes are found by checksum: named, with the fix, but
    they cannot be put back (acps keeps no copy of the parameters while its own methods score)."""
    (tmp_path / "prune.cfg").write_text(OLD_OUTPUT)
    model = WritesWithGradients(size=8)
    snapshot = ModelSnapshot.take(model)
    before = folder_state(tmp_path)
    info = run_search(tmp_path, Case(GraphError, ()), model)
    message = str(info.value)
    for words in ("parameter(s) conv1.bias were changed in place during the search", "Conv2d conv1",
                  "on some calls only", "could not be put back", "reload the weights", *WRITE_FIX):
        assert words in message, f"{words!r} not in: {message}"
    assert message.index("bug in acps") > message.index("If the forward pass never writes")
    before["search.cfg"] = (tmp_path / "search.cfg").read_bytes()
    assert folder_state(tmp_path) == before
    changed = ModelSnapshot.take(model)
    for key, value in snapshot.tensors.items():  # everything else came back
        if key != "conv1.bias":
            assert torch.equal(value, changed.tensors[key]), key
    assert changed.training == snapshot.training and changed.requires_grad == snapshot.requires_grad


@pytest.mark.parametrize("factory, input_data", [
    (seeded(TokenModel), tokens(0, 50)),  # integer inputs that are the model's own
    (InPlaceReluAfterNorm, data),  # nn.ReLU(inplace=True) after a BatchNorm
    (MaskBuffer, data),  # an -inf mask buffer
], ids=["token ids", "inplace ReLU after BatchNorm", "-inf mask buffer"])
def test_legitimate_models_still_search(tmp_path: Path, factory: Any, input_data: Any) -> None:
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.3\nascend_optimized: false\n")
    model = factory()
    snapshot = ModelSnapshot.take(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps.auto_channel_prune_search(model, str(tmp_path / "search.cfg"), input_data(),
                                       str(tmp_path / "prune.cfg"))
    assert (tmp_path / "prune.cfg").exists()
    snapshot.assert_same(model)


def test_a_search_copies_no_parameter_of_a_model_that_writes_none(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """acps's own overhead: with its own methods, the parameters are checksummed, and the watch on the first
    forward passes copies nothing (acps's masking writes are its own and are not copied)."""
    copied: list[list[str]] = []
    real = PreservedState.check_parameters

    def spy(self: PreservedState) -> None:
        copied.append(list(self._snapshot.written))
        real(self)

    monkeypatch.setattr(PreservedState, "check_parameters", spy)
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps.auto_channel_prune_search(chain(), str(tmp_path / "search.cfg"), data(), str(tmp_path / "prune.cfg"))
    assert copied == [[]]


# ----------------------------------------------------------------------------------------------------------------
# The checks the downstream calls (create / restore / replay / save) use
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory, words", [
    (seeded(Lazy), ("conv (LazyConv2d)", "run one forward pass")),
    (lazy_head, ("3 (LazyLinear)",)),
    (broken("conv1.weight", float("nan")), ("parameter conv1.weight", "NaN")),
    (broken("bn2.running_var", -2.0), ("running variance bn2.running_var", "negative")),
], ids=["LazyConv2d", "LazyLinear", "NaN weight", "negative variance"])
def test_check_model_names_the_module_and_changes_nothing(factory: Any, words: tuple[str, ...]) -> None:
    model = factory()
    snapshot = take(model)
    with pytest.raises(GraphError) as info:
        check_model(model)
    for text in words:
        assert text in str(info.value)
    assert_unchanged(snapshot, model)


def test_a_fresh_model_for_restore_may_hold_anything_but_lazy_modules() -> None:
    """restore / replay get a newly built model whose weights the checkpoint replaces: only laziness matters."""
    model = nn.Sequential(nn.Linear(3, 4))
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))  # e.g. torch.empty, never initialised
    check_initialized(model)
    with pytest.raises(GraphError):
        check_weights(model)
    with pytest.raises(GraphError, match="LazyLinear"):
        check_initialized(nn.Sequential(nn.LazyLinear(3)))


@pytest.mark.parametrize("value, words", [
    (torch.randn(2, 3, 8, 8).to_sparse(), ("input_data is a sparse tensor", "to_dense()")),
    ((torch.randn(2, 3, 8, 8), torch.randn(2, 4).to_sparse_csr()), ("input_data (tensor 1) is a sparse tensor",)),
    ({"x": torch.quantize_per_tensor(torch.randn(2, 3), 0.1, 0, torch.qint8)}, ("quantized", "dequantize()")),
], ids=["sparse", "sparse second input", "quantized in a dict"])
def test_check_dense_names_the_input(value: Any, words: tuple[str, ...]) -> None:
    with pytest.raises(DataError) as info:
        check_dense(value, "input_data")
    for text in words:
        assert text in str(info.value)
    check_dense(torch.randn(2, 3), "input_data")  # a dense tensor passes


@pytest.mark.parametrize("factory", [lambda: WritesEveryCall(size=8), lambda: WritesThroughData(size=8),
                                     lambda: AssignsData(size=8), lambda: ReinitialisesInForward(size=8)],
                         ids=["mul_", ".data", ".data =", "nn.init"])
def test_parameters_left_alone_around_create_restores_and_names(tmp_path: Path, factory: Any) -> None:
    """create_prune_retrain_model prunes a copy that shares the user's tensors; a writing forward pass reaches
    the user's model. prune.py wraps the pruned copy in parameters_left_alone: the model comes back bit for bit
    and the error names the parameter."""
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps.auto_channel_prune_search(chain(), str(tmp_path / "search.cfg"), data(), str(tmp_path / "prune.cfg"))
    before = folder_state(tmp_path)
    model = factory()
    model.eval()
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(GraphError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps.create_prune_retrain_model(model, data()[0][:2], tmp_path / "prune.cfg", tmp_path / "prune.record")
    assert "were changed in place" in str(info.value) and "make forward() leave" in str(info.value)
    snapshot.assert_same(model)
    assert folder_state(tmp_path) == before  # no record written


def test_parameters_left_alone_lets_acps_masking_through() -> None:
    """acps's own writes (masking zeroes channels and puts them back) are not copied."""
    from acps_core.graph.build import build_channel_graph
    from acps_core.graph.masking import masked_channels

    model = chain().eval()
    x = data()[0][:2]
    graph = build_channel_graph(model, x)
    group = graph.prunable_groups[0]
    written: dict[str, Any] = {}
    with CopyOnWrite(model, written):
        with masked_channels(model, graph, {group.id: list(range(group.channels - 1))}), torch.no_grad():
            model(x)
    assert written == {}


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool], ids=["int64", "uint8", "bool"])
def test_create_with_integer_images_is_a_data_error(tmp_path: Path, dtype: torch.dtype) -> None:
    """build_channel_graph explains its own failure, for create_prune_retrain_model too."""
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps.auto_channel_prune_search(chain(), str(tmp_path / "search.cfg"), data(), str(tmp_path / "prune.cfg"))
    before = folder_state(tmp_path)
    model = chain()
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(DataError, match=str(dtype)):
        acps.create_prune_retrain_model(model, images(dtype, 2)()[0], tmp_path / "prune.cfg",
                                        tmp_path / "prune.record")
    assert folder_state(tmp_path) == before
    snapshot.assert_same(model)


def test_preserved_model_state_restores_and_names_a_watched_write() -> None:
    model = WritesEveryCall(size=8).eval()
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(GraphError, match=r"conv1.weight were changed in place"):
        with preserved_model_state(model, copy_parameters=False) as state:
            with state.watching(), torch.no_grad():
                model(data()[0][:2])
            state.check_parameters()
    snapshot.assert_same(model)


def test_same_bits_is_exact() -> None:
    a = torch.tensor([0.0, float("nan"), 1.0])
    assert same_bits(a, a.clone())
    assert not same_bits(torch.tensor([-0.0]), torch.tensor([0.0]))
    assert not same_bits(a, a.double())


class ComplexWeights(nn.Module):
    """A model with complex parameters, whose complex inputs are its own (it fails for another reason)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.complex64))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("not today")


class RaisesValueError(ConvChain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom")


def test_a_trace_failure_is_blamed_on_the_dtype_only_when_converting_fixes_it() -> None:
    from acps_core._util.model_checks import explain_trace_failure

    error = ValueError("not today")
    complex_input = torch.randn(2, 4, dtype=torch.complex64)
    assert type(explain_trace_failure(ComplexWeights(), complex_input, error)) is GraphError
    assert type(explain_trace_failure(seeded(TokenModel)(), torch.full((2, 5), 99), error)) is GraphError
    explained = explain_trace_failure(chain().eval(), torch.zeros(2, 3, 8, 8, dtype=torch.int64), error)
    assert type(explained) is DataError and "torch.int64" in str(explained)


def test_an_in_place_complaint_the_model_does_not_reproduce_is_not_the_models() -> None:
    from acps_core._util.model_checks import explain_in_place_failure

    model = chain().eval()
    flags = [p.requires_grad for p in model.parameters()]
    complaint = RuntimeError("one of the variables needed for gradient computation has been modified by an "
                             "inplace operation")
    assert explain_in_place_failure(model, data()[0][:2], complaint) is None
    assert explain_in_place_failure(model, data()[0][:2], RuntimeError("something else")) is None
    assert explain_in_place_failure(RaisesValueError(), data()[0][:2], complaint) is None
    assert [p.requires_grad for p in model.parameters()] == flags


def _searched(folder: Path) -> Path:
    (folder / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acps.auto_channel_prune_search(chain(), str(folder / "search.cfg"), data(), str(folder / "prune.cfg"))
        acps.create_prune_retrain_model(chain(), data()[0][:2], folder / "prune.cfg", folder / "prune.record")
    return folder


def _nan_chain() -> nn.Module:
    model = chain()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    return model


DOWNSTREAM: dict[str, tuple[type[Exception], tuple[str, ...], Any]] = {
    "create: a lazy module": (GraphError, ("lazy modules", "run one forward pass with a real batch first"),
                              lambda f: acps.create_prune_retrain_model(Lazy(), data()[0][:2], f / "prune.cfg",
                                                                        f / "new.record")),
    "create: a NaN weight": (GraphError, ("parameter conv2.weight", "NaN"),
                             lambda f: acps.create_prune_retrain_model(_nan_chain(), data()[0][:2],
                                                                       f / "prune.cfg", f / "new.record")),
    "create: sparse input_data": (DataError, ("input_data", "to_dense()"),
                                  lambda f: acps.create_prune_retrain_model(chain(), data()[0][:2].to_sparse(),
                                                                            f / "prune.cfg", f / "new.record")),
    "create: sparse calibration_data": (DataError, ("calibration_data", "to_dense()"),
                                        lambda f: acps.create_prune_retrain_model(
                                            chain(), data()[0][:2], f / "prune.cfg", f / "new.record",
                                            calibration_data=data()[0].to_sparse())),
    "restore: a lazy module": (GraphError, ("lazy modules",), lambda f: acps.restore_prune_retrain_model(
        Lazy(), data()[0][:2], f / "prune.record", f / "prune.cfg", f / "w.pth")),
    "restore: sparse input_data": (DataError, ("to_dense()",), lambda f: acps.restore_prune_retrain_model(
        chain(), data()[0][:2].to_sparse(), f / "prune.record", f / "prune.cfg", f / "w.pth")),
    "save: a lazy module": (GraphError, ("lazy modules",), lambda f: acps.save_prune_retrain_model(
        Lazy(), f / "m.onnx", data()[0][:2])),
    "save: sparse input_data": (DataError, ("to_dense()",), lambda f: acps.save_prune_retrain_model(
        chain(), f / "m.onnx", data()[0][:2].to_sparse())),
}


@pytest.mark.parametrize("name", list(DOWNSTREAM))
def test_the_downstream_calls_name_a_bad_model_or_input_and_write_nothing(tmp_path: Path, name: str) -> None:
    error, words, call = DOWNSTREAM[name]
    before = folder_state(_searched(tmp_path))
    with pytest.raises(error) as info:
        call(tmp_path)
    assert "ONNX export" not in str(info.value)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    assert folder_state(tmp_path) == before
