"""Scoring across ranks with ``torch.distributed``: every rank reaches the decision one process would reach.

When the default process group is initialised (``torchrun``, or ``torch.distributed.init_process_group``) each
rank passes its own shard of the calibration data. acps then:

- traces and checks the model on rank 0's first samples (broadcast), so every rank builds the same graph, as a
  single process would from the first samples of the union;
- combines the sensitivity statistics across ranks where they are computed, so that every built-in method gives
  exactly the scores of one process whose pass ``p`` is every rank's ``p``-th part of its shard, in rank order
  (the union). The Taylor methods all-reduce each pass's signed first-order terms weighted by the shard's size
  before taking the absolute value (or square), with a loss that is a mean over the batch, as the default ones
  are; they decide whether to fall back to the label-free score on sums over the union, and that score draws
  its random directions for the union's samples. ``MeasuredSensitivity`` measures on the union's first samples,
  gathered to every rank. Scores of methods that do not combine them (other plugins) are averaged over the
  ranks, and the result says so;
- runs the search on every rank and keeps rank 0's decision; only rank 0 writes files, and every rank returns
  the same result once they are written.

A failure on one rank must not leave the others waiting in a collective: every step that can fail runs
through :meth:`Communicator.run`, which tells every rank whether any failed, so all raise (the failing rank its
own error, the others a :class:`~acps_core.errors.DistributedError` naming it). Any backend works (gloo on CPU,
nccl on CUDA, hccl on Ascend): collectives run on the device the backend needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from acps_core.errors import DistributedError

T = TypeVar("T")


_CURRENT: ContextVar[Communicator | None] = ContextVar("acps_communicator", default=None)


class Communicator:
    """The ranks of the default process group (or a single process, where every call is a no-op).

    ``enabled=False`` makes it a single process even inside a process group (a search that only one rank
    runs). Methods that combine statistics use :meth:`current`, the communicator of the search running now.
    """

    @classmethod
    def current(cls) -> Communicator:
        """The communicator of the search in progress (see :func:`using`), else one for the default group."""
        return _CURRENT.get() or cls()

    def __init__(self, enabled: bool = True) -> None:
        active = enabled and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if active else 0
        self.size = dist.get_world_size() if active else 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self) -> torch.device:
        """Where collective tensors must live for the backend."""
        backend = str(dist.get_backend()).lower()
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        if backend == "hccl":
            npu = getattr(torch, "npu", None)  # registered by torch_npu
            return torch.device("npu", npu.current_device() if npu is not None else 0)
        return torch.device("cpu")

    def run(self, step: str, fn: Callable[[], T]) -> T:
        """Run this rank's part of a step, then make every rank raise if any rank's part failed."""
        error: Exception | None = None
        result: Any = None
        try:
            result = fn()
        except Exception as exc:  # a Ctrl-C stops the whole job anyway; it is not caught
            if _agreed(exc):
                raise  # every rank already knows (a step inside this one failed): no further collective
            error = exc
        if self.distributed:
            flag = torch.tensor([0.0 if error is None else 1.0], device=self.device())
            dist.all_reduce(flag)
            if float(flag.item()):
                messages: list[Any] = [None] * self.size
                dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
                if error is None:
                    failed = "; ".join(f"rank {rank}: {message}" for rank, message in enumerate(messages) if message)
                    error = DistributedError(f"{step} failed on another rank ({failed}); every rank stops")
                error._acps_agreed = True  # type: ignore[attr-defined]
                raise error
        elif error is not None:
            raise error
        return result  # type: ignore[no-any-return]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over the ranks (a new tensor on ``tensor``'s device and dtype)."""
        if not self.distributed:
            return tensor
        combined = tensor.detach().to(self.device(), copy=True)
        dist.all_reduce(combined)
        return combined.to(tensor.device, tensor.dtype)

    def each(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values`` (the same number of them on every rank), in rank order: one small all-reduce."""
        if not self.distributed:
            return [list(values)]
        slots = torch.zeros(self.size, len(values), dtype=torch.float64)
        slots[self.rank] = torch.tensor(values, dtype=torch.float64)
        return self.sum(slots).tolist()

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (any picklable object; tensors best on the CPU), in rank order."""
        if not self.distributed:
            return [value]
        found: list[Any] = [None] * self.size
        dist.all_gather_object(found, value)
        return found

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        return bool(self.sum(torch.tensor([1.0 if flag else 0.0])).item()) if self.distributed else flag

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        holder: list[Any] = [value if self.rank == 0 else None]
        dist.broadcast_object_list(holder, src=0, device=self.device())
        return holder[0]  # type: ignore[no-any-return]

    def same_everywhere(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is bit for bit the same on every rank."""
        if not self.distributed:
            return True
        high = tensor.detach().double().to(self.device(), copy=True)
        low = -high
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MAX)
        return bool(torch.equal(high, -low))


def _agreed(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, already went through an agreement of every rank."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if getattr(current, "_acps_agreed", False):
            return True
        seen.add(id(current))
        current = current.__cause__  # explicit chaining only: ``raise X from agreed``
    return False


@contextmanager
def using(comm: Communicator) -> Iterator[Communicator]:
    """Make ``comm`` the :meth:`Communicator.current` one inside the block."""
    token = _CURRENT.set(comm)
    try:
        yield comm
    finally:
        _CURRENT.reset(token)
