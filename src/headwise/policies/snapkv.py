"""SnapKV: attention from an observation window of the latest queries, pooled over the prefix.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from headwise.policies.base import Policy


@dataclass
class SnapKV(Policy):
    """Score = attention of the last ``window`` queries, averaged, smoothed by 1-D average pooling.

    As in the paper, the window's queries vote only for the prefix (the tokens before the window): the pooling
    runs over the prefix alone, so the window's attention to itself never raises the scores of the prefix
    tokens next to it, and the window itself is always kept (its score is +inf). The pooling pads with zeros and
    divides by the full kernel, as the paper's code and kvpress do, so the prefix's first and last tokens score a
    little lower. In question-agnostic use the window is the end of the context, not the question.

    Parameters
    ----------
    window : int
        Observation window (latest queries), also kept as recent tokens.
    kernel : int
        Odd pooling kernel size.
    """

    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv: kernel must be a positive odd number, got {self.kernel}")

    def queries_needed(self) -> int | None:
        return self.window

    def accumulate(self, state: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return attn[:, :, -self.window :, :].mean(dim=2)

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        b, h, n = state.shape
        prefix = max(0, n - self.window)
        scores = torch.full_like(state, float("inf"))
        if prefix:
            pooled = F.avg_pool1d(state[..., :prefix].reshape(b * h, 1, prefix), self.kernel, stride=1,
                                  padding=self.kernel // 2)
            scores[..., :prefix] = pooled.reshape(b, h, prefix)
        return scores
