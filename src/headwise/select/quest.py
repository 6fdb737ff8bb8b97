"""Quest: query-aware page selection by an upper bound of the attention a page can receive.

Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (ICML). Each page keeps
the elementwise minimum and maximum of its keys; for the current query, ``sum_d max(q_d min_d, q_d max_d)``
bounds the logit of any key in the page, and the pages with the highest bounds are read. Here the bound of a
KV head's page is the largest over the query heads of its GQA group, so a page one of them needs is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.select.base import PageSummary, Selector
from headwise.select.pages import page_bounds, upper_bound_scores


@dataclass
class Quest(Selector):
    """Read the pages whose key bounds promise the largest attention logit (Quest)."""

    name = "quest"

    def page_scores(self, query: torch.Tensor, keys: torch.Tensor, summary: PageSummary) -> torch.Tensor:
        mins, maxs = summary.mins, summary.maxs
        if keys.shape[1] > summary.covered:  # the partial last page, summarized on the fly
            tail_min, tail_max = page_bounds(keys[:, summary.covered:], self.page)
            mins, maxs = torch.cat([mins, tail_min], dim=1), torch.cat([maxs, tail_max], dim=1)
        return upper_bound_scores(query, mins, maxs)
