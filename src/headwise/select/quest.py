"""Quest: query-aware page selection by an upper bound of the attention a page can receive.

Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (ICML). Each page keeps
the elementwise minimum and maximum of its keys; for the current query, ``sum_d max(q_d min_d, q_d max_d)``
bounds the logit of any key in the page, and the pages with the highest bounds are read. Here the bound of a
KV head's page is the largest over the query heads of its GQA group, so a page one of them needs is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.select.base import Choice, RuleState, Selector
from headwise.select.pages import page_bounds, page_count, upper_bound_scores


@dataclass
class PageSummary(RuleState):
    """Per-page key bounds ([B, P, d] each) of a head's first ``covered`` stored tokens (whole pages only)."""

    mins: torch.Tensor
    maxs: torch.Tensor
    covered: int


@dataclass
class Quest(Selector):
    """Read the pages whose key bounds promise the largest attention logit (Quest)."""

    name = "quest"

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

    def choose(self, query: torch.Tensor, keys: torch.Tensor, state: RuleState | None) -> Choice:
        n = keys.shape[1]
        summary = self.summarize(keys, state if isinstance(state, PageSummary) else None)
        if self.tokens(n) >= n:
            return Choice(None, summary)
        mins, maxs = summary.mins, summary.maxs
        if n > summary.covered:  # the partial last page, summarized on the fly
            tail_min, tail_max = page_bounds(keys[:, summary.covered:], self.page)
            mins, maxs = torch.cat([mins, tail_min], dim=1), torch.cat([maxs, tail_max], dim=1)
        # a page's two bound vectors weigh as much as one token's key and value
        return Choice(self.pick(n, upper_bound_scores(query, mins, maxs)), summary, float(page_count(n, self.page)))
