"""No compression: the reference every other policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.policies.base import Policy


@dataclass
class Full(Policy):
    """Keep the whole cache (ratio 0 in every table)."""

    name: ClassVar[str] = "full"
    compresses: ClassVar[bool] = False

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        return torch.zeros(positions.shape, dtype=keys.dtype, device=keys.device)
