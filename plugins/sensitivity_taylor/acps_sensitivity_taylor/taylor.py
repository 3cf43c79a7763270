"""First-order Taylor sensitivity of each channel to the loss.

Removing channel ``c`` zeroes every weight tied to it; to first order the loss changes by
``-sum_i w_i * dL/dw_i`` over those weights, so the channel's score is ``|sum_i w_i * dL/dw_i|``, summed over
every parameter of its channel group (producers, the norms and depthwise convs that follow, the consumers'
input columns). Scores are accumulated over the ``test_iteration`` calibration passes. This is the criterion of
Molchanov et al., "Pruning Convolutional Neural Networks for Resource Efficient Inference", ICLR 2017, with
the group sum of Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019.

A degenerate loss is detected. Users without labels often pass the model's own outputs, which makes the L1 loss
0 and its gradient vanish (or, where the outputs were computed in other batches, rounding noise); others pass
random labels (the reference's example, ``torch.randn(output.size())``), which make the gradient point in a
random direction. Output-shaped labels within 0.1 % (relative RMS) of the outputs count as the outputs, and
those whose correlation with the outputs is below 0.1 count as random; a loss that gives no gradient at all in
any pass is degenerate too. The method then scores channels by the first-order change of the model output they
cause (a label-free, Fisher-style criterion), and says so in ``notes``.

The label-free estimate. Each sample ``n`` of a pass gets its own random direction ``r_n`` (standard normal,
shaped like its output), drawn from a generator seeded by ``seed``, the pass and the sample's index in the pass.
The pass's ``N`` samples are split into ``K = min(8, ceil(N / 2))`` consecutive chunks (of two samples or more
where the pass has them: on a CPU a batch of one costs about a quarter more per sample than a batch of eight);
each chunk runs one forward and one backward of ``sum_n r_n . f_n / N`` over its samples, which gives
``t_kc = sum_(n in chunk k) r_n . J_n w_c / N`` for every channel ``c`` (``J_n w_c``: the first-order change of
sample ``n``'s output when channel ``c`` goes). As ``E[t_kc^2] = sum_(n in chunk k) |J_n w_c|^2 / N^2``, the sum
of ``t_kc^2`` over the chunks has the expectation of the square of one random projection of the whole pass,
``E_r[(r . J w_c)^2]``, with ``K`` degrees of freedom, like ``K`` such projections, for the cost of one forward
and backward pass over the samples. The channel's score is the square root of those sums over the passes.
Output-shaped labels make every pass run its forward in these chunks, so a pass whose labels turn out
degenerate is scored from that forward.

Across ``torch.distributed`` ranks a pass is the union of every rank's part of it, in rank order (see
:mod:`acps_core._util.distributed`): the label checks use sums over the union, the sample indices, chunks and random
directions are the union's, each rank runs the part of each chunk it holds, and the chunks' terms (for the
element-wise ``GroupTaylorSensitivity``, their gradients) are summed over the ranks. Every method here then
gives the scores of one process on the union, on the loss path and on the label-free one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, cast

import torch

from acps_core import DataError
from acps_core.plugin import (
    Communicator,
    MethodOptions,
    ParamSlice,
    SearchRecord,
    SensitivityBase,
    default_loss,
    forward,
    map_tensors,
    primary_output,
    progress,
)
from acps_sensitivity_taylor.options import Normalize, bool_normalize_alias

logger = logging.getLogger(__name__)

#: Chunks per calibration pass of the label-free estimate (each chunk's samples have their own random directions).
FALLBACK_CHUNKS = 8
#: The fewest samples a chunk holds where the pass has enough (a batch of one runs slower per sample).
CHUNK_SAMPLES = 2
#: Below this absolute correlation between outputs and output-shaped labels, the labels are taken as noise.
UNRELATED_LABEL_CORRELATION = 0.1
#: Output-shaped labels within this relative RMS distance of the outputs are taken as the model's own outputs.
OWN_OUTPUT_TOLERANCE = 1e-3

Slices = dict[int, list[tuple[ParamSlice, torch.nn.Parameter]]]


class TaylorLossSensitivity(SensitivityBase):
    """Channel importance ``|sum(w * dL/dw)|`` over every parameter tied to the channel (see the module docs).

    Args:
        loss_func: ``loss_func(output, label) -> scalar``. By default the reference's L1 between output and
            label, or cross-entropy when the labels are integer class indices.
        seed: seed of the random directions used by the label-free fallback (results are reproducible).
        normalize: divide each group's scores by their ``"mean"``, or by their ``"median"`` (after the mean), or
            leave them as they are (``"none"``, the default, as in the reference). ``True`` and ``False``, the old
            spellings, still mean ``"mean"`` and ``"none"``, with a DeprecationWarning.

    Raises:
        MethodOptionsError: an option does not fit (an :class:`~acps_core.ArgumentError`).
    """

    class Options(MethodOptions):
        """The options of :class:`TaylorLossSensitivity` (see its arguments)."""

        seed: int = 0
        normalize: Normalize = "none"

        _normalize_alias = bool_normalize_alias()

    uses_default_loss = True
    #: Whether a channel's per-pass term sums the absolute value of each weight's term (``GroupTaylorSensitivity``)
    #: instead of taking the absolute value of their sum.
    elementwise = False

    def __init__(self, loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 normalize: Normalize | bool = "none") -> None:
        self._configure(loss_func, seed=seed, normalize=normalize)

    def _configure(self, loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None, **options: Any) -> None:
        """Validate ``options`` through the class's Options model and keep them (``self.options``, and each as an
        attribute of the same name)."""
        super().__init__(loss_func)
        self.options = self.Options.checked(self, **options)
        self.seed = self.options.seed
        self.normalize = self.options.normalize

    def _normalized(self, score: torch.Tensor) -> torch.Tensor:
        """A group's scores divided as ``normalize`` says (a group whose mean or median is 0 is left as it is)."""
        if self.normalize == "none":
            return score
        if float(score.mean()) > 0:
            # Groups of very different size and depth give scores of very different scale; dividing by the
            # group's mean makes them comparable, so the search spreads the cuts by relative importance.
            score = score / score.mean()
        if self.normalize == "median":
            median = float(score.median())
            if median > 0:  # mean-normalised already: rescale by the median of those values
                score = score / median
        return score

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
        uses, params = self._prepare(search_records)
        comm = Communicator.current()
        name = type(self).__name__
        scores = _zeros(search_records)
        squares = _zeros(search_records)  # the label-free estimate, over the passes in ``label_free``
        label_free: set[int] = set()
        degenerate: str | None = None
        any_gradient = False
        batches = self.calibration_batches()
        for index, (data, label) in enumerate(progress(batches, f"{name}: calibration passes", len(batches))):
            part = _Pass(comm, index, _samples(label))
            # Output-shaped labels may turn out degenerate: the forward then runs in the label-free chunks.
            chunked = degenerate is not None or self._output_shaped(label)
            outputs = comm.run(f"{name}: calibration pass {index}",
                               partial(self._forward, data, part, chunked))
            degenerate = degenerate or self._degenerate_labels(comm, outputs, label)
            if degenerate:
                self._add_label_free(squares, uses, params, part, data, outputs)
                label_free.add(index)
                continue
            found = comm.run(f"{name}: calibration pass {index}",
                             partial(self._loss_terms, outputs, label, uses, params))
            terms = self._union_terms(comm, part, uses, params, found)
            # Decided on the combined terms, so every rank (and one process) decides the same.
            any_gradient = any_gradient or any(bool(t.any()) for t in terms.values())
            for record in search_records:
                scores[record.group_id] += self._accumulate(terms[record.group_id])
        if degenerate or not any_gradient:
            why = degenerate or "the loss gave no gradient in any calibration pass"
            self.notes.append(
                f"{why}; channels were scored instead by the first-order change of the model output they cause, "
                "estimated with a random projection of each sample's output, in up to "
                f"{FALLBACK_CHUNKS} chunks of samples per pass (label-free)")
            logger.warning(self.notes[-1])
            missing = [(i, batch) for i, batch in enumerate(batches) if i not in label_free]
            for index, (data, label) in progress(missing, f"{name}: label-free passes", len(missing)):
                self._add_label_free(squares, uses, params, _Pass(comm, index, _samples(label)), data, None)
            scores = {group: square.sqrt() for group, square in squares.items()}
        for record in search_records:
            record.sensitivity = self._normalized(scores[record.group_id])

    def _prepare(self, records: list[SearchRecord]) -> tuple[_Uses, list[torch.nn.Parameter]]:
        """Where each parameter is tied to a channel group, and every such parameter, set to require gradients."""
        uses = _Uses(records, {r.group_id: self._slices(r) for r in records})
        for param in uses.params:
            param.requires_grad_(True)  # frozen layers are scored too; the core restores the flags
        return uses, uses.params

    def _output_shaped(self, label: torch.Tensor) -> bool:
        """Whether the default loss compares the output with labels of its shape (the L1 loss), which may turn
        out to be the outputs themselves or noise (from the traced output: every rank sees the same)."""
        assert self.graph is not None
        if self.loss_func is not None or label.is_complex():
            return False
        traced, _ = primary_output(self.graph.output)
        return traced is not None and tuple(label.shape[1:]) == tuple(traced.shape[1:])

    def _forward(self, data: Any, part: _Pass, chunked: bool) -> list[tuple[int | None, int, Any]]:
        """This rank's outputs of one pass, as ``(chunk, index of its first sample in the union, output)``: one
        per chunk of the label-free estimate that holds samples of this rank (each with its own autograd graph)
        when ``chunked``, else one for the whole part (chunk ``None``)."""
        assert self.model is not None
        with torch.enable_grad():
            if not chunked:
                return [(None, part.offset, forward(self.model, data))]
            return [(chunk, part.offset + start, forward(self.model, _rows(data, start, stop)))
                    for chunk, start, stop in part.local_chunks()]

    def _degenerate_labels(self, comm: Communicator, outputs: list[tuple[int | None, int, Any]],
                           label: torch.Tensor) -> str | None:
        """Why the labels cannot rank channels: the default L1 loss compares the output with labels that are the
        output itself, or that do not follow it at all (the reference's example uses ``torch.randn(
        output.size())``). Decided from sums over the union of every rank's samples of the pass, the same way on
        every rank and in one process."""
        if self.loss_func is not None:
            return None
        sums = torch.zeros(8, dtype=torch.float64)
        found = [primary_output(output)[0] for _, _, output in outputs]
        if all(tensor is not None for tensor in found):
            output = torch.cat([tensor.detach() for tensor in found])  # type: ignore[union-attr]
            if label.shape == output.shape and not label.is_complex() and not output.is_complex():
                x = output.flatten().double()
                y = label.detach().flatten().to(x.device, torch.float64)
                sums = torch.stack([torch.ones((), dtype=torch.float64, device=x.device),
                                    torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
                                    x.sum(), y.sum(), x.square().sum(), y.square().sum(), (x * y).sum(),
                                    (x - y).square().sum()]).cpu()
        ranks, n, sx, sy, sxx, syy, sxy, sdd = comm.sum(sums).tolist()
        if ranks < comm.size or n < 8:
            return None  # not compared with output-shaped labels everywhere, or too few values to tell
        if sdd <= OWN_OUTPUT_TOLERANCE ** 2 * sxx:
            return ("the labels equal the model's own outputs (to rounding), so the L1 loss against them is 0 and "
                    "its gradient is nothing or rounding noise")
        var_x, var_y, covariance = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
        if var_x <= 1e-12 * sxx or var_y <= 1e-12 * syy:
            return None  # constant outputs or labels: the gradient decides
        correlation = covariance / math.sqrt(var_x * var_y)
        if abs(correlation) < UNRELATED_LABEL_CORRELATION:
            return (f"the labels look unrelated to the model's outputs (correlation {correlation:+.3f}, e.g. "
                    "random labels as in the reference's example), so an L1 loss against them ranks channels on "
                    "noise")
        return None

    def _loss_terms(self, outputs: list[tuple[int | None, int, Any]], label: torch.Tensor, uses: _Uses,
                    params: list[torch.nn.Parameter]) -> tuple[Any, ...] | dict[int, torch.Tensor]:
        """This rank's part of one pass's terms, for the loss averaged over this rank's samples: each group's
        per-channel terms, or (element-wise across ranks, whose terms need the union's gradient) the
        gradients."""
        comm = Communicator.current()
        with torch.enable_grad():
            if outputs[0][0] is None:
                output = outputs[0][2]
            else:  # chunks come with the default loss only, which reads the primary output alone
                output = torch.cat([primary_output(chunk)[0] for _, _, chunk in outputs])  # type: ignore[misc]
            loss = self._loss(output, label)
            if not bool(torch.isfinite(loss)):
                raise DataError(f"the loss on the calibration data is {loss.item()}; check the data and labels for "
                                "NaN/Inf or values the loss cannot take")
            if not (self.elementwise and comm.distributed):
                return self._streamed_terms(uses, params, loss)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        self._check_finite(params, grads)
        return grads

    def _union_terms(self, comm: Communicator, part: _Pass, uses: _Uses, params: list[torch.nn.Parameter],
                     found: tuple[Any, ...] | dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Each group's per-channel terms of one pass for the loss averaged over the union of the ranks' samples:
        each rank's part counts by its share of the samples, and the absolute value (or square) comes after the
        sum over the ranks."""
        if isinstance(found, dict):
            if not comm.distributed:
                return found
            groups = list(found)
            return dict(zip(groups, _summed(comm, [found[group] * part.share for group in groups])))
        # |w * g| per weight is not linear in g: the union's gradient itself is needed (a full all-reduce).
        return self._terms(uses, params, _summed_gradients(comm, params, found, part.share))

    def _add_label_free(self, squares: dict[int, torch.Tensor], uses: _Uses, params: list[torch.nn.Parameter],
                        part: _Pass, data: Any, given: list[tuple[int | None, int, Any]] | None) -> None:
        """Add one pass's label-free terms, squared and summed over its chunks (see the module docs), to
        ``squares``: from the outputs ``given`` when they were computed in the chunks, else from a forward of
        ``data``."""
        comm = Communicator.current()
        step = f"{type(self).__name__}: label-free pass {part.index}"
        # Every rank runs this step (with or without a forward), so the collectives stay in step.
        outputs = comm.run(step, lambda: given if given is not None and given[0][0] is not None
                           else self._forward(data, part, True))
        by_chunk = {chunk: (first, output) for chunk, first, output in outputs}
        chunks = range(len(part.bounds) - 1)
        if self.elementwise and comm.distributed:
            # |w * g| per weight: each chunk's gradient is summed over the ranks before the absolute values.
            for chunk in chunks:
                held = by_chunk.pop(chunk, None)
                grads = comm.run(step, partial(self._projection_gradients, part, held, params, True))
                grads = _summed_gradients(comm, params, grads, 1.0)
                for group, term in self._terms(uses, params, grads).items():
                    squares[group] += term.pow(2)
                del grads  # before the next chunk's backward: one set of gradients at a time
            return

        def local_terms() -> list[dict[int, torch.Tensor]]:
            """This rank's part of each chunk's terms."""
            found = []
            for chunk in chunks:
                held = by_chunk.pop(chunk, None)
                found.append(self._terms(uses, params, (None,) * len(params)) if held is None else
                             self._streamed_terms(uses, params, self._projection(part, held)))
            return found

        found = comm.run(step, local_terms)
        groups = list(squares)
        stacked = [torch.stack([terms[group] for terms in found]) for group in groups]  # (chunks, channels) each
        for group, terms in zip(groups, _summed(comm, stacked) if comm.distributed else stacked):
            squares[group] += terms.pow(2).sum(dim=0)

    def _projection_gradients(self, part: _Pass, held: tuple[int, Any] | None, params: list[torch.nn.Parameter],
                              check: bool = False) -> tuple[Any, ...]:
        """The gradient of ``sum_n r_n . f_n / N`` over this rank's samples of one chunk (``held``: the index of
        the first in the union, and their output), with each sample's own random direction ``r_n``; ``None``s
        when this rank holds none of the chunk. ``check``: raise on a NaN or Inf gradient."""
        if held is None:
            return (None,) * len(params)
        with torch.enable_grad():
            grads = torch.autograd.grad(self._projection(part, held), params, allow_unused=True)
        if check:
            self._check_finite(params, grads)
        return grads

    def _projection(self, part: _Pass, held: tuple[int, Any]) -> torch.Tensor:
        """``sum_n r_n . f_n / N`` over this rank's samples of one chunk (``held``: the index of the first in the
        union, and their output), with each sample's own random direction ``r_n``."""
        first, output = held
        tensor, _ = primary_output(output)
        if tensor is None:
            raise DataError(f"the model returns a {type(output).__name__} holding no tensor, so its output "
                            "cannot be projected for the label-free scores; pass a loss_func and labels that "
                            "rank the channels, or pick a gradient-free sensitivity such as "
                            "BalancedL2NormSensitivity")
        directions = torch.stack([torch.randn(tensor.shape[1:], generator=_generator(self.seed, part.index, n))
                                  for n in range(first, first + tensor.shape[0])])
        with torch.enable_grad():
            projected: torch.Tensor = (tensor * directions.to(tensor.device, tensor.dtype)).sum() / part.total
        return projected

    def _check_finite(self, params: list[torch.nn.Parameter], grads: tuple[Any, ...]) -> None:
        """A NaN or Inf gradient would turn every score it touches into noise: say where it is instead."""
        assert self.model is not None
        for param, grad in zip(params, grads):
            if grad is not None and not bool(torch.isfinite(grad).all()):
                name = next((n for n, p in self.model.named_parameters() if p is param), "a parameter")
                raise DataError(f"the gradient on the calibration data is NaN or Inf at {name}; the model's "
                                "forward pass is not differentiable there on this data (e.g. sqrt or log of 0, a "
                                "division by 0); fix the model or the data, or pick a gradient-free sensitivity "
                                "such as BalancedL2NormSensitivity")

    def _slices(self, record: SearchRecord) -> list[tuple[ParamSlice, torch.nn.Parameter]]:
        """The group's parameter slices that exist (a layer without bias has no bias slice)."""
        assert self.model is not None and self.graph is not None
        found = []
        for piece in self.graph.param_slices(self.graph.group(record.group_id)):
            param = getattr(self.model.get_submodule(piece.module), piece.param, None)
            if isinstance(param, torch.nn.Parameter):
                found.append((piece, param))
        return found

    def _terms(self, uses: _Uses, params: list[torch.nn.Parameter],
               grads: tuple[Any, ...]) -> dict[int, torch.Tensor]:
        """Each group's per-channel ``sum(w * g)`` over its parameter slices (signed), or ``sum(|w * g|)`` when
        ``elementwise`` (float64 on the CPU; nothing where ``g`` is ``None``)."""
        terms = {group: torch.zeros(channels, dtype=torch.float64) for group, channels in uses.channels.items()}
        buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        for param, grad in zip(params, grads):
            if grad is not None:
                self._add_terms(terms, uses, param, grad, buffers)
        return terms

    def _streamed_terms(self, uses: _Uses, params: list[torch.nn.Parameter],
                        target: torch.Tensor) -> dict[int, torch.Tensor]:
        """:meth:`_terms` of the gradient of ``target``, each parameter's terms taken as soon as its gradient is
        ready and the gradient dropped then: a backward pass holds a few parameters' gradients at a time, not one
        for every weight (as much memory as the model). Raises where a NaN or Inf gradient made them
        non-finite."""
        terms = {group: torch.zeros(channels, dtype=torch.float64) for group, channels in uses.channels.items()}
        buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        broken: list[tuple[torch.Tensor, torch.Tensor]] = []

        def take(param: torch.Tensor) -> None:
            grad, param.grad = param.grad, None
            if grad is not None and not self._add_terms(terms, uses, param, grad, buffers):
                broken.append((param, grad))

        # The user's own post-accumulate hooks (an optimizer stepping inside backward) stay out of this pass.
        saved = [(param, param.grad, param._post_accumulate_grad_hooks) for param in params]
        handles = []
        try:
            for param in params:
                param.grad = None
                param._post_accumulate_grad_hooks = None  # type: ignore[assignment]
                handles.append(param.register_post_accumulate_grad_hook(take))
            torch.autograd.backward(target, inputs=params)
        finally:
            for handle in handles:
                handle.remove()
            for param, grad, hooks in saved:
                param.grad = grad
                param._post_accumulate_grad_hooks = hooks
        if broken:
            self._check_finite([cast(torch.nn.Parameter, p) for p, _ in broken],
                               tuple(g for _, g in broken))  # a NaN gradient, named
            raise DataError("the first-order terms on the calibration data are NaN or Inf (the gradient times the "
                            "weights overflows); check the model's weights and the data")
        return terms

    def _add_terms(self, terms: dict[int, torch.Tensor], uses: _Uses, param: torch.Tensor,
                   grad: torch.Tensor, buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor]) -> bool:
        """Add one parameter's part of :meth:`_terms` to ``terms``; whether that part is finite."""
        # Every product goes into one buffer: on a CPU a fresh parameter-sized tensor for each costs about as much
        # as the product itself. Products and their sums are at least float32: a bfloat16 sum over thousands of
        # entries would round them.
        key = (torch.promote_types(grad.dtype, torch.float32), grad.device)
        if key not in buffers:
            buffers[key] = torch.empty(uses.largest, dtype=key[0], device=grad.device)
        product = buffers[key][:param.numel()].view(param.shape)
        torch.mul(param.detach(), grad, out=product)  # once per parameter, for every slice that reads it
        if self.elementwise:
            product.abs_()
        # First the sums over the dimensions no slice keeps (a kernel's), then each slice's own.
        product = _sum_all_but(product, uses.kept[id(param)])
        reduced: dict[frozenset[int], torch.Tensor] = {}
        finite = True
        for group, piece in uses.of[id(param)]:
            kept = _kept(piece)
            if kept not in reduced:
                reduced[kept] = _sum_all_but(product, kept)
            part = piece.per_channel(reduced[kept], uses.channels[group]).double().cpu()
            finite = finite and bool(torch.isfinite(part).all())
            terms[group] += part
        return finite


class _Uses:
    """Which channel groups each parameter is tied to, and by which slice."""

    def __init__(self, records: list[SearchRecord], slices: Slices) -> None:
        self.channels = {r.group_id: r.channels for r in records}
        self.of: dict[int, list[tuple[int, ParamSlice]]] = {}
        #: The dimensions of each parameter that some slice's per-channel sums keep apart.
        self.kept: dict[int, frozenset[int]] = {}
        self.params: list[torch.nn.Parameter] = []
        for record in records:
            for piece, param in slices[record.group_id]:
                if id(param) not in self.of:
                    self.of[id(param)] = []
                    self.kept[id(param)] = frozenset()
                    self.params.append(param)
                self.of[id(param)].append((record.group_id, piece))
                self.kept[id(param)] |= _kept(piece)
        self.largest = max((p.numel() for p in self.params), default=0)


class _Pass:
    """One calibration pass as one process would see it: the union of every rank's part of it, in rank order.

    Knows this rank's place in the union and the chunks of the label-free estimate (ranges of the union's
    sample indices, so that they do not depend on how the samples are spread over the ranks).
    """

    def __init__(self, comm: Communicator, index: int, samples: int) -> None:
        counts = [int(row[0]) for row in comm.each([float(samples)])]
        self.index = index
        self.samples = samples
        self.total = sum(counts)
        self.offset = sum(counts[:comm.rank])
        chunks = max(1, min(FALLBACK_CHUNKS, -(-self.total // CHUNK_SAMPLES)))
        self.bounds = [chunk * self.total // chunks for chunk in range(chunks + 1)]

    @property
    def share(self) -> float:
        """This rank's share of the pass's samples (1 in a single process)."""
        return self.samples / self.total if self.total else 1.0

    def local_chunks(self) -> list[tuple[int, int, int]]:
        """``(chunk, start, stop)`` for each chunk holding samples of this rank: its rows ``start:stop``."""
        found = []
        for chunk, (low, high) in enumerate(zip(self.bounds, self.bounds[1:])):
            start, stop = max(low, self.offset), min(high, self.offset + self.samples)
            if start < stop:
                found.append((chunk, start - self.offset, stop - self.offset))
        return found


def _kept(piece: ParamSlice) -> frozenset[int]:
    """The dimensions of its parameter that a slice's per-channel sums keep apart (the rest they add up)."""
    return frozenset({0, 1}) if piece.groups > 1 else frozenset({piece.dim})  # a grouped input: both


def _sum_all_but(product: torch.Tensor, kept: frozenset[int]) -> torch.Tensor:
    """``product`` summed over every dimension but ``kept`` (keeping them, of size 1): the per-channel sums of a
    slice are the same from it, without copying the parameter-sized tensor into the slice's layout."""
    dims = [d for d in range(product.dim()) if d not in kept and product.shape[d] > 1]
    return product.sum(dim=dims, keepdim=True) if dims else product


def _zeros(records: list[SearchRecord]) -> dict[int, torch.Tensor]:
    return {r.group_id: torch.zeros(r.channels, dtype=torch.float64) for r in records}


def _samples(label: torch.Tensor) -> int:
    return int(label.shape[0]) if label.dim() else 1


def _rows(data: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a pass's data: a tensor, or tuples, lists and dicts of them."""
    return map_tensors(data, lambda tensor: tensor[start:stop] if tensor.dim() else tensor)


def _generator(seed: int, index: int, sample: int) -> torch.Generator:
    """The generator of one sample's random direction: from the seed, the pass and the sample's index in the
    union of the ranks' samples (the same on every rank, whichever rank holds the sample)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + index) * 1_000_000_007 + sample) % 2 ** 63)


def _summed(comm: Communicator, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed over the ranks, with one all-reduce for them all."""
    if not tensors:
        return []
    flat = comm.sum(torch.cat([t.reshape(-1) for t in tensors]))
    return [piece.reshape(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _summed_gradients(comm: Communicator, params: list[torch.nn.Parameter], grads: tuple[Any, ...],
                      weight: float) -> tuple[Any, ...]:
    """The ranks' gradients, each weighted by ``weight``, summed over the ranks (as they are in one process)."""
    if not comm.distributed:
        return grads
    return tuple(comm.sum((g if g is not None else torch.zeros_like(p)) * weight) for p, g in zip(params, grads))


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
    and depth compare on relative importance (``normalize="mean"`` by default)."""

    class Options(TaylorLossSensitivity.Options):
        """The options of :class:`NormalizedTaylorSensitivity`: those of :class:`TaylorLossSensitivity`, with
        ``normalize="mean"``."""

        normalize: Normalize = "mean"

    def __init__(self, loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 normalize: Normalize | bool = "mean") -> None:
        super().__init__(loss_func, seed, normalize)


class GroupTaylorSensitivity(TaylorLossSensitivity):
    """Channel importance ``sum(|w * dL/dw|)`` over the parameters tied to the channel (``terms``, below),
    accumulated over the calibration passes and divided by the group's mean: the group Taylor importance of
    Torch-Pruning (Fang et al., "DepGraph", CVPR 2023; its ``GroupTaylorImportance`` with the mean normaliser).
    ``normalize="median"`` then divides by the group's median instead, as ``GroupMagnitudeSensitivity`` does by
    default; ``normalize="none"`` leaves the sums as they are.

    ``terms`` picks the parameters: ``"dense"`` (the default) takes only the weights of the dense (``groups=1``)
    Conv, ConvTranspose and Linear layers tied to the channel (the producers' filters and the consumers' columns),
    the terms Torch-Pruning 1.6 sums (its biases are off by default, and it skips norms and depthwise filters), so
    the scores are exactly its own; a group without such a weight keeps all its terms. ``"all"`` also takes the
    biases and the followers' parameters (norm scales and shifts, depthwise filters).

    Unlike :class:`TaylorLossSensitivity`, which takes the absolute value of the channel's summed first-order
    change, terms of opposite sign do not cancel: a channel whose weights each matter to the loss scores high
    even when their effects happen to offset. With ``GlobalRankSearch`` and the re-fit, ``bench/quality.py``
    measures it at or above every other method after fine-tuning, within the noise, in all its rows, and below
    ``GroupMagnitudeSensitivity`` before fine-tuning at 2x and 3x (see docs/benchmarks/quality.md).
    Across ``torch.distributed`` ranks the gradients themselves are summed before the absolute values (on the
    label-free path, each chunk's), so the scores equal those of one process on the union of the shards.
    """

    class Options(TaylorLossSensitivity.Options):
        """The options of :class:`GroupTaylorSensitivity`: ``seed``, ``normalize`` (``"mean"`` by default) and
        ``terms`` (see the class docs)."""

        normalize: Normalize = "mean"
        terms: Literal["all", "dense"] = "dense"

    options: GroupTaylorSensitivity.Options
    elementwise = True

    def __init__(self, loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 normalize: Normalize | bool = "mean", terms: Literal["all", "dense"] = "dense") -> None:
        self._configure(loss_func, seed=seed, normalize=normalize, terms=terms)
        self.terms = self.options.terms

    def _slices(self, record: SearchRecord) -> list[tuple[ParamSlice, torch.nn.Parameter]]:
        """The group's parameter slices: all of them, or with ``terms="dense"`` the dense layers' weights."""
        found = super()._slices(record)
        if self.terms == "all":
            return found
        assert self.model is not None
        dense = [(piece, param) for piece, param in found
                 if piece.param == "weight" and _is_dense(self.model.get_submodule(piece.module))]
        return dense or found



def _is_dense(module: torch.nn.Module) -> bool:
    """A Conv or ConvTranspose of one group, or a Linear layer."""
    return isinstance(module, torch.nn.Linear) or (
        isinstance(module, torch.nn.modules.conv._ConvNd) and module.groups == 1)


class OutputChangeSensitivity(TaylorLossSensitivity):
    """Label-free channel importance: the expected first-order change of the model's output along a random
    direction when the channel goes, ``sqrt(E_r[(r . J w_c)^2])`` over random output projections ``r``, estimated
    with one random direction per sample in up to 8 chunks per pass, of two samples or more (see the module docs;
    it is the score :class:`TaylorLossSensitivity` falls back to when the loss gives nothing). It measures how
    much the channel moves the output, whatever the labels, so it does not fade when the model already fits the
    calibration data. It costs about one forward and backward pass over the calibration data.
    """

    def get_sensitivity(self, search_records: list[SearchRecord]) -> None:
        """Set ``record.sensitivity`` for every record (see the class docs)."""
        assert self.model is not None and self.graph is not None, "setup_initialization was not called"
        uses, params = self._prepare(search_records)
        comm = Communicator.current()
        squares = _zeros(search_records)
        batches = self.calibration_batches()
        for index, (data, label) in enumerate(progress(batches, f"{type(self).__name__}: label-free passes",
                                                       len(batches))):
            self._add_label_free(squares, uses, params, _Pass(comm, index, _samples(label)), data, None)
        for record in search_records:
            record.sensitivity = self._normalized(squares[record.group_id].sqrt())
