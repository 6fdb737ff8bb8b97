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
    """Score = attention of the last query; by default one choice per layer, as in the paper.

    Parameters
    ----------
    heads : str
        ``"layer"`` (the paper's method): the last query's attention averaged over every head of the layer,
        so all KV heads keep the same tokens; ``"kv"``: each KV head keeps its own top tokens by the attention
        of its query group. Either way a group's query heads are first combined by the plan's
        ``group_reduce`` (with ``"mean"``, the layer average is the mean over all query heads). Inside a
        composite policy (``headwise``, ``other=tova``) each head scores itself, as with ``"kv"``.
    """

    name: ClassVar[str] = "tova"
    heads: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heads not in ("layer", "kv"):
            raise ValueError(f"tova: heads must be 'layer' or 'kv', got '{self.heads}'")

    def scores_per_layer(self) -> bool:
        return self.heads == "layer"

    def queries_needed(self) -> int | None:
        return 1

    def accumulate(self, state: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return attn[:, :, -1, :]

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        return state
