"""Sparse prefill: block-sparse attention that computes only the key blocks a pattern selects, one pattern per
file, and the registry that names them.

Add a pattern: write ``sparse/<name>.py`` with a :class:`~headwise.sparse.base.Pattern` dataclass subclass
(options as fields and a ``select``), then add the class to ``PATTERNS`` below.
"""

from __future__ import annotations

from headwise import specs
from headwise.sparse.ashape import AShape
from headwise.sparse.base import Pattern

PATTERNS: dict[str, type[Pattern]] = {cls.name: cls for cls in (AShape,)}

__all__ = ["PATTERNS", "AShape", "Pattern", "parse_pattern"]


def parse_pattern(text: str) -> Pattern:
    """``"ashape:block=64,local_blocks=4"`` -> a pattern (the form ``--sparse`` takes)."""
    return specs.parse(PATTERNS, "sparse pattern", text)
