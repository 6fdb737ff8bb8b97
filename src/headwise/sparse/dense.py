"""Dense: every causal block, the full-attention answer through the block-sparse path.

The pattern a plan gives the heads it leaves dense (retrieval heads, say); also the reference every other
pattern's blocks are a subset of.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.sparse.base import Pattern
from headwise.sparse.blocks import causal_layout


@dataclass
class Dense(Pattern):
    """Every causal block (full attention)."""

    name = "dense"

    def select(self, query: torch.Tensor, key: torch.Tensor, offset: int) -> torch.Tensor:
        b, hq, q, _ = query.shape
        return causal_layout(b, hq, q, key.shape[2], self.block, offset).to(query.device)
