"""Sparse prefill: block-sparse attention that computes only the key blocks a pattern selects, one pattern per
file, and the registry that names them.

Add a pattern: write ``sparse/<name>.py`` with a :class:`~headwise.sparse.base.Pattern` dataclass subclass
(options as fields and a ``select``), then add the class to ``PATTERNS`` below.
"""

from __future__ import annotations

from headwise.sparse.ashape import AShape
from headwise.sparse.base import Pattern

PATTERNS: dict[str, type[Pattern]] = {cls.name: cls for cls in (AShape,)}

__all__ = ["PATTERNS", "AShape", "Pattern"]
