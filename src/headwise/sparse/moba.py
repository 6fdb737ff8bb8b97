"""MoBA-style gating: each query block computes its own block and the ``top_k`` earlier blocks whose mean key
its queries score highest.

After MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs"), used training-free as
block selection for prefill: the gate of a query for a key block is its dot product with the block's mean key;
MoBA gates every query on its own, here a query block takes the blocks of its mean query, which by linearity is
the mean of its queries' gates. The gate costs ``q x Kb`` scores, against ``q x n`` for dense attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.errors import HeadwiseError
from headwise.sparse.base import Pattern
from headwise.sparse.blocks import block_grid, grid_positions, queries_per_key_head, top_k_mask


def mean_blocks(x: torch.Tensor, block: int, offset: int) -> torch.Tensor:
    """The mean [B, H, blocks, d] of the positions of ``x`` [B, H, m, d] (at positions ``offset..``) in each
    block of the grid (only the positions present count)."""
    b, h, m, d = x.shape
    first, count, _ = block_grid(m, offset + m, block, offset)
    index = (torch.arange(offset, offset + m, device=x.device) // block) - first
    sums = x.new_zeros(b, h, count, d).index_add_(2, index, x)
    sizes = torch.bincount(index, minlength=count).to(x.dtype)
    return sums / sizes[:, None]


@dataclass
class MoBA(Pattern):
    """Each query block's own block and the ``top_k`` earlier blocks its mean query gates highest (MoBA).

    A block's gate is the dot product of the query block's mean query with the key block's mean key
    (MoBA's gate, used training-free)."""

    name = "moba"

    top_k: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 0:
            raise HeadwiseError("sparse pattern 'moba': top_k must be >= 0")

    def select(self, query: torch.Tensor, key: torch.Tensor, offset: int) -> torch.Tensor:
        rows, cols = grid_positions(query.shape[2], key.shape[2], self.block, offset)
        rows, cols = rows.to(query.device), cols.to(query.device)
        gates = mean_blocks(query, self.block, offset) @ mean_blocks(
            queries_per_key_head(key, query.shape[1]), self.block, 0).transpose(-1, -2)  # [B, H, Qb, Kb]
        gates = gates.masked_fill(cols >= rows, float("-inf"))  # earlier blocks compete; the own one is kept
        return (top_k_mask(gates, self.top_k) & (cols < rows)) | (cols == rows)
