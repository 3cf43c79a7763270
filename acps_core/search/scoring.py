"""Scoring the channels: running the sensitivity method, checking what it returns, and making the scores the same
on every rank of a distributed search."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from acps_core._util.data import is_reference_form
from acps_core._util.distributed import Communicator
from acps_core._util.model_checks import explain_in_place_failure
from acps_core.errors import AcpsError, PluginError
from acps_core.graph.model import ChannelGraph
from acps_core.graph.trace import trace_sample
from acps_core.methods.bases import SensitivityBase
from acps_core.search.problem import SearchRecord


def score(method: SensitivityBase, model: nn.Module, graph: ChannelGraph, calibration: list[Any],
          test_iteration: int, records: list[SearchRecord]) -> None:
    """Run the sensitivity method over the calibration data and check the score it set on each record.

    Raises:
        PluginError: the method raised, or left a record without scores, with the wrong number of scores, or with
            scores that are not finite and >= 0.
        DataError: the model's forward pass writes in place to a tensor autograd needs (the model's fault, not
            the method's).
    """
    name = type(method).__name__
    try:
        method.setup_initialization((model, graph), calibration, test_iteration, output_nodes=graph.output_layers)
        returned = method.get_sensitivity(records)
    except AcpsError:
        raise
    except Exception as exc:
        # An in-place operation in the model's forward pass fails in the method's backward pass: the model's
        # fault when a plain forward and backward pass on the first samples fails the same way.
        data = calibration[0] if is_reference_form(calibration) else calibration[0][0]
        in_place = explain_in_place_failure(model, trace_sample(data), exc)
        if in_place is not None:
            raise in_place from exc
        raise PluginError(f"sensitivity method {name} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(returned, dict):
        for record in records:
            if record.name in returned:
                record.sensitivity = returned[record.name]
    for record in records:
        if record.sensitivity is None:
            raise PluginError(f"sensitivity method {name} set no score for group {record.name}; get_sensitivity "
                              "must set record.sensitivity on every record")
        scores = torch.as_tensor(record.sensitivity, dtype=torch.float64).flatten().cpu()
        if scores.numel() != record.channels:
            raise PluginError(f"sensitivity method {name} gave {scores.numel()} scores for group {record.name}, "
                              f"which has {record.channels} channels")
        if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
            raise PluginError(f"sensitivity method {name} gave NaN, infinite or negative scores for group "
                              f"{record.name}; scores must be finite and >= 0")
        record.sensitivity = scores


def same_scores_everywhere(comm: Communicator, records: list[SearchRecord]) -> bool:
    """Make every rank's scores the same: methods that combine their statistics across ranks (every built-in
    method does) give identical scores; others (a plugin's own) are averaged. Returns whether any had to be
    averaged."""
    if not comm.distributed:
        return False
    averaged = False
    for record in records:
        scores = torch.as_tensor(record.sensitivity, dtype=torch.float64)
        if not comm.same_everywhere(scores):
            record.sensitivity = comm.sum(scores) / comm.size
            averaged = True
    return averaged
