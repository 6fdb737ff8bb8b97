"""KeyDiff: keep the keys least like the head's average key.

Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", 2025. Keys that point in the common direction of a head's keys carry little
that the others do not; distinctive keys are the ones attention can single out. The score needs no attention
and no query, so it does not depend on what comes after the context (question-agnostic by construction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from headwise.policies.base import Policy


@dataclass
class KeyDiff(Policy):
    """Score = minus the cosine similarity of each key to the mean of the head's unit-length keys."""

    name: ClassVar[str] = "keydiff"

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        unit = F.normalize(keys.float(), dim=-1)
        anchor = F.normalize(unit.mean(dim=-2, keepdim=True), dim=-1)
        return -(unit * anchor).sum(dim=-1)
