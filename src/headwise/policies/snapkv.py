"""SnapKV: attention from an observation window of the latest queries, pooled.

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

    The observation window itself is always kept. In question-agnostic use the window is the end of the
    context, not the question.

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
        pooled = F.avg_pool1d(state.reshape(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2,
                              count_include_pad=False)
        return pooled.reshape(b, h, n)
