"""The maths of decode-time selection, as small pure functions over one KV head's tensors.

Shapes: ``B`` batch, ``n`` stored tokens, ``d`` head size, ``G`` query heads of the head's GQA group, ``P`` pages
of ``page`` consecutive stored tokens (the last one may be partial).
"""

from __future__ import annotations

import math

import torch


def page_count(n: int, page: int) -> int:
    return math.ceil(n / page)


def page_bounds(keys: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise minimum and maximum of the keys [B, n, d] of every page: two [B, P, d] tensors."""
    b, n, d = keys.shape
    pad = page_count(n, page) * page - n
    padded_min = torch.cat([keys, keys.new_full((b, pad, d), float("inf"))], dim=1)
    padded_max = torch.cat([keys, keys.new_full((b, pad, d), float("-inf"))], dim=1)
    return (padded_min.view(b, -1, page, d).amin(dim=2), padded_max.view(b, -1, page, d).amax(dim=2))


def upper_bound_scores(query: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor) -> torch.Tensor:
    """Quest's bound on the attention logit a page can give: ``sum_d max(q_d min_d, q_d max_d)`` per query head,
    the largest over the group's query heads ([B, G, d] queries, [B, P, d] bounds -> [B, P])."""
    q = query[:, :, None, :]  # [B, G, 1, d]
    bound = torch.maximum(q * mins[:, None], q * maxs[:, None]).sum(dim=-1)  # [B, G, P]
    return bound.amax(dim=1)


def selected_tokens(n: int, page_scores: torch.Tensor, page: int, budget: int, sinks: int,
                    window: int) -> torch.Tensor:
    """The stored tokens one decoding step reads, sorted: [B, k] indices into the head's n tokens.

    The first ``sinks`` tokens and the last ``window`` are always read; then whole pages, best ``page_scores``
    [B, P] first, while they fit in ``budget`` tokens (a page already read in part by the sinks or window
    costs only its other tokens). Every row reads the same number of tokens, so the result is rectangular;
    when the budget covers all ``n`` tokens, all are read.
    """
    b = page_scores.shape[0]
    device = page_scores.device
    if budget >= n:
        return torch.arange(n, device=device).expand(b, n)
    forced = torch.zeros(n, dtype=torch.bool, device=device)
    forced[: min(sinks, n)] = True
    if window:
        forced[max(0, n - window):] = True
    room = budget - int(forced.sum())
    order = page_scores.argsort(dim=1, descending=True)  # [B, P]
    chosen = forced.expand(b, n).clone()
    if room > 0:
        token_page = torch.arange(n, device=device) // page
        fresh = torch.zeros(b, page_scores.shape[1], dtype=torch.long, device=device)
        fresh.scatter_add_(1, token_page.expand(b, n), (~chosen).long())  # unread tokens per page
        gain = fresh.gather(1, order)  # in order of preference
        fits = gain.cumsum(dim=1) <= room
        pages = torch.zeros_like(fresh, dtype=torch.bool).scatter(1, order, fits)
        chosen |= pages.gather(1, token_page.expand(b, n))
    # equal counts per row: pad a short row with its best remaining tokens (by page score, then recency)
    k = int(chosen.sum(dim=1).max())
    rank = page_scores.gather(1, (torch.arange(n, device=device) // page).expand(b, n)).float()
    rank = torch.where(chosen, torch.full_like(rank, float("inf")), rank)
    return rank.topk(k, dim=1).indices.sort(dim=1).values


def soft_vote(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Token criticality by a soft vote of the query heads: each head's attention distribution over the keys
    (softmax of ``q k / sqrt(d)``), summed over the group ([B, G, d] queries, [B, n, d] keys -> [B, n])."""
    logits = torch.einsum("bgd,bnd->bgn", query.float(), keys.float()) * query.shape[-1] ** -0.5
    return logits.softmax(dim=-1).sum(dim=1)


def least_similarity(query: torch.Tensor, other: torch.Tensor) -> float:
    """The smallest cosine similarity between the matching query heads of two groups [B, G, d], over rows too."""
    return float(torch.nn.functional.cosine_similarity(query.float(), other.float(), dim=-1).min())


def extended(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Token scores [B, m] of a head's first m tokens, ranked below none of the ``n - m`` stored since: [B, n]."""
    return torch.cat([scores, scores.new_full((scores.shape[0], n - scores.shape[1]), float("inf"))], dim=1)


def page_sums(token_scores: torch.Tensor, page: int) -> torch.Tensor:
    """Token scores [B, n] summed over pages of ``page`` tokens (the last may be partial): [B, P]."""
    b, n = token_scores.shape
    if page == 1:
        return token_scores
    pad = page_count(n, page) * page - n
    return torch.cat([token_scores, token_scores.new_zeros(b, pad)], dim=1).view(b, -1, page).sum(dim=2)
