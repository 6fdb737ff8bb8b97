"""The contract every decode-time selection rule follows.

Selection keeps the whole cache (or whatever eviction kept) and lets each decoding step of each KV head read only
some of its tokens: the first ``sinks``, the last ``window``, and the pages of ``page`` consecutive stored tokens
that the rule ranks highest, up to ``budget`` tokens (or ``fraction`` of the stored ones). It saves reading, not
memory. A rule is a small dataclass of options and one function, :meth:`Selector.page_scores`, that ranks a
head's pages for the current query group; the maths lives in :mod:`headwise.select.pages`.

The cache calls :meth:`Selector.choose` for every KV head at every single-token forward and attends over the
tokens it returns. Per-page summaries the rule needs (Quest's key bounds) are kept with the head in a
:class:`PageSummary`, extended as pages fill and dropped when eviction changes the head's tokens.

To add a rule, write one file in this folder with a dataclass subclass and register it in ``select/__init__.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.errors import HeadwiseError
from headwise.select.pages import page_bounds, selected_tokens


@dataclass
class PageSummary:
    """Per-page key bounds ([B, P, d] each) of a head's first ``covered`` stored tokens (whole pages only)."""

    mins: torch.Tensor
    maxs: torch.Tensor
    covered: int

    def nbytes(self) -> int:
        return self.mins.nbytes + self.maxs.nbytes


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

    def summarize(self, keys: torch.Tensor, summary: PageSummary | None) -> PageSummary:
        """``summary`` extended to every whole page of ``keys`` [B, n, d] (built from scratch when None)."""
        whole = keys.shape[1] // self.page * self.page
        if summary is not None and summary.covered == whole:
            return summary
        start = summary.covered if summary is not None else 0
        mins, maxs = page_bounds(keys[:, start:whole], self.page)
        if summary is not None:
            mins, maxs = torch.cat([summary.mins, mins], dim=1), torch.cat([summary.maxs, maxs], dim=1)
        return PageSummary(mins, maxs, whole)

    def page_scores(self, query: torch.Tensor, keys: torch.Tensor, summary: PageSummary) -> torch.Tensor:
        """Scores [B, P] of the head's pages (the last, partial one included) for the query group [B, G, d]."""
        raise NotImplementedError

    def choose(self, query: torch.Tensor, keys: torch.Tensor,
               summary: PageSummary | None) -> tuple[torch.Tensor | None, PageSummary]:
        """Indices [B, k] of the tokens of ``keys`` [B, n, d] that query group ``query`` [B, G, d] reads (None:
        all of them), and the head's updated page summary."""
        n = keys.shape[1]
        summary = self.summarize(keys, summary)
        budget = self.tokens(n)
        if budget >= n:
            return None, summary
        index = selected_tokens(n, self.page_scores(query, keys, summary), self.page, budget, self.sinks,
                                self.window)
        return index, summary
