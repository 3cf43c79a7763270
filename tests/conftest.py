"""Shared set-up of the test suite: the run must leave the system temp folder as it found it
(:mod:`tests.support.temp_guard`)."""

from tests.support.temp_guard import pytest_configure, pytest_sessionfinish, pytest_unconfigure

__all__ = ["pytest_configure", "pytest_sessionfinish", "pytest_unconfigure"]
