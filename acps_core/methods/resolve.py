"""From what a user passes as ``sensitivity=``, ``search_alg=`` or ``gain=`` to a method object.

A user passes a registered name (``"GreedySearch"``), a name with options (``"GroupTaylorSensitivity(terms='all')"``,
see :mod:`acps_core.methods.spec`), or a method object. :func:`resolve_method` looks the name up in the registry,
validates the options through the class's ``Options`` model (:mod:`acps_core.methods.options`) when it has one, and
builds the method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from acps_core.errors import ArgumentError, PluginError
from acps_core.methods.bases import (
    METHOD_BASES,
    PARAMETER_BY_KIND,
    GainEstimatorBase,
    SearchChannelBase,
    SensitivityBase,
    kind_base,
)
from acps_core.methods.options import options_model, remember_resolved
from acps_core.methods.spec import format_method_spec, parse_method_spec

if TYPE_CHECKING:
    from acps_core.methods.registry import MethodInfo, Registry

__all__ = ["MethodArgumentError", "build_method", "resolve_method"]


class MethodArgumentError(PluginError, TypeError):
    """A ``sensitivity=``/``search_alg=``/``gain=`` argument is neither a method name nor an instance."""


@overload
def resolve_method(kind: Literal["sensitivity"], value: object, parameter: str,
                   registry: Registry | None = None) -> SensitivityBase: ...
@overload
def resolve_method(kind: Literal["search"], value: object, parameter: str,
                   registry: Registry | None = None) -> SearchChannelBase: ...
@overload
def resolve_method(kind: Literal["gain"], value: object, parameter: str,
                   registry: Registry | None = None) -> GainEstimatorBase: ...
@overload
def resolve_method(kind: str, value: object, parameter: str, registry: Registry | None = None) -> object: ...


def resolve_method(kind: str, value: object, parameter: str, registry: Registry | None = None) -> object:
    """Turn a ``sensitivity=``/``search_alg=``/``gain=`` argument into a method instance.

    Args:
        kind: ``"sensitivity"``, ``"search"`` or ``"gain"``.
        value: a registered method name, alone (the class is built with no arguments) or with options,
            ``Name(key=value, ...)`` (see :func:`build_method`); or an instance of the kind's base class (returned
            as is).
        parameter: the argument's name, for messages.
        registry: where to look names up (default: :func:`acps_core.methods.registry.get_registry`).

    Raises:
        MethodArgumentError: ``value`` is a class (pass an instance) or neither a name nor an instance.
        MethodSpecError: ``value`` is a malformed spec (an :class:`~acps_core.errors.ArgumentError`).
        MethodOptionsError: an option is unknown to the method or its value does not fit (an ``ArgumentError``).
        PluginError: the name is not installed, or the plugin's class failed to instantiate.
    """
    base = kind_base(kind)
    if isinstance(value, str):
        spec = parse_method_spec(value, parameter)
        method = _registry(registry).get(kind, spec.name)
        return build_method(method, spec.options)
    if isinstance(value, base):
        return value
    if isinstance(value, type) and issubclass(value, base):
        raise MethodArgumentError(
            f"{parameter}= got the class {value.__module__}.{value.__qualname__}; pass an instance instead, "
            f"e.g. {parameter}={value.__qualname__}()"
        )
    try:
        names = _registry(registry).names(kind)
        installed = ", ".join(repr(name) for name in names) or "none installed"
    except PluginError:  # a broken installation must not hide the caller's own mistake
        installed = "the registry could not be built"
    hint = ""
    for other_kind, other_base in METHOD_BASES.items():
        if other_kind != kind and (isinstance(value, other_base) or
                                   (isinstance(value, type) and issubclass(value, other_base))):
            hint = f" (that is a {other_kind} method; pass it as {PARAMETER_BY_KIND[other_kind]}=)"
    raise MethodArgumentError(
        f"{parameter}= got {type(value).__module__}.{type(value).__qualname__} {value!r:.80}{hint}; expected "
        f"a {kind} method name ({installed}), a name with options (Name(option=value, ...)), or an instance of a "
        f"subclass of acps_core.{base.__name__}"
    )


def build_method(method: MethodInfo, options: Mapping[str, Any] | None = None) -> object:
    """An instance of a registered method built with ``options``.

    When the class declares an ``Options`` model the options are validated through it first and the validated
    values passed to the constructor as keywords; otherwise they are passed as they are.

    Raises:
        MethodOptionsError: the class declares an Options model and an option is unknown or does not fit.
        PluginError: the constructor raised (the message names the class, its plugin and the options).
    """
    given = dict(options or {})
    model = options_model(method.cls)
    arguments = given
    if model is not None:
        checked = model.checked(method.name, **given)
        arguments = {name: getattr(checked, name) for name in given}
    try:
        instance = method.cls(**arguments)
    except ArgumentError:  # the class's own checks of its options name the method and the option
        raise
    except Exception as exc:  # the class is plugin code; say whose it is
        spec = format_method_spec(method.name, given)
        with_what = f"the options {spec[len(method.name) + 1:-1]}" if given else "no arguments"
        unchecked = (f"; {method.cls.__qualname__} declares no Options model, so its options are passed to it "
                     "unchecked: see its documentation for the options it takes") if given and model is None else ""
        raise PluginError(
            f"{method.kind} method {spec!r} ({method.class_path}, {method.origin}) could not be created with "
            f"{with_what}: {type(exc).__name__}: {exc}{unchecked}"
        ) from exc
    remember_resolved(instance, method.name, None if model is not None else given)
    return instance


def _registry(registry: Registry | None) -> Registry:
    if registry is not None:
        return registry
    from acps_core.methods.registry import get_registry  # imported here: the registry module re-exports this one

    return get_registry()
