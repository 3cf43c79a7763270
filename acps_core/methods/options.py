"""Method options as typed config objects that validate, print and serialise, so a CLI and a report carry them.

A method class declares its options as a nested pydantic model, a subclass of :class:`MethodOptions`, and accepts
each option as a keyword argument of its constructor, which validates them through the model and keeps the
result as ``self.options``::

    class GroupMagnitudeSensitivity(SensitivityBase):
        class Options(MethodOptions):
            normalize: Literal["none", "mean", "median"] = "median"

        def __init__(self, normalize: str = "median") -> None:
            super().__init__()
            self.options = self.Options.checked(self, normalize=normalize)

Unknown options, values of the wrong type and values out of range raise :class:`MethodOptionsError` naming the
method, the option, and what it takes. ``Name(key=value, ...)`` specs (:mod:`acps_core.methods.spec`) are validated
through the same model before the method is built. A class without an ``Options`` model (most third-party
methods) keeps working as before: the keywords of a spec go to its constructor as they are.

:func:`describe_method` says what a search used: the method's name, its options as a JSON-ready dict, and the
canonical spec that selects the same method again.
"""

from __future__ import annotations

import difflib
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticUndefined, to_jsonable_python

from acps_core.errors import ArgumentError
from acps_core.methods.bases import METHOD_BASES
from acps_core.methods.spec import MethodSpec, format_method_spec, format_option_value

__all__ = [
    "MethodOptions",
    "MethodOptionsError",
    "MethodRecord",
    "describe_method",
    "options_model",
    "options_signature",
]


_Options = TypeVar("_Options", bound="MethodOptions")


class MethodOptionsError(ArgumentError):
    """A method was given an unknown option, or a value of the wrong type or out of range (names the method, the
    option and what it takes)."""


class MethodOptions(BaseModel):
    """Base of every method's options: frozen, no unknown keys, numbers never given as booleans.

    Subclass it as a method's nested ``Options`` class (see the module docs). ``str(options)`` is the argument
    list of the method's spec (``normalize='mean', terms='dense'``), :meth:`to_json` a JSON-ready dict.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads ``True`` as 1 for an int or a float; for an option that is surely a mistake."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(annotation)) if get_origin(annotation) is Union or _is_union(annotation) \
                else {annotation}
            if kinds & {int, float} and bool not in kinds:
                raise ValueError(f"expected {_type_text(annotation)}, got {value!r}")
        return value

    @classmethod
    def checked(cls: type[_Options], method: object, /, **given: Any) -> _Options:
        """The options ``given`` validated through this model, for the method ``method`` (an instance, a class or
        a name, used in messages).

        Raises:
            MethodOptionsError: an option is unknown, or a value does not fit (all problems in one message).
        """
        try:
            return cls(**given)
        except ValidationError as exc:
            raise MethodOptionsError(_explain(cls, _method_label(method), exc)) from None

    def to_json(self) -> dict[str, Any]:
        """The options as a dict JSON can hold (tuples as lists, in the model's field order)."""
        return self.model_dump(mode="json")

    def __str__(self) -> str:
        return MethodSpec(type(self).__qualname__, self.to_json()).arguments

    def __repr_name__(self) -> str:
        # Every Options class is called "Options": name its method too.
        return type(self).__qualname__


def options_model(cls: type) -> type[MethodOptions] | None:
    """The ``Options`` model a method class declares (inherited ones count), or None."""
    model = getattr(cls, "Options", None)
    return model if isinstance(model, type) and issubclass(model, MethodOptions) else None


def options_signature(model: type[MethodOptions]) -> str:
    """Each option with its type, bounds and default: ``levels: int (>= 1) = 4, max_samples: int (>= 1) = 128``."""
    parts = []
    for name, info in model.model_fields.items():
        text = f"{name}: {_type_text(info.annotation)}"
        bounds = [f"{symbol} {getattr(bound, attribute)}" for bound in info.metadata
                  for attribute, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                  if getattr(bound, attribute, None) is not None]
        if bounds:
            text += f" ({', '.join(bounds)})"
        if info.default is not PydanticUndefined:
            text += f" = {format_option_value(to_jsonable_python(info.default))}"  # as specs and reports show it
        parts.append(text)
    return ", ".join(parts)


def _type_text(annotation: Any) -> str:
    """A type as a reader would write it: ``int``, ``'mean' | 'median'``, ``float | None``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in get_args(annotation))
    if origin is Union or _is_union(annotation):
        return " | ".join(_type_text(arg) for arg in get_args(annotation))
    if annotation is type(None):
        return "None"
    if origin is not None:
        args = ", ".join("..." if arg is Ellipsis else _type_text(arg) for arg in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def _is_union(annotation: Any) -> bool:
    """``X | Y`` written with the operator (Python 3.10+), which ``get_origin`` does not call ``Union``."""
    return type(annotation).__name__ == "UnionType"


def _method_label(method: object) -> str:
    if isinstance(method, str):
        return method
    return method.__name__ if isinstance(method, type) else type(method).__name__


def _explain(model: type[MethodOptions], method: str, error: ValidationError) -> str:
    """One message for every problem pydantic found, then what the method takes."""
    known = list(model.model_fields)
    problems = []
    for item in error.errors():
        location = item["loc"]
        option = str(location[0]) if location else ""
        where = option + "".join(f"[{part}]" for part in location[1:])
        message = str(item["msg"]).removeprefix("Value error, ")
        if not location:  # a check of the options together: its message says which
            problems.append(message)
        elif item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
            problems.append(f"unknown option {option!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif item["type"] == "literal_error":
            problems.append(f"{where} must be {item['ctx']['expected']}, got {item['input']!r}")
        else:
            problems.append(f"{where}={item['input']!r} is invalid: {message[:1].lower()}{message[1:]}")
    takes = f"takes {options_signature(model)}" if known else "takes no options"
    return f"{method}: {'; '.join(problems)}. {method} {takes}"


# What resolve_method built each instance from: the registered name, and for a class without an Options model the
# keywords its spec gave. Keyed by id with a weak reference, so method objects need not be hashable.
_resolved: dict[int, tuple[weakref.ReferenceType[Any], str, dict[str, Any] | None]] = {}
_resolved_lock = threading.Lock()


def remember_resolved(method: object, name: str, given: Mapping[str, Any] | None) -> None:
    """Note that ``method`` was built for the registered name ``name`` (with ``given``, for a class without an
    Options model), so :func:`describe_method` can name it as the user selected it."""
    key = id(method)

    def forget(_: object) -> None:
        with _resolved_lock:
            _resolved.pop(key, None)

    try:
        reference = weakref.ref(method, forget)
    except TypeError:  # a class with __slots__ and no __weakref__: describe it by its class name
        return
    with _resolved_lock:
        _resolved[key] = (reference, name, dict(given) if given is not None else None)


@dataclass(frozen=True)
class MethodRecord:
    """What :func:`describe_method` says of one method.

    Attributes:
        kind: ``"sensitivity"``, ``"search"`` or ``"gain"``.
        name: the name it was selected by (its class name when it was passed as an object).
        options: its options as a JSON-ready dict (``{}`` when it takes none); None when they are not known (an
            object of a class without an Options model, built by the caller).
    """

    kind: str
    name: str
    options: dict[str, Any] | None

    @property
    def spec(self) -> str:
        """``Name(option=value, ...)``, which selects the same method again (``Name`` when it has no options)."""
        return format_method_spec(self.name, self.options)


def describe_method(method: object) -> MethodRecord:
    """The kind, name, options and canonical spec of a method object (see :class:`MethodRecord`).

    Raises:
        ArgumentError: ``method`` is not a sensitivity, search or gain method.
    """
    kind = next((kind for kind, base in METHOD_BASES.items() if isinstance(method, base)), None)
    if kind is None:
        raise ArgumentError(f"{type(method).__module__}.{type(method).__qualname__} is not an acps method (a "
                            "subclass of SensitivityBase, SearchChannelBase or GainEstimatorBase)")
    with _resolved_lock:
        entry = _resolved.get(id(method))
    name, given = type(method).__name__, None
    if entry is not None and entry[0]() is method:
        name, given = entry[1], entry[2]
    model = options_model(type(method))
    options = getattr(method, "options", None)
    if model is not None and isinstance(options, MethodOptions):
        return MethodRecord(kind, name, options.to_json())
    if model is not None and not model.model_fields:
        return MethodRecord(kind, name, {})
    return MethodRecord(kind, name, given)

