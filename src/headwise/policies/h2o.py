"""H2O: heavy hitters (accumulated attention) plus recent tokens.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.policies.base import Policy


@dataclass
class H2O(Policy):
    """Score = attention a key has received from every query so far; a share of the budget stays recent.

    Parameters
    ----------
    recent_fraction : float
        Share of the budget given to the most recent tokens (the paper splits half and half).
    """

    name: ClassVar[str] = "h2o"
    recent_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.recent_fraction < 1:
            raise ValueError(f"{self.name}: recent_fraction must be in [0, 1), got {self.recent_fraction}")

    def recent(self, budget: int) -> int:
        return max(self.window, int(budget * self.recent_fraction))

    def queries_needed(self) -> int | None:
        return None

    def accumulate(self, state: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return state + attn.sum(dim=2)

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        return state
