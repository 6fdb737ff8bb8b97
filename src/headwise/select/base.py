"""The contract every decode-time selection rule follows.

Selection keeps the whole cache (or whatever eviction kept) and lets each decoding step of each KV head read only
some of its tokens: the first ``sinks``, the last ``window``, and the pages of ``page`` consecutive stored tokens
that the rule ranks highest, up to ``budget`` tokens (or ``fraction`` of the stored ones). It saves reading, not
memory. A rule is a small dataclass of options and one function, :meth:`Selector.choose`, that picks a head's
tokens for the current query group; the maths lives in :mod:`headwise.select.pages`.

The cache asks the plan's rule which rule each KV head follows (:meth:`Selector.for_head`: itself, unless a
rule plans per head, as the head-aware one does), calls that rule's :meth:`Selector.choose` for the head at
every single-token forward and attends over the tokens it returns. What a rule carries from step to step for a
head (Quest's page bounds, a reused selection) is its :class:`RuleState`, which the cache keeps with the head
and hands back at the next step; the cache drops it (None) when eviction or a beam search changes the head's
tokens. A :class:`Choice` also says how much the rule read to choose (page summaries, scored keys), so the
fraction of the cache a step reads is honest.

To add a rule, write one file in this folder with a dataclass subclass and register it in ``select/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.errors import HeadwiseError
from headwise.select.pages import selected_tokens


@dataclass
class RuleState:
    """What a rule keeps for one KV head between decoding steps; its tensors count as the cache's metadata."""

    def nbytes(self) -> int:
        return sum(v.nbytes for v in (getattr(self, f.name) for f in dataclasses.fields(self))
                   if isinstance(v, torch.Tensor))


@dataclass
class Choice:
    """One decoding step of one KV head: the tokens it reads and what choosing them cost.

    ``index`` holds sorted indices [B, k] into the head's stored tokens (None: all of them); ``state`` is the
    rule's state for the next step; ``overhead`` is what the rule read to choose, in tokens' worth of keys and
    values (Quest's page bounds, TokenSelect's scored keys).
    """

    index: torch.Tensor | None
    state: RuleState | None
    overhead: float = 0.0


@dataclass
class Selector:
    """Base rule: which of a head's stored tokens one decoding step reads.

    Parameters
    ----------
    budget : int
        Tokens read per KV head and step (sinks and window included); 0 to give ``fraction`` instead.
    fraction : float
        Or the fraction of the head's stored tokens read per step, in (0, 1]; 0 to give ``budget``.
    page : int
        Consecutive stored tokens per page, the unit of selection.
    sinks, window : int
        The first and the most recent stored tokens, always read.
    """

    name: ClassVar[str] = ""

    budget: int = 0
    fraction: float = 0.0
    page: int = 16
    sinks: int = 4
    window: int = 64

    def __post_init__(self) -> None:
        if (self.budget > 0) == (self.fraction > 0):
            raise HeadwiseError(f"selection '{self.name}' needs exactly one of a budget (tokens) or a fraction")
        if self.budget < 0 or not 0 <= self.fraction <= 1:
            raise HeadwiseError(f"selection '{self.name}': budget must be >= 0 and fraction in [0, 1]")
        if self.page < 1 or self.sinks < 0 or self.window < 0:
            raise HeadwiseError(f"selection '{self.name}': page must be >= 1, sinks and window >= 0")
        if self.budget and self.budget < self.sinks + self.window:
            raise HeadwiseError(f"selection '{self.name}': budget {self.budget} is below sinks + window "
                                f"({self.sinks + self.window})")

    def tokens(self, n: int) -> int:
        """Tokens read from a head holding ``n``."""
        return self.budget if self.budget else max(1, math.ceil(self.fraction * n))

    def bind(self, config) -> None:
        """Check the rule against the model's config before the cache uses it (nothing to check by default)."""

    def for_head(self, layer_idx: int, head: int) -> Selector | None:
        """The rule one KV head reads by (None: it reads every token); the same rule for all heads by default."""
        return self

    def pick(self, n: int, page_scores: torch.Tensor) -> torch.Tensor:
        """Indices [B, k] of the sinks, the window and the best pages by ``page_scores`` [B, P] in the budget."""
        return selected_tokens(n, page_scores, self.page, self.tokens(n), self.sinks, self.window)

    def choose(self, query: torch.Tensor, keys: torch.Tensor, state: RuleState | None) -> Choice:
        """What query group ``query`` [B, G, d] reads of a head's stored ``keys`` [B, n, d], given the rule's
        ``state`` for that head from its previous step (None at first, and after its tokens changed)."""
        raise NotImplementedError
