"""TOVA: keep the tokens the latest query attends to most.

Oren et al., "Transformers are Multi-State RNNs", 2024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.policies.base import Policy


@dataclass
class TOVA(Policy):
    """Score = attention of the last query (averaged over the query heads of the KV group)."""

    name: ClassVar[str] = "tova"

    def queries_needed(self) -> int | None:
        return 1

    def accumulate(self, state: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return attn[:, :, -1, :]

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        return state
