"""The version of acps-core: the one string the package metadata, the CLI and the written files give."""

__version__ = "0.1.0"
