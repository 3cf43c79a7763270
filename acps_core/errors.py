"""The exceptions acps raises.

Every error acps raises on bad input is an :class:`AcpsError`, so a caller can catch one type. Each subclass
names the kind of input at fault; the message names the input itself (file:line:column, layer name, plugin and
distribution) and says what to do about it.
"""

from __future__ import annotations


class AcpsError(Exception):
    """Base class of every error acps raises on purpose."""


class ConfigError(AcpsError, ValueError):
    """A config file (search config or channel-prune config) is missing, malformed or inconsistent.

    Attributes:
        path: the file at fault, when there is one.
        line: 1-based line in that file, when known.
        column: 1-based column in that line, when known.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        self.path = path
        self.line = line
        self.column = column
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f":{line}"
                if column is not None:
                    where += f":{column}"
            where += ": "
        super().__init__(where + message)


class GraphError(AcpsError):
    """The model cannot be traced or its channel graph is inconsistent (names the layer at fault)."""


class DataError(AcpsError, ValueError):
    """The calibration data does not fit the model (names the tensor and its shape, dtype or device)."""


class PluginError(AcpsError):
    """A plugin could not be found, loaded or used (names the plugin and its distribution)."""


class SearchError(AcpsError):
    """A search method returned a decision acps cannot apply (names the method and the layer)."""


class OutputPathError(AcpsError, OSError):
    """An output path cannot be written (a directory, a missing or read-only folder)."""


class ArgumentError(AcpsError, TypeError):
    """An argument of a public call has the wrong type (names the parameter and what it accepts)."""


class DistributedError(AcpsError):
    """Another rank of a distributed search failed (names the ranks and their errors); every rank raises it."""
