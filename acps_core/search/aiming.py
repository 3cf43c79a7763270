"""Aiming by measurement: the search's choice is timed, and the search is aimed again until what is measured is the
target.

A cost model that measures (``MeasuredLatency``) predicts a pruned model's time from tables of its layers timed
alone and from what the whole model adds to them. On many real networks such a prediction is off by 10-30 %: the
layers run differently inside the model than alone (caches, fused kernels, per-op dispatch that does not shrink),
so a search that stops at the predicted target delivers more or less than asked. When the gain estimator can time
whole models (:meth:`~acps_core.methods.bases.GainEstimatorBase.measure_speedup`), the search's choice is cut out
of a copy of the model and timed against the model. Where the measured speed-up misses the target by more than
``TOLERANCE``, the search runs again aiming at the predicted ratio that the measurements say delivers the target
(first the predicted ratio scaled by target over measured, then the secant through two timings in log-log, once
there are timings on both sides of the target between them), at most ``ROUNDS`` times. Of the choices timed, the
one kept is the least pruned that measured at least the target (within ``TOLERANCE``), or else the fastest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from acps_core.errors import PluginError
from acps_core.graph.model import ChannelGraph
from acps_core.methods.bases import GainEstimatorBase
from acps_core.prune.copying import copy_sharing_tensors
from acps_core.prune.slicing import prune_channels
from acps_core.search.problem import Decision

logger = logging.getLogger(__name__)

#: How many choices are timed at most (the first search's included).
ROUNDS = 4
#: A measured speed-up this close to the target (relative) ends the aiming.
TOLERANCE = 0.03


@dataclass
class Aimed:
    """A choice that was timed: its measured and predicted speed-ups, and how many choices were timed."""

    decision: Decision
    measured: float
    predicted: float
    rounds: int = 1

    def note(self, target: float) -> str:
        """What the result says about it."""
        return (f"measured speed-up of the chosen channels: {self.measured:.3f}x (target {target:g}x; the cost "
                f"model predicted {self.predicted:.3f}x for them; {self.rounds} choice(s) timed)")


def aim_by_measurement(model: nn.Module, graph: ChannelGraph, sample: Any, estimator: GainEstimatorBase,
                       target: float, first: Decision, completed: Callable[[Decision], dict[int, list[int]]],
                       predicted: Callable[[Decision], float], search_at: Callable[[float], Decision]
                       ) -> Aimed | None:
    """Time ``first`` and search again until the measured speed-up is ``target`` (see the module docs).

    Args:
        model: the unpruned model, in eval mode (not changed: the choices are cut out of copies).
        graph: its channel graph.
        sample: what the model is timed on.
        estimator: the gain estimator; nothing is timed when its ``measure_speedup`` returns None.
        target: the speed-up asked for.
        first: the search's choice.
        completed: a choice with the groups the search did not decide filled in (overrides, skips).
        predicted: the cost model's predicted speed-up of a choice.
        search_at: the search's choice when it aims at a predicted ratio.

    Returns:
        The choice kept, or None when the estimator does not measure.
    """
    timed: list[Aimed] = []
    decision = first
    for _ in range(ROUNDS):
        pruned = copy_sharing_tensors(model)
        prune_channels(pruned, graph, completed(decision))
        measured = _measured(estimator, model, pruned, sample)
        del pruned
        if measured is None:
            return None
        timed.append(Aimed(decision, measured, predicted(decision)))
        logger.info("measured speed-up %.3fx for a predicted %.3fx (target %gx)", measured, timed[-1].predicted,
                    target)
        if abs(measured / target - 1) <= TOLERANCE:
            break
        aim = _next_aim(timed, target)
        if any(abs(t.predicted / aim - 1) < 1e-3 for t in timed):
            break  # the search cannot land anywhere else
        decision = search_at(aim)
    kept = _kept(timed, target)
    kept.rounds = len(timed)
    return kept


def _kept(timed: list[Aimed], target: float) -> Aimed:
    """The choice kept of those timed: the least pruned that measured the target, else the fastest."""
    reaching = [t for t in timed if t.measured >= target * (1 - TOLERANCE)]
    return min(reaching, key=lambda t: t.measured) if reaching else max(timed, key=lambda t: t.measured)


def _measured(estimator: GainEstimatorBase, model: nn.Module, pruned: nn.Module, sample: Any) -> float | None:
    """The estimator's measured speed-up, checked.

    Raises:
        PluginError: naming the estimator, when it raised or returned something other than None or a positive
            finite number.
    """
    name = type(estimator).__name__
    try:
        measured = estimator.measure_speedup(model, pruned, sample)
    except Exception as exc:
        raise PluginError(f"gain estimator {name} raised {type(exc).__name__} in measure_speedup(): {exc}") from exc
    if measured is None:
        return None
    if isinstance(measured, bool) or not isinstance(measured, (int, float)) or not math.isfinite(measured) \
            or measured <= 0:
        raise PluginError(f"gain estimator {name} returned {measured!r} from measure_speedup(); it must return a "
                          "positive finite speed-up, or None when it does not measure")
    return float(measured)


def _next_aim(timed: list[Aimed], target: float) -> float:
    """The predicted ratio expected to measure ``target``. With choices timed on both sides of the target, the
    line in log-log through the closest one on each side (measured speed-ups often grow as a power of the
    predicted ones), which stays between them; before that, the last prediction scaled by target over measured,
    then the line through the last two timings. Never below 1 (no pruning) nor past the side of a timed choice
    that measured the target already."""
    below = [t for t in timed if t.measured < target]
    above = [t for t in timed if t.measured >= target]
    if below and above:
        low = max(below, key=lambda t: t.measured)
        high = min(above, key=lambda t: t.measured)
        return _through(low, high, target) or math.sqrt(low.predicted * high.predicted)
    last = timed[-1]
    aim = (_through(timed[-2], last, target) if len(timed) >= 2 else None) or last.predicted * target / last.measured
    return max(aim, 1 + (min(t.predicted for t in timed) - 1) / 2 if above else 1.0)


def _through(first: Aimed, second: Aimed, target: float) -> float | None:
    """Where the line through two timings in log-log (predicted, measured) measures ``target``; None when they do
    not rise together."""
    rise = math.log(second.measured) - math.log(first.measured)
    run = math.log(second.predicted) - math.log(first.predicted)
    if abs(run) < 1e-9 or rise / run < 0.1:
        return None
    return math.exp(math.log(second.predicted) + (math.log(target) - math.log(second.measured)) * run / rise)
