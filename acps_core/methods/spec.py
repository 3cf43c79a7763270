"""Method specs: a method name with its options, ``Name(key=value, ...)``, read and written as text.

Wherever acps accepts a method name (``sensitivity=``, ``search_alg=``, ``gain=``, ``acps search --sensitivity``)
it accepts a spec too::

    GroupTaylorSensitivity
    GroupTaylorSensitivity(terms='all', normalize='median')
    MeasuredLatency(grid=(0.5, 1.0), cache_dir=False)

A value is a Python literal (an integer, a float, a quoted string, ``True``, ``False``, ``None``, or a tuple or
list of those) or a bare word, read as a string (``terms=all``, ``device=cuda:0``), so a shell needs no nested
quotes. Nothing is evaluated: literals go through :func:`ast.literal_eval`, which runs no code.
:func:`format_method_spec` writes the canonical form (options in the order given, values as Python literals),
which :func:`parse_method_spec` reads back to the same name and options.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from acps_core.errors import ArgumentError

__all__ = ["MAX_SPEC_LENGTH", "METHOD_NAME", "MethodSpec", "MethodSpecError", "format_method_spec",
           "format_option_value", "parse_method_spec", "split_method_spec"]

#: Longer specs are refused before they are read (a method's options fit in far less).
MAX_SPEC_LENGTH = 2000

#: A method name: letters, digits, '_', '.' and '-', starting with a letter or '_' (the registry checks names too).
METHOD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
# An option name is a Python identifier.
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A bare word: no space, quote, bracket, comma or '=' (those would make the spec ambiguous).
_BARE_WORD = re.compile(r"[^\s'\"()\[\]{},=]+")
_CLOSING = {"(": ")", "[": "]", "{": "}"}


class MethodSpecError(ArgumentError):
    """A method spec is malformed (names the spec, the position and the form it should take)."""


@dataclass(frozen=True)
class MethodSpec:
    """A method name and the options given with it.

    Attributes:
        name: the method's registered name.
        options: option name -> value, in the order given (Python literals or strings).
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def arguments(self) -> str:
        """The options as they go between the parentheses: ``key=value, ...`` (empty without options)."""
        return ", ".join(f"{key}={format_option_value(value)}" for key, value in self.options.items())

    def __str__(self) -> str:
        return format_method_spec(self.name, self.options)


def split_method_spec(text: str) -> tuple[str, str]:
    """A spec's name and its options as text (:attr:`MethodSpec.arguments`), for showing it; a text that is not a
    spec (a report edited by hand) comes back whole, with no options."""
    try:
        spec = parse_method_spec(text)
    except MethodSpecError:
        return text, ""
    return spec.name, spec.arguments


def format_method_spec(name: str, options: Mapping[str, Any] | None = None) -> str:
    """``Name(key=value, ...)`` with each value as a Python literal; just ``Name`` without options.

    Tuples and lists keep their brackets, strings their quotes, so :func:`parse_method_spec` reads the text back
    to the same name and options.
    """
    return f"{name}({MethodSpec(name, options).arguments})" if options else name


def format_option_value(value: Any) -> str:
    """A value as Python source that :func:`ast.literal_eval` reads back (the repr of its str() for any other
    object)."""
    if isinstance(value, (list, tuple)):
        items = ", ".join(format_option_value(item) for item in value)
        if isinstance(value, list):
            return f"[{items}]"
        return f"({items},)" if len(value) == 1 else f"({items})"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return repr(str(value))


def parse_method_spec(text: str, parameter: str = "method") -> MethodSpec:
    """Read ``Name`` or ``Name(key=value, ...)`` (see the module docs) without evaluating anything.

    Args:
        text: the spec.
        parameter: where the spec came from (``sensitivity``, ``--gain``), for messages.

    Raises:
        MethodSpecError: the spec is malformed; the message quotes it, marks the position and shows the form.
    """
    if len(text) > MAX_SPEC_LENGTH:
        raise MethodSpecError(f"{parameter}: the method spec is {len(text)} characters long, over the "
                              f"{MAX_SPEC_LENGTH} acps reads; give the method's name and the options that differ "
                              "from their defaults")
    reader = _Reader(text, parameter)
    name = reader.expect(METHOD_NAME, "a method name (letters, digits, '_', '.', '-'; starting with a letter or '_')")
    options: dict[str, Any] = {}
    reader.skip_space()
    if reader.at_end():
        return MethodSpec(name, options)
    reader.expect_char("(", "'(' before the options, or nothing after the name")
    while True:
        reader.skip_space()
        if reader.peek() == ")":
            break
        start = reader.position
        key = reader.expect(_KEY, "an option name (a Python identifier), or ')'")
        if key in options:
            raise reader.error(f"option {key!r} is given twice", start)
        reader.skip_space()
        reader.expect_char("=", f"'=' after the option name {key!r}")
        options[key] = reader.value(key)
        reader.skip_space()
        if reader.peek() == ",":
            reader.position += 1
            continue
        if reader.peek() != ")":
            raise reader.error("expected ',' between options or ')' after the last one")
        break
    reader.position += 1  # the ')'
    reader.skip_space()
    if not reader.at_end():
        raise reader.error("unexpected text after ')'")
    return MethodSpec(name, options)


class _Reader:
    """A cursor over a spec that knows how to say where it stopped."""

    def __init__(self, text: str, parameter: str) -> None:
        self.text = text
        self.parameter = parameter
        self.position = 0

    def at_end(self) -> bool:
        return self.position >= len(self.text)

    def peek(self) -> str:
        return self.text[self.position] if not self.at_end() else ""

    def skip_space(self) -> None:
        while not self.at_end() and self.text[self.position].isspace():
            self.position += 1

    def error(self, problem: str, position: int | None = None) -> MethodSpecError:
        """The error for a problem at ``position`` (default: the cursor), with the spec and a caret under it."""
        where = self.position if position is None else position
        return MethodSpecError(
            f"{self.parameter}: malformed method spec at position {where + 1}: {problem}\n"
            f"    {self.text}\n    {' ' * where}^\n"
            "A method spec is Name or Name(option=value, ...), e.g. GroupTaylorSensitivity(terms='all'); a value "
            "is a number, a quoted string, True, False, None, a tuple of those, or a bare word (read as a string)")

    def expect(self, pattern: re.Pattern[str], what: str) -> str:
        match = pattern.match(self.text, self.position)
        if not match:
            found = repr(self.peek()) if not self.at_end() else "the end"
            raise self.error(f"expected {what}, found {found}")
        self.position = match.end()
        return match.group()

    def expect_char(self, char: str, what: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if not self.at_end() else "the end"
            raise self.error(f"expected {what}, found {found}")
        self.position += 1

    def value(self, key: str) -> Any:
        """The value of option ``key``: its text up to the next ',' or ')' outside brackets and quotes, read as a
        literal or a bare word."""
        self.skip_space()
        start = self.position
        closing: list[str] = []
        quote = ""
        while not self.at_end():
            char = self.text[self.position]
            if quote:
                if char == "\\":
                    self.position += 1
                elif char == quote:
                    quote = ""
            elif char in "'\"":
                quote = char
            elif char in _CLOSING:
                closing.append(_CLOSING[char])
            elif closing and char == closing[-1]:
                closing.pop()
            elif char in ")]}":
                if char == ")" and not closing:
                    break
                raise self.error(f"unbalanced {char!r} in the value of {key!r}")
            elif char == "," and not closing:
                break
            self.position += 1
        if quote or closing:
            raise self.error(f"the value of {key!r} is not closed (a missing {quote or closing[-1]!r})")
        source = self.text[start:self.position].strip()
        if not source:
            raise self.error(f"option {key!r} has no value", start)
        return self._literal_or_word(source, key, start)

    def _literal_or_word(self, source: str, key: str, start: int) -> Any:
        try:
            value = ast.literal_eval(source)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            if _BARE_WORD.fullmatch(source):
                return source
            raise self.error(f"cannot read the value of {key!r}: {source!r} is neither a Python literal nor a bare "
                             "word (quote it)", start) from None
        if not _plain(value):
            raise self.error(f"the value of {key!r} is a {type(value).__name__}; acps reads numbers, strings, "
                             "True, False, None and tuples or lists of those", start)
        return value


def _plain(value: Any) -> bool:
    """Whether a literal is one an option may take: a number, a string, a bool, None, or a tuple/list of them."""
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))
