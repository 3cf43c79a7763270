"""The ``acps`` command line (``acps search``, ``prune``, ``restore``, ``export``, ``explain``, ``plugins``,
``demo``)."""

from acps_core.cli.main import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, build_parser, main

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]
