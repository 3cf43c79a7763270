"""What a search decided, for people and programs: the ``SearchResult``, the Markdown and JSON reports beside the
config, the explanations of every layer left alone, and the figure."""

from acps_core.report.documents import (
    JSON_SUFFIX,
    LEFT_ALONE_STATUSES,
    MARKDOWN_SUFFIX,
    REPORT_FORMAT,
    explain_text,
    left_alone_text,
    read_report,
    render_reports,
    report_data,
    report_json,
    report_markdown,
    report_paths,
)

__all__ = [
    "JSON_SUFFIX",
    "LEFT_ALONE_STATUSES",
    "MARKDOWN_SUFFIX",
    "REPORT_FORMAT",
    "explain_text",
    "left_alone_text",
    "read_report",
    "render_reports",
    "report_data",
    "report_json",
    "report_markdown",
    "report_paths",
]
