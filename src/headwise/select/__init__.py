"""Decode-time selection rules, one per file, and the registry that names them.

Add a rule: write ``select/<name>.py`` with a :class:`~headwise.select.base.Selector` dataclass subclass (options
as fields and a ``choose``), then add the class to ``SELECTORS`` below.
"""

from __future__ import annotations

from typing import Any

from headwise import specs
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
    return specs.build(SELECTORS, "selection", name, options)


def parse_selector(text: str) -> Selector:
    """``"quest:budget=256,page=16"`` -> a rule (the form ``--select`` takes)."""
    return specs.parse(SELECTORS, "selection", text)
