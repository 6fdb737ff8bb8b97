"""TokenSelect: token-level selection by the heads' soft vote, with a selection cache for similar queries.

Wu et al. 2024, "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via Dynamic
Token-Level KV Cache Selection". Each query head's attention distribution over the keys is a vote; the votes are
summed (a soft vote, so one head's sharp preference counts as much as another's) and the top tokens are read.
Consecutive queries are often alike, so when every query head's cosine similarity to the query that made the
last selection reaches ``similarity``, that selection is reused (tokens stored since are read as well) and no
keys are scored. Here the vote is over the query heads of one KV head's GQA group rather than over the layer,
so every KV head reads its own tokens, as with the other rules.

Scoring reads every key of the head (half of its bytes), which :class:`~headwise.select.base.Choice` counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.select.base import Choice, RuleState, Selector
from headwise.select.pages import extended, least_similarity, page_sums, soft_vote


@dataclass
class Votes(RuleState):
    """The query group [B, G, d] that last scored a head's tokens, and their soft-vote scores [B, m]."""

    query: torch.Tensor
    scores: torch.Tensor


@dataclass
class TokenSelect(Selector):
    """Read the tokens the group's query heads vote for, reusing the last vote for similar queries (TokenSelect).

    ``similarity`` is the cosine threshold of the selection cache (above 1: never reuse)."""

    name = "tokenselect"

    page: int = 1
    similarity: float = 0.9

    def choose(self, query: torch.Tensor, keys: torch.Tensor, state: RuleState | None) -> Choice:
        n = keys.shape[1]
        if self.tokens(n) >= n:
            return Choice(None, None)
        overhead = 0.0
        if not isinstance(state, Votes) or least_similarity(query, state.query) < self.similarity:
            state, overhead = Votes(query, soft_vote(query, keys)), n / 2  # every key read, no value
        return Choice(self.pick(n, page_sums(extended(state.scores, n), self.page)), state, overhead)
