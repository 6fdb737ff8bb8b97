"""Vertical-slash: the key blocks and the block diagonals the last queries attend to most.

After MInference (Jiang et al. 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention", NeurIPS): many heads attend to a few fixed key positions (vertical lines: sinks, separators,
a needle) and to a few fixed distances back (slash lines: the local window, periodic structure). The attention of
the last ``last_q`` queries of the forward, computed exactly and cheaply (``last_q x n`` scores), estimates both:
its mass per key block ranks the vertical blocks, its mass per block distance ranks the slashes. A token diagonal
at distance ``delta`` crosses the block diagonals ``delta // block`` and the one after, so a chosen slash selects
both. MInference chooses token-level lines inside blocks; here the unit is the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.errors import HeadwiseError
from headwise.sparse.base import Pattern
from headwise.sparse.blocks import grid_positions, queries_per_key_head, top_k_mask


def last_query_attention(query: torch.Tensor, key: torch.Tensor, offset: int, last_q: int) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """The causal attention [B, Hq, L, n] of the last ``L = min(last_q, q)`` queries, and their positions [L]."""
    q, n = query.shape[2], key.shape[2]
    tail = query[:, :, -last_q:]
    positions = torch.arange(offset + q - tail.shape[2], offset + q, device=query.device)
    scores = tail @ queries_per_key_head(key, query.shape[1]).transpose(-1, -2) / query.shape[-1] ** 0.5
    future = torch.arange(n, device=query.device)[None, :] > positions[:, None]
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1), positions


@dataclass
class VerticalSlash(Pattern):
    """The key blocks and block distances the last queries weigh most (MInference's vertical-slash).

    ``vertical`` key blocks and ``slash`` block distances, ranked by the attention of the last ``last_q``
    queries, with the first block and each query block's own."""

    name = "vertical_slash"

    last_q: int = 64
    vertical: int = 8
    slash: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.last_q < 1 or self.vertical < 0 or self.slash < 0:
            raise HeadwiseError("sparse pattern 'vertical_slash': last_q must be >= 1, vertical and slash >= 0")

    def select(self, query: torch.Tensor, key: torch.Tensor, offset: int) -> torch.Tensor:
        n = key.shape[2]
        attention, positions = last_query_attention(query, key, offset, self.last_q)  # [B, H, L, n]
        rows, cols = grid_positions(query.shape[2], n, self.block, offset)
        kb = cols.shape[1]
        by_column = attention.sum(dim=2)  # [B, H, n]
        vertical = torch.zeros(*by_column.shape[:2], kb, device=query.device)
        vertical.index_add_(2, torch.arange(n, device=query.device) // self.block, by_column)
        distance = (positions[:, None] - torch.arange(n, device=query.device)[None, :]).clamp(min=0) // self.block
        slash = torch.zeros_like(vertical)  # mass per block distance 0..Kb-1
        slash.index_add_(2, distance.flatten(), attention.flatten(-2))
        columns = top_k_mask(vertical, self.vertical)  # [B, H, Kb]
        distances = top_k_mask(slash, self.slash)
        # token distances in [D * block, (D + 1) * block) cross the block distances D and D + 1
        shifted = distances | torch.nn.functional.pad(distances[..., :-1], (1, 0))
        shifted[..., 0] = True  # each query block's own
        gap = (rows - cols).clamp(min=0, max=kb - 1).to(query.device)  # [Qb, Kb]
        chosen = columns[:, :, None, :] | shifted[:, :, gap]
        chosen[..., 0] = True
        return chosen
