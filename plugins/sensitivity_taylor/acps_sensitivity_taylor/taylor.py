"""First-order Taylor sensitivity of each channel to the loss.

Removing channel ``c`` zeroes every weight tied to it; to first order the loss changes by
``-sum_i w_i * dL/dw_i`` over those weights, so the channel's score is ``|sum_i w_i * dL/dw_i|``, summed over
every parameter of its channel group (producers, the norms and depthwise convs that follow, the consumers'
input columns). Scores are accumulated over the ``test_iteration`` calibration passes. This is the criterion of
Molchanov et al., "Pruning Convolutional Neural Networks for Resource Efficient Inference", ICLR 2017, with
the group sum of Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019.

A degenerate loss is detected: users without labels often pass the model's own outputs, which makes the L1 loss
exactly 0 and every gradient vanish, or random labels (the reference's example, ``torch.randn(output.size())``),
which make the gradient point in a random direction; output-shaped labels whose correlation with the outputs is
below 0.1 count as random. The method then scores channels by the first-order change of the model output they
cause, estimated with random projections of the output (a label-free, Fisher-style criterion), and says so in
``notes``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from acps_core.bases import SensitivityBase
from acps_core.data import default_loss, forward
from acps_core.distributed import Communicator
from acps_core.errors import ArgumentError, DataError
from acps_core.graph import ParamSlice
from acps_core.problem import SearchRecord
from acps_core.progress import progress

logger = logging.getLogger(__name__)

#: Random output projections per calibration pass for the label-free fallback.
FALLBACK_PROJECTIONS = 8
#: Below this absolute correlation between outputs and output-shaped labels, the labels are taken as noise.
UNRELATED_LABEL_CORRELATION = 0.1


class TaylorLossSensitivity(SensitivityBase):
    """Channel importance ``|sum(w * dL/dw)|`` over every parameter tied to the channel (see the module docs).

    Args:
        loss_func: ``loss_func(output, label) -> scalar``. By default the reference's L1 between output and
            label, or cross-entropy when the labels are integer class indices.
        seed: seed of the random projections used by the label-free fallback (results are reproducible).
        normalize: divide each group's scores by their mean (off by default, as in the reference).
    """

    uses_default_loss = True
    #: Whether a channel's per-pass term sums the absolute value of each weight's term (``GroupTaylorSensitivity``)
    #: instead of taking the absolute value of their sum.
    elementwise = False

    def __init__(self, loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 normalize: bool = False) -> None:
        super().__init__(loss_func)
        self.seed = seed
        self.normalize = normalize

    @staticmethod
    def _accumulate(contribution: torch.Tensor) -> torch.Tensor:
        """A pass's contribution to a channel's score: the absolute first-order change of the loss."""
        return contribution.abs()

    def _loss(self, output: Any, label: torch.Tensor) -> torch.Tensor:
        loss = (self.loss_func or default_loss)(output, label)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise DataError(f"the loss function returned {type(loss).__name__} "
                            f"{list(getattr(loss, 'shape', []))}; it must return a scalar tensor")
        return loss.reshape(())

    def get_sensitivity(self, search_records: list[SearchRecord]) -> None:
        """Set ``record.sensitivity`` for every record (see the class docs)."""
        assert self.model is not None and self.graph is not None, "setup_initialization was not called"
        model = self.model
        slices = {r.group_id: self._slices(r) for r in search_records}
        params = list({id(p): p for group in slices.values() for _, p in group}.values())
        for param in params:
            param.requires_grad_(True)  # frozen layers are scored too; the core restores the flags

        comm = Communicator.current()
        scores = {r.group_id: torch.zeros(r.channels, dtype=torch.float64) for r in search_records}
        any_gradient = False
        unrelated: str | None = None
        batches = self.calibration_batches()
        for index, (data, label) in enumerate(progress(batches, f"{type(self).__name__}: calibration passes",
                                                       len(batches))):

            def one_pass(data: Any = data, label: Any = label) -> tuple[str | None, tuple[Any, ...], bool]:
                """This rank's gradients of one pass (none if the labels are unrelated)."""
                with torch.enable_grad():
                    output = forward(model, data)
                    why = self._unrelated_labels(output, label)
                    if why:
                        return why, (), False
                    loss = self._loss(output, label)
                    if not bool(torch.isfinite(loss)):
                        raise DataError(f"the loss on the calibration data is {loss.item()}; check the data and "
                                        "labels for NaN/Inf or values the loss cannot take")
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                self._check_finite(params, grads)
                return None, grads, any(g is not None and bool(g.any()) for g in grads)

            why, grads, gradient = comm.run(f"{type(self).__name__}: calibration pass {index}", one_pass)
            unrelated = unrelated or why
            if comm.any(unrelated is not None):
                unrelated = unrelated or "another rank's labels look unrelated to the model's outputs"
                break
            any_gradient = comm.any(gradient) or any_gradient
            # Across ranks: the pass's loss is the mean over the union of the shards, so each rank's part counts
            # by its share of the samples, and the absolute value (or square) comes after the sum.
            share = _share(comm, _samples(label))
            if self.elementwise and comm.distributed:
                # |w * g| per weight is not linear in g: the union's gradient itself is needed (a full all-reduce).
                grads = tuple(comm.sum((g if g is not None else torch.zeros_like(p)) * share)
                              for p, g in zip(params, grads))
                share = 1.0
            grad_of = {id(p): g for p, g in zip(params, grads)}
            for record in search_records:
                term = self._contribution(slices[record.group_id], grad_of, record.channels)
                if not self.elementwise:
                    term = _union_mean(comm, term, share)
                scores[record.group_id] += self._accumulate(term)
        if unrelated or not any_gradient:
            why = unrelated or ("the loss gave no gradient (labels equal to the model's own outputs make the L1 "
                                "loss exactly 0)")
            self.notes.append(
                f"{why}; channels were scored instead by the first-order change of the model output they cause, "
                f"estimated with {FALLBACK_PROJECTIONS} random output projections per pass (label-free)")
            logger.warning(self.notes[-1])
            scores = self._output_change_scores(search_records, slices, params)
        for record in search_records:
            score = scores[record.group_id]
            if self.normalize and float(score.mean()) > 0:
                # Groups of very different size and depth give scores of very different scale; dividing by the
                # group's mean makes them comparable, so the search spreads the cuts by relative importance.
                score = score / score.mean()
            record.sensitivity = score

    def _check_finite(self, params: list[torch.nn.Parameter], grads: tuple[Any, ...]) -> None:
        """A NaN or Inf gradient would turn every score it touches into noise: say where it is instead."""
        assert self.model is not None
        for param, grad in zip(params, grads):
            if grad is not None and not bool(torch.isfinite(grad).all()):
                name = next((n for n, p in self.model.named_parameters() if p is param), "a parameter")
                raise DataError(f"the gradient of the loss on the calibration data is NaN or Inf at {name}; the "
                                "model's forward pass is not differentiable there on this data (e.g. sqrt or log "
                                "of 0, a division by 0); fix the model or the data, or pick a gradient-free "
                                "sensitivity such as BalancedL2NormSensitivity")

    def _unrelated_labels(self, output: Any, label: torch.Tensor) -> str | None:
        """Why the labels cannot rank channels, when the default L1 loss would compare the output with labels
        that do not depend on it at all (the reference's example uses ``torch.randn(output.size())``)."""
        if (self.loss_func is not None or not isinstance(output, torch.Tensor) or not label.is_floating_point()
                or label.shape != output.shape or output.numel() < 8):
            return None
        pair = torch.stack([output.detach().flatten().double(), label.detach().flatten().double()])
        correlation = float(torch.corrcoef(pair)[0, 1])
        if math.isnan(correlation):
            return None  # constant output or labels: the zero-gradient check decides
        if abs(correlation) < UNRELATED_LABEL_CORRELATION:
            return (f"the labels look unrelated to the model's outputs (correlation {correlation:+.3f}, e.g. "
                    "random labels as in the reference's example), so an L1 loss against them ranks channels on "
                    "noise")
        return None

    def _slices(self, record: SearchRecord) -> list[tuple[ParamSlice, torch.nn.Parameter]]:
        """The group's parameter slices that exist (a layer without bias has no bias slice)."""
        assert self.model is not None and self.graph is not None
        found = []
        for piece in self.graph.param_slices(self.graph.group(record.group_id)):
            param = getattr(self.model.get_submodule(piece.module), piece.param, None)
            if isinstance(param, torch.nn.Parameter):
                found.append((piece, param))
        return found

    def _contribution(self, group: list[tuple[ParamSlice, torch.nn.Parameter]], grad_of: dict[int, Any],
                      channels: int) -> torch.Tensor:
        """Per channel: ``sum(w * dL/dw)`` over the group's parameter slices (signed), or ``sum(|w * dL/dw|)``
        when ``elementwise``."""
        total = torch.zeros(channels, dtype=torch.float64)
        for piece, param in group:
            grad = grad_of.get(id(param))
            if grad is None:
                continue
            product = param.detach() * grad
            total += piece.per_channel(product.abs() if self.elementwise else product, channels).double().cpu()
        return total

    def _output_change_scores(self, records: list[SearchRecord],
                              slices: dict[int, list[tuple[ParamSlice, torch.nn.Parameter]]],
                              params: list[torch.nn.Parameter]) -> dict[int, torch.Tensor]:
        """Label-free scores: ``sqrt(E_r[(r . J w_c)^2])``, the expected first-order change of the output
        along a random direction ``r`` when channel ``c`` is removed."""
        assert self.model is not None
        comm = Communicator.current()
        # Each rank draws its own projections (seeded by its rank): across ranks the score is the same estimate
        # from other random directions, not bit for bit the single-process one.
        generator = torch.Generator().manual_seed(self.seed + 7919 * comm.rank)
        squares = {r.group_id: torch.zeros(r.channels, dtype=torch.float64) for r in records}
        for index, (data, _) in enumerate(self.calibration_batches()):

            def projections(data: Any = data) -> tuple[list[dict[int, torch.Tensor]], int]:
                """This rank's signed terms for each random projection of one pass, and its sample count."""
                assert self.model is not None
                with torch.enable_grad():
                    output = forward(self.model, data)
                    if not isinstance(output, torch.Tensor):
                        raise DataError("the label-free fallback needs a model that returns one tensor")
                    found = []
                    for k in range(FALLBACK_PROJECTIONS):
                        direction = torch.randn(output.shape, generator=generator).to(output.device, output.dtype)
                        projected = (output * direction).sum() / output.shape[0]
                        grads = torch.autograd.grad(projected, params, allow_unused=True,
                                                    retain_graph=k < FALLBACK_PROJECTIONS - 1)
                        grad_of = {id(p): g for p, g in zip(params, grads)}
                        found.append({r.group_id: self._contribution(slices[r.group_id], grad_of, r.channels)
                                      for r in records})
                return found, int(output.shape[0])

            # The forward and backward passes may fail on one rank: every rank learns it before any collective.
            found, samples = comm.run(f"{type(self).__name__}: label-free pass {index}", projections)
            share = _share(comm, samples)
            for terms in found:
                for record in records:
                    squares[record.group_id] += _union_mean(comm, terms[record.group_id], share).pow(2)
        return {g: s.sqrt() for g, s in squares.items()}


def _samples(label: torch.Tensor) -> int:
    return int(label.shape[0]) if label.dim() else 1


def _share(comm: Communicator, samples: int) -> float:
    """This rank's share of the pass's samples over all ranks (1 in a single process)."""
    if not comm.distributed:
        return 1.0
    return samples / float(comm.sum(torch.tensor([float(samples)], dtype=torch.float64)).item())


def _union_mean(comm: Communicator, term: torch.Tensor, share: float) -> torch.Tensor:
    """A pass's per-rank term (from a loss averaged over this rank's samples) as the term of the loss averaged
    over every rank's samples: the sum over ranks of the terms weighted by their share of the samples."""
    return comm.sum(term * share) if comm.distributed else term


class FisherSensitivity(TaylorLossSensitivity):
    """Channel importance ``sum over passes of (sum(w * dL/dw))**2``: the squared first-order change of the loss,
    accumulated over the calibration passes, a diagonal Fisher-information estimate of the loss increase when
    the channel goes (Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019; Liu et
    al., "Group Fisher Pruning for Practical Network Compression", ICML 2021). Squaring per pass, rather than
    taking the absolute value, weighs a channel by how consistently large its effect is across batches.
    """

    @staticmethod
    def _accumulate(contribution: torch.Tensor) -> torch.Tensor:
        return contribution.pow(2)


class NormalizedTaylorSensitivity(TaylorLossSensitivity):
    """:class:`TaylorLossSensitivity` with each group's scores divided by their mean, so groups of different size
    and depth compare on relative importance."""

    def __init__(self, loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None = None, seed: int = 0) -> None:
        super().__init__(loss_func, seed, normalize=True)


class GroupTaylorSensitivity(TaylorLossSensitivity):
    """Channel importance ``sum(|w * dL/dw|)`` over the parameters tied to the channel (``terms``, below),
    accumulated over the calibration passes and divided by the group's mean: the group Taylor importance of
    Torch-Pruning (Fang et al., "DepGraph", CVPR 2023; its ``GroupTaylorImportance`` with the mean normaliser).
    ``normalize="median"`` divides by the group's median instead, as ``GroupMagnitudeSensitivity`` does by
    default.

    ``terms`` picks the parameters: ``"dense"`` (the default) takes only the weights of the dense (``groups=1``)
    Conv, ConvTranspose and Linear layers tied to the channel (the producers' filters and the consumers' columns),
    the terms Torch-Pruning 1.6 sums (its biases are off by default, and it skips norms and depthwise filters), so
    the scores are exactly its own; a group without such a weight keeps all its terms. ``"all"`` also takes the
    biases and the followers' parameters (norm scales and shifts, depthwise filters).

    Unlike :class:`TaylorLossSensitivity`, which takes the absolute value of the channel's summed first-order
    change, terms of opposite sign do not cancel: a channel whose weights each matter to the loss scores high
    even when their effects happen to offset. With ``GlobalRankSearch`` and the re-fit, ``bench/quality.py``
    measures it at or above every other method after fine-tuning, within the noise, in all its rows, and below
    ``GroupMagnitudeSensitivity`` before fine-tuning at 2x and 3x (see the README).
    Across ``torch.distributed`` ranks the gradients themselves are summed before the absolute values, so the
    scores equal those of one process on the union of the shards.
    """

    elementwise = True

    def __init__(self, loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 normalize: str = "mean", terms: str = "dense") -> None:
        if normalize not in ("mean", "median"):
            raise ArgumentError(f"GroupTaylorSensitivity: normalize must be 'mean' or 'median', got {normalize!r}")
        if terms not in ("all", "dense"):
            raise ArgumentError(f"GroupTaylorSensitivity: terms must be 'all' or 'dense', got {terms!r}")
        super().__init__(loss_func, seed, normalize=True)
        self.divide_by = normalize
        self.terms = terms

    def _slices(self, record: SearchRecord) -> list[tuple[ParamSlice, torch.nn.Parameter]]:
        """The group's parameter slices: all of them, or with ``terms="dense"`` the dense layers' weights."""
        found = super()._slices(record)
        if self.terms == "all":
            return found
        assert self.model is not None
        dense = [(piece, param) for piece, param in found
                 if piece.param == "weight" and _is_dense(self.model.get_submodule(piece.module))]
        return dense or found

    def get_sensitivity(self, search_records: list[SearchRecord]) -> None:
        """Set ``record.sensitivity`` for every record (see the class docs); ``normalize="median"`` divides each
        group's scores by their median instead of their mean."""
        super().get_sensitivity(search_records)
        if self.divide_by == "median":
            for record in search_records:
                scores = torch.as_tensor(record.sensitivity)
                median = float(scores.median())
                if median > 0:  # mean-normalised already: rescale by the median of those values
                    record.sensitivity = scores / median


def _is_dense(module: torch.nn.Module) -> bool:
    """A Conv or ConvTranspose of one group, or a Linear layer."""
    return isinstance(module, torch.nn.Linear) or (
        isinstance(module, torch.nn.modules.conv._ConvNd) and module.groups == 1)


class OutputChangeSensitivity(TaylorLossSensitivity):
    """Label-free channel importance: the expected first-order change of the model's output along a random
    direction when the channel goes, ``sqrt(E_r[(r . J w_c)^2])`` over random output projections ``r`` (the score
    :class:`TaylorLossSensitivity` falls back to when the loss gives nothing). It measures how much the channel
    moves the output, whatever the labels, so it does not fade when the model already fits the calibration data.
    """

    def get_sensitivity(self, search_records: list[SearchRecord]) -> None:
        """Set ``record.sensitivity`` for every record (see the class docs)."""
        assert self.model is not None and self.graph is not None, "setup_initialization was not called"
        slices = {r.group_id: self._slices(r) for r in search_records}
        params = list({id(p): p for group in slices.values() for _, p in group}.values())
        for param in params:
            param.requires_grad_(True)  # frozen layers are scored too; the core restores the flags
        scores = self._output_change_scores(search_records, slices, params)
        for record in search_records:
            record.sensitivity = scores[record.group_id]
