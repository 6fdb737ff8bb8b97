"""Knorm: keep the keys with the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.policies.base import Policy


@dataclass
class Knorm(Policy):
    """Score = minus the key's L2 norm: low-norm keys draw the most attention in practice."""

    name: ClassVar[str] = "knorm"

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        return -keys.norm(dim=-1)
