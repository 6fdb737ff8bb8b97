"""StreamingLLM: attention sinks plus a recent window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.policies.base import Policy


@dataclass
class StreamingLLM(Policy):
    """Keep the first ``sinks`` tokens and, with the rest of the budget, the most recent ones.

    The score is the original position, so the top scores are the latest tokens; the sinks are protected
    by the cache.
    """

    name: ClassVar[str] = "streaming_llm"
    sinks: int = 4

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        return positions.to(keys.dtype)
