"""The report's figure, ``<output_cfg>.report.png``: what the search kept, how the scores split, and the path.

Three panels: the share of output channels each Conv/Linear layer keeps (by status); the distribution of the
channels' sensitivity, each over its group's mean, kept against removed; and the path to the decision, the
share of the total sensitivity given up against the model's cost, cheapest cuts first, with the target cost.
Needs matplotlib (``pip install 'acps-core[report]'``). ``acps search`` and ``acps demo`` write it; from Python,
call :func:`write_figure` with the search's result (rendering takes a moment, so the search itself does not).
"""

from __future__ import annotations

import io
from pathlib import Path

from acps_core._util.atomic import StrPath, atomic_write_bytes
from acps_core.errors import AcpsError
from acps_core.report.result import SearchResult

_COLORS = {"searched": "#3b75af", "override": "#ef8636", "skip": "#9a9a9a", "unprunable": "#c8c8c8"}


def figure_path(output_cfg: StrPath) -> Path:
    """Where the figure of the search that wrote ``output_cfg`` goes."""
    path = Path(output_cfg)
    return path.with_name(path.name + ".report.png")


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render_figure(result: SearchResult) -> bytes | None:
    """The PNG of the figure (see the module docs), or None when matplotlib is not installed."""
    if not available():
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, no display needed

    figure = Figure(figsize=(15, 4.6), dpi=100, layout="constrained")
    kept_axes, score_axes, path_axes = figure.subplots(1, 3, width_ratios=(1.5, 1, 1))
    layers = [layer for layer in result.layers.values() if layer.total]
    positions = range(len(layers))
    kept_axes.bar(positions, [layer.kept / layer.total for layer in layers],
                  color=[_COLORS.get(layer.status, "#c8c8c8") for layer in layers], width=0.8)
    kept_axes.set_ylim(0, 1.05)
    kept_axes.set_ylabel("output channels kept (share)")
    kept_axes.set_title("Kept channels per Conv/Linear layer")
    if len(layers) <= 40:
        kept_axes.set_xticks(list(positions), [layer.name for layer in layers], rotation=70, ha="right",
                             fontsize=7)
    else:
        kept_axes.set_xlabel(f"{len(layers)} layers, in model order")
    from matplotlib.patches import Patch

    shown = [Patch(color=color, label=status) for status, color in _COLORS.items()
             if any(layer.status == status for layer in layers)]
    kept_axes.legend(handles=shown, loc="lower left", fontsize=8)

    kept_scores = [value for scores in result.scores.values() for value, kept in scores if kept]
    removed_scores = [value for scores in result.scores.values() for value, kept in scores if not kept]
    if kept_scores or removed_scores:
        top = max(kept_scores + removed_scores)
        bins = [top * i / 30 for i in range(31)] if top > 0 else 30
        score_axes.hist([kept_scores, removed_scores], bins=bins, stacked=True, color=["#3b75af", "#d1495b"],
                        label=[f"kept ({len(kept_scores)})", f"removed ({len(removed_scores)})"])
        score_axes.legend(fontsize=8)
    score_axes.set_xlabel("channel sensitivity / its group's mean")
    score_axes.set_ylabel("channels")
    score_axes.set_title(f"Sensitivity ({result.methods.get('sensitivity', '?')})")

    if result.path:
        costs = [cost for cost, _ in result.path]
        lost = [100 * share for _, share in result.path]
        path_axes.plot(costs, lost, marker=".", color="#3b75af")
        path_axes.plot(costs[-1:], lost[-1:], marker="o", markersize=9, color="#d1495b", label="decision")
    path_axes.axvline(1 / result.compress_ratio, linestyle="--", color="#555555",
                      label=f"target cost (1/{result.compress_ratio:g})")
    path_axes.invert_xaxis()
    path_axes.set_xlabel(f"model cost / original cost ({result.cost_unit})")
    path_axes.set_ylabel("sensitivity given up (% of total)")
    path_axes.set_title("Path to the decision, cheapest cuts first")
    path_axes.legend(fontsize=8)
    figure.suptitle(f"acps search: {result.achieved_ratio:.2f}x of the {result.compress_ratio:g}x target "
                    f"({result.methods.get('search', '?')}, {result.methods.get('gain', '?')})")
    buffer = io.BytesIO()
    # The output set ties the figure to the config and reports written with it.
    metadata = {"Description": f"acps output set {result.output_set}"} if result.output_set else None
    figure.savefig(buffer, format="png", metadata=metadata)
    return buffer.getvalue()


def write_figure(result: SearchResult) -> Path:
    """Write the figure beside ``result.output_cfg`` (atomically) and return its path.

    Raises:
        AcpsError: matplotlib is not installed, or the result names no output_cfg.
        OutputPathError: the file cannot be written.
    """
    if result.output_cfg is None:
        raise AcpsError("the search result names no output_cfg, so there is no folder for its figure")
    picture = render_figure(result)
    if picture is None:
        raise AcpsError("the report's figure needs matplotlib: pip install 'acps-core[report]'")
    path = figure_path(result.output_cfg)
    atomic_write_bytes(path, picture, "the report figure")
    return path
