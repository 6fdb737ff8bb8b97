"""The contract every sparse prefill pattern follows.

A pattern is a small dataclass of options and one function, :meth:`Pattern.layout`, that says which key blocks
each query block of a prefill forward computes (:mod:`headwise.sparse.blocks`); the attention then computes those
blocks only. A pattern may look at the queries and keys to choose (vertical-slash, cumulative mass) or not at all
(A-shape). Below ``min_length`` keys a pattern computes everything: short prompts gain nothing from it.

To add a pattern, write one file in this folder with a dataclass subclass and register it in
``sparse/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.errors import HeadwiseError
from headwise.sparse.blocks import causal_layout


@dataclass
class Pattern:
    """Base pattern: which key blocks each query block of a prefill computes.

    Parameters
    ----------
    block : int
        Positions per block, for queries and keys.
    min_length : int
        Keys below which every causal block is computed (the dense path's answer exactly).
    """

    name: ClassVar[str] = ""

    block: int = 64
    min_length: int = 1024

    def __post_init__(self) -> None:
        if self.block < 1 or self.min_length < 0:
            raise HeadwiseError(f"sparse pattern '{self.name}': block must be >= 1 and min_length >= 0")

    def layout(self, query: torch.Tensor, key: torch.Tensor, offset: int) -> torch.Tensor:
        """The blocks [B, Hq, Qb, Kb] computed for ``query`` [B, Hq, q, d] (at positions ``offset..``) over
        ``key`` [B, Hkv, n, d]: every causal block below ``min_length`` keys, else :meth:`select`'s."""
        b, hq, q, _ = query.shape
        n = key.shape[2]
        dense = causal_layout(b, hq, q, n, self.block, offset)
        if n < self.min_length:
            return dense
        return self.select(query, key, offset) & dense

    def select(self, query: torch.Tensor, key: torch.Tensor, offset: int) -> torch.Tensor:
        """The pattern's own blocks (anything past the causal ones is ignored)."""
        raise NotImplementedError
