"""Sparse prefill: block-sparse attention that computes only the key blocks a pattern selects, one pattern per
file, and the registry that names them.

Add a pattern: write ``sparse/<name>.py`` with a :class:`~headwise.sparse.base.Pattern` dataclass subclass
(options as fields and a ``select``), then add the class to ``PATTERNS`` below.
"""

from __future__ import annotations

from headwise import specs
from headwise.sparse.ashape import AShape
from headwise.sparse.base import Pattern
from headwise.sparse.dense import Dense
from headwise.sparse.mass import CumulativeMass
from headwise.sparse.moba import MoBA
from headwise.sparse.plan import SparsePlan
from headwise.sparse.vertical_slash import VerticalSlash

PATTERNS: dict[str, type[Pattern]] = {
    cls.name: cls for cls in (AShape, VerticalSlash, CumulativeMass, MoBA, Dense)
}

__all__ = ["PATTERNS", "AShape", "CumulativeMass", "Dense", "MoBA", "Pattern", "SparsePlan", "VerticalSlash",
           "parse_pattern"]


def parse_pattern(text: str) -> Pattern | SparsePlan:
    """``"ashape:block=64,local_blocks=4"`` -> a pattern (the form ``--sparse`` takes); a path ending in
    ``.json`` is a sparse plan file (:mod:`headwise.sparse.plan`)."""
    if text.endswith(".json"):
        return SparsePlan(file=text)
    return specs.parse(PATTERNS, "sparse pattern", text)
