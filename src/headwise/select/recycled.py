"""Recycled Attention: a full attention step now and then, and the top tokens of the last one in between.

Xu, Goyal and Choi 2024, "Recycled Attention: Efficient inference for long-context language models". Every
``stride`` decoding steps a head attends to all its tokens and records the attention they received (here summed
over the query heads of its GQA group); the steps in between read only the tokens that received the most, within
the budget, plus the sinks, the window and every token stored since that full step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.errors import HeadwiseError
from headwise.select.base import Choice, RuleState, Selector
from headwise.select.pages import extended, page_sums, soft_vote


@dataclass
class Recycled(RuleState):
    """The attention [B, m] a head's tokens received at its last full step, and the steps taken since."""

    scores: torch.Tensor
    since: int = 0


@dataclass
class RecycledAttention(Selector):
    """Attend fully every ``stride`` steps, and between them read what the last full step attended most.

    Recycled Attention's rule: the tokens the last full step weighed most, within the budget."""

    name = "recycled"

    page: int = 1
    stride: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stride < 1:
            raise HeadwiseError(f"selection '{self.name}': stride must be >= 1")

    def choose(self, query: torch.Tensor, keys: torch.Tensor, state: RuleState | None) -> Choice:
        n = keys.shape[1]
        if not isinstance(state, Recycled) or state.since + 1 >= self.stride:
            # the full step's own attention weights: it reads every key anyway
            return Choice(None, Recycled(soft_vote(query, keys)))
        state = Recycled(state.scores, state.since + 1)
        if self.tokens(n) >= n:
            return Choice(None, state)
        return Choice(self.pick(n, page_sums(extended(state.scores, n), self.page)), state)
