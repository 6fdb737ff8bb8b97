"""Rules and patterns named in one string, ``"name:key=value,key=value"``: the form ``--select`` and
``--sparse`` take. One parser for every registry of small option dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from headwise.errors import HeadwiseError

T = TypeVar("T")


def build(registry: dict[str, type[T]], what: str, name: str, options: dict[str, Any] | None = None,
          given: dict[str, Any] | None = None) -> T:
    """The ``what`` named ``name`` in ``registry``, built with ``options`` (strings converted to each field's
    type) and the fields ``given`` by the caller as they are (not options: a required field, say); an unknown name
    or option is refused with the known ones."""
    if name not in registry:
        raise HeadwiseError(f"unknown {what} '{name}'; available: {', '.join(registry)}")
    cls = registry[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in (given or {})}
    unknown = sorted(set(options or {}) - set(fields))
    if unknown:
        raise HeadwiseError(f"unknown option(s) {', '.join(unknown)} for {what} '{name}'; "
                            f"it takes: {', '.join(fields)}")
    converted = {}
    for key, value in (options or {}).items():
        kind = type(fields[key].default)
        try:
            converted[key] = kind(value)
        except ValueError as exc:
            raise HeadwiseError(f"{what} option {key}={value}: expected a {kind.__name__}") from exc
    return cls(**converted, **(given or {}))


def parse_spec(what: str, text: str) -> tuple[str, dict[str, str]]:
    """``"name:key=value,..."`` -> the name and its options, values still strings."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise HeadwiseError(f"{what} option '{item}' is not KEY=VALUE")
        options[key.strip()] = value.strip()
    return name.strip(), options


def parse(registry: dict[str, type[T]], what: str, text: str) -> T:
    """``"name:key=value,..."`` -> the ``what`` it names, built."""
    return build(registry, what, *parse_spec(what, text))


def split(text: str, check: Callable[[str], object]) -> list[str]:
    """Several specs separated by ``;`` (``"quest:budget=256;recycled"``), each refused by ``check`` if bad."""
    items = [item.strip() for item in text.split(";") if item.strip()]
    for item in items:
        check(item)
    return items
