"""A2SF: accumulated attention with a forgetting factor.

Jo and Shin, "A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in
Transformer Decoder", 2024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.policies.h2o import H2O


@dataclass
class A2SF(H2O):
    """Like H2O, but each query's vote decays: ``score = forgetting * score + attention of the new query``.

    Parameters
    ----------
    forgetting : float
        Decay per query step, in (0, 1]; 1 is H2O.
    """

    name: ClassVar[str] = "a2sf"
    forgetting: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.forgetting <= 1:
            raise ValueError(f"a2sf: forgetting must be in (0, 1], got {self.forgetting}")

    def accumulate(self, state: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        q = attn.shape[2]
        # The i-th of q queries is followed by q-1-i more decay steps within this block.
        weights = self.forgetting ** torch.arange(q - 1, -1, -1, dtype=attn.dtype, device=attn.device)
        return state * self.forgetting**q + torch.einsum("bhqn,q->bhn", attn, weights)
