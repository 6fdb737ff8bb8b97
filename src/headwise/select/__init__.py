"""Decode-time selection rules, one per file, and the registry that names them.

Add a rule: write ``select/<name>.py`` with a :class:`~headwise.select.base.Selector` dataclass subclass (options
as fields and a ``choose``), then add the class to ``SELECTORS`` below.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from headwise.errors import HeadwiseError
from headwise.select.base import Choice, RuleState, Selector
from headwise.select.headaware import HeadAwareSelect
from headwise.select.quest import Quest
from headwise.select.recycled import RecycledAttention
from headwise.select.tokenselect import TokenSelect

SELECTORS: dict[str, type[Selector]] = {
    cls.name: cls for cls in (Quest, TokenSelect, RecycledAttention, HeadAwareSelect)}

__all__ = ["SELECTORS", "Choice", "HeadAwareSelect", "Quest", "RecycledAttention", "RuleState", "Selector",
           "TokenSelect", "make_selector", "parse_selector"]


def make_selector(name: str, options: dict[str, Any] | None = None) -> Selector:
    """Build a rule by name with its options (strings are converted to the option's type)."""
    if name not in SELECTORS:
        raise HeadwiseError(f"unknown selection '{name}'; available: {', '.join(SELECTORS)}")
    cls = SELECTORS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options or {}) - set(fields))
    if unknown:
        raise HeadwiseError(f"unknown option(s) {', '.join(unknown)} for selection '{name}'; "
                            f"it takes: {', '.join(fields)}")
    converted = {}
    for key, value in (options or {}).items():
        kind = type(fields[key].default)
        try:
            converted[key] = kind(value)
        except ValueError as exc:
            raise HeadwiseError(f"selection option {key}={value}: expected a {kind.__name__}") from exc
    return cls(**converted)


def parse_selector(text: str) -> Selector:
    """``"quest:budget=256,page=16"`` -> a rule (the form ``--select`` takes)."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise HeadwiseError(f"selection option '{item}' is not KEY=VALUE")
        options[key.strip()] = value.strip()
    return make_selector(name.strip(), options)
