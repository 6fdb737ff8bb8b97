"""Cumulative mass: per query block, the fewest key blocks that hold ``gamma`` of its estimated attention.

The threshold rule of FlexPrefill (Lai et al. 2025, "FlexPrefill: A Context-Aware Sparse Attention Mechanism for
Efficient Long-Sequence Inference", ICLR) and XAttention (Xu et al. 2025, "XAttention: Block Sparse Attention
with Antidiagonal Scoring", ICML): a query block that spreads its attention computes many blocks, one that
focuses computes few, so the budget adapts to each head and block. The estimate is XAttention's antidiagonal
scoring: within every ``stride x stride`` tile of the score matrix, the sum along its antidiagonal (one score per
query row and key column) stands for the tile, so every vertical and every slash line through the tile is
counted. It costs ``1 / stride`` of the dense scores, on a ``stride``-times coarser grid, softmaxed per coarse
query row and summed into blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.errors import HeadwiseError
from headwise.sparse.base import Pattern
from headwise.sparse.blocks import block_grid, grid_positions, queries_per_key_head, smallest_set_reaching


def antidiagonal_mass(query: torch.Tensor, key: torch.Tensor, offset: int, block: int, stride: int,
                      scale: float) -> torch.Tensor:
    """Estimated attention mass [B, Hq, Qb, Kb] of each query block on each key block, causal, from the
    antidiagonals of ``stride x stride`` tiles (``stride`` divides ``block``); each real query row sums to 1."""
    b, hq, q, d = query.shape
    n = key.shape[2]
    first, qb, kb = block_grid(q, n, block, offset)
    front = offset - first * block
    padded = torch.nn.functional.pad(query, (0, 0, front, qb * block - front - q))
    keys = torch.nn.functional.pad(queries_per_key_head(key, hq), (0, 0, 0, kb * block - n))
    # row stride-1-s of a query tile meets column s of a key tile: flip the query tiles, then concatenate
    rows = padded.view(b, hq, -1, stride, d).flip(3).flatten(-2)  # [B, H, Qg, stride * d]
    cols = keys.view(b, hq, -1, stride, d).flatten(-2)  # [B, H, Kg, stride * d]
    logits = rows @ cols.transpose(-1, -2) * (scale / stride)  # the mean of each antidiagonal
    start = first * block // stride
    row_at = torch.arange(start, start + rows.shape[2], device=query.device)[:, None]
    col_at = torch.arange(cols.shape[2], device=query.device)[None, :]
    logits = logits.masked_fill((col_at > row_at) | (col_at * stride >= n), float("-inf"))
    weights = logits.softmax(dim=-1)
    real = ((row_at + 1) * stride > offset) & (row_at * stride < offset + q)  # [Qg, 1]: holds a real query
    weights = weights * real.to(weights.dtype)
    per = block // stride
    return weights.view(b, hq, qb, per, kb, per).sum(dim=(3, 5))


@dataclass
class CumulativeMass(Pattern):
    """Per query block, the fewest key blocks holding ``gamma`` of its estimated attention (FlexPrefill).

    The estimate is XAttention's antidiagonal scoring on ``stride x stride`` tiles; the first block and the
    query block's own are always computed."""

    name = "mass"

    gamma: float = 0.9
    stride: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gamma <= 1 or self.stride < 1 or self.block % self.stride:
            raise HeadwiseError("sparse pattern 'mass': gamma must be in (0, 1] and stride a divisor of block")

    def select(self, query: torch.Tensor, key: torch.Tensor, offset: int) -> torch.Tensor:
        mass = antidiagonal_mass(query, key, offset, self.block, self.stride, query.shape[-1] ** -0.5)
        chosen = smallest_set_reaching(mass, self.gamma)
        rows, cols = grid_positions(query.shape[2], key.shape[2], self.block, offset)
        return chosen | ((cols == 0) | (cols == rows)).to(query.device)
