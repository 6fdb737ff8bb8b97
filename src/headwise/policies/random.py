"""Random eviction: the floor any real method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.policies.base import Policy


@dataclass
class Random(Policy):
    """Keep a uniformly random subset (reproducible from ``seed``).

    Parameters
    ----------
    seed : int
        Seed of the generator; the same seed gives the same choice for the same cache shape.
    """

    name: ClassVar[str] = "random"
    seed: int = 0

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(self.seed + int(positions.shape[-1]))
        return torch.rand(positions.shape, generator=generator).to(keys.device)
