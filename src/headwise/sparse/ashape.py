"""A-shape: the first blocks (attention sinks) and a local band of blocks before each query block.

The static pattern of StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention
Sinks", ICLR) applied to prefill, as MInference (Jiang et al. 2024, "MInference 1.0: Accelerating Pre-filling for
Long-Context LLMs via Dynamic Sparse Attention", NeurIPS) does for its A-shape heads: it needs no look at the
queries or keys, so it costs nothing to choose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.errors import HeadwiseError
from headwise.sparse.base import Pattern
from headwise.sparse.blocks import block_grid


@dataclass
class AShape(Pattern):
    """The first ``sink_blocks`` key blocks and the ``local_blocks`` up to each query block's own (A-shape)."""

    name = "ashape"

    sink_blocks: int = 1
    local_blocks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink_blocks < 0 or self.local_blocks < 1:
            raise HeadwiseError("sparse pattern 'ashape': sink_blocks must be >= 0 and local_blocks >= 1")

    def select(self, query: torch.Tensor, key: torch.Tensor, offset: int) -> torch.Tensor:
        b, hq, q, _ = query.shape
        first, qb, kb = block_grid(q, key.shape[2], self.block, offset)
        rows = torch.arange(first, first + qb, device=query.device)[:, None]
        cols = torch.arange(kb, device=query.device)[None, :]
        chosen = (cols < self.sink_blocks) | ((cols <= rows) & (cols > rows - self.local_blocks))
        return chosen.expand(b, hq, qb, kb)
