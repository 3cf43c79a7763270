"""The table ``acps plugins`` prints: every installed method, where it comes from, its options, and the plugins
that did not load."""

from __future__ import annotations

from typing import TYPE_CHECKING

from acps_core.methods.options import options_model, options_signature

if TYPE_CHECKING:
    from acps_core.methods.registry import Registry

__all__ = ["format_plugins_table"]


def format_plugins_table(registry: Registry) -> str:
    """The text ``acps plugins`` prints: each method with its class and distribution, then the options of the
    methods that declare them (name, type, bounds, default), then the plugins that were skipped."""
    header = ("kind", "name", "class", "distribution", "version")
    methods = registry.methods()
    rows = [(m.kind, m.name, m.class_path, m.distribution, m.version or "-") for m in methods]
    lines: list[str] = []
    if rows:
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip())
        lines.append("  ".join("-" * width for width in widths))
        lines.extend("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)
    else:
        lines.append("No acps methods are installed.")
    options = [(m.name, options_model(m.cls)) for m in methods]
    declared = [(name, model) for name, model in options if model is not None and model.model_fields]
    if declared:
        lines.append("")
        lines.append("Options (select a method with options as Name(option=value, ...)):")
        lines.extend(f"  {name}({options_signature(model)})" for name, model in declared)
    failures = registry.failures
    if failures:
        lines.append("")
        lines.append("Plugins not loaded:")
        for failure in failures:
            status = "disabled" if failure.disabled else "failed"
            version = f" {failure.version}" if failure.version else ""
            reason = failure.reason.replace("\n", "\n      ")  # keep multi-line reasons inside the entry
            lines.append(f"  {failure.plugin} ({failure.distribution}{version}): {status}: {reason}")
    return "\n".join(lines) + "\n"
