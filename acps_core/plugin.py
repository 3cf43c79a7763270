"""Everything a plugin needs from acps, in one module.

A plugin package imports ``acps_core`` (the public API and the error classes) and this module, nothing else of
acps's, so acps can rearrange its insides without breaking plugins::

    from acps_core import ArgumentError
    from acps_core.plugin import SensitivityBase, SearchRecord, forward, hookimpl

What is here:

- the three bases a method subclasses (:class:`SensitivityBase`, :class:`SearchChannelBase`,
  :class:`GainEstimatorBase`), :data:`hookimpl` and :class:`Register` for the registration hooks;
- :class:`MethodOptions`, the base of a method's ``Options`` model (its options, validated, printed and
  recorded in the report; see :mod:`acps_core.methods.options`), and :class:`MethodOptionsError`, which it raises;
- what the methods receive: :class:`SearchRecord` (one channel group to score or cut), :class:`GraphInfo` (the
  model's cost for any kept counts, the budget), :class:`PruneSearchConfig`, :class:`LayerGeometry` (one layer's
  traced shapes, for a cost model), :class:`ChannelGraph` and :class:`ParamSlice` (where a group's channels sit
  in the parameters), and the search helpers: :func:`descend` (one cut at a time, see
  :mod:`acps_core.search.descent`), :func:`give_back` and :func:`masks_for`;
- running the model: :func:`forward` (any input form), :func:`trace_sample`, :func:`to_device`,
  :func:`tensors_in` and :func:`map_tensors` (the tensors of any nested input or output),
  :func:`masked_channels` (a forward pass with channels zeroed), :func:`channel_atoms`;
- the default loss: :func:`default_loss` and :func:`primary_output` (the tensor a dict or tuple output is
  scored on);
- :func:`get_registry` (which methods are installed, from which distribution: for a plugin's tests);
- :func:`progress` (a progress bar that ``--quiet`` turns off), :class:`Communicator` (the ranks of a
  distributed search), :func:`read_bytes` and :func:`atomic_write_text` (a plugin's own files, read bounded
  and written atomically).
"""

from __future__ import annotations

from acps_core._util.atomic import atomic_write_text
from acps_core._util.data import default_loss, forward, primary_output, to_device
from acps_core._util.distributed import Communicator
from acps_core._util.progress import progress
from acps_core._util.reading import read_bytes
from acps_core._util.tensors import map_tensors, tensors_in
from acps_core.graph.masking import masked_channels
from acps_core.graph.model import ChannelGraph, LayerGeometry, ParamSlice, channel_atoms
from acps_core.graph.trace import trace_sample
from acps_core.methods.bases import GainEstimatorBase, SearchChannelBase, SensitivityBase
from acps_core.methods.hookspecs import Register, hookimpl
from acps_core.methods.options import MethodOptions, MethodOptionsError
from acps_core.methods.registry import get_registry
from acps_core.search.descent import Cut, descend, next_cut
from acps_core.search.problem import GraphInfo, PruneSearchConfig, SearchRecord, give_back, masks_for

__all__ = [
    "ChannelGraph",
    "Communicator",
    "Cut",
    "GainEstimatorBase",
    "GraphInfo",
    "LayerGeometry",
    "MethodOptions",
    "MethodOptionsError",
    "ParamSlice",
    "PruneSearchConfig",
    "Register",
    "SearchChannelBase",
    "SearchRecord",
    "SensitivityBase",
    "atomic_write_text",
    "channel_atoms",
    "default_loss",
    "descend",
    "forward",
    "get_registry",
    "give_back",
    "hookimpl",
    "map_tensors",
    "masked_channels",
    "masks_for",
    "next_cut",
    "primary_output",
    "progress",
    "read_bytes",
    "tensors_in",
    "to_device",
    "trace_sample",
]
