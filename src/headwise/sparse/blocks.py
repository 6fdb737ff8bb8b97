"""Block-sparse prefill attention: each query block attends only to the key blocks its layout selects.

The maths as small pure functions over a layer's tensors. Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` KV
heads (``Hq`` a multiple: GQA), ``q`` queries, ``n`` keys, ``d`` head size. Blocks are ``block`` consecutive
positions counted from position 0, for queries and keys alike, so a chunk of queries that starts mid-block
(chunked prefill) shares the block grid of the whole prompt: query ``i`` of a call sits at position
``offset + i`` (``offset = n - q`` when the queries are the last ``q`` of the ``n`` keys).

A layout is a bool tensor ``[B, Hq, Qb, Kb]``: ``Qb`` query blocks (those the queries fall in, from the first
one's) by ``Kb = ceil(n / block)`` key blocks. :func:`block_sparse_attention` gathers only the selected key
blocks of every query block and computes attention over them, causal inside, with no mask or score over the
blocks it skips and no ``q x n`` matrix: its cost grows with the blocks selected.
"""

from __future__ import annotations

import math

import torch


def block_grid(q: int, n: int, block: int, offset: int | None = None) -> tuple[int, int, int]:
    """``(first query block, query blocks, key blocks)`` of ``q`` queries at positions ``offset..`` over ``n``
    keys (``offset`` defaults to ``n - q``)."""
    offset = n - q if offset is None else offset
    first = offset // block
    return first, (offset + q - 1) // block - first + 1, math.ceil(n / block)


def causal_layout(batch: int, heads: int, q: int, n: int, block: int, offset: int | None = None) -> torch.Tensor:
    """Every key block at or before each query block's own: the dense causal layout ``[B, H, Qb, Kb]``."""
    first, qb, kb = block_grid(q, n, block, offset)
    rows = torch.arange(first, first + qb)[:, None]
    return (torch.arange(kb)[None, :] <= rows).expand(batch, heads, qb, kb)


def causal_pairs(q: int, n: int, block: int, offset: int | None = None) -> torch.Tensor:
    """The causal (query, key) pairs [Qb, Kb] inside each block of the grid: the attention work a block holds
    (a diagonal block about half of a full one)."""
    offset = n - q if offset is None else offset
    first, qb, kb = block_grid(q, n, block, offset)
    positions = torch.arange(offset, offset + q)
    per_key_block = (positions[:, None] + 1 - torch.arange(kb)[None, :] * block).clamp(0, block)  # [q, Kb]
    return torch.zeros(qb, kb, dtype=torch.long).index_add_(0, positions // block - first, per_key_block)


def computed_work(layout: torch.Tensor, q: int, n: int, block: int, offset: int | None = None) -> tuple[int, int]:
    """``(computed, causal)``: the causal (query, key) pairs in the blocks the layout [B, H, Qb, Kb] computes,
    and all of them, summed over batch and heads."""
    pairs = causal_pairs(q, n, block, offset).to(layout.device)
    return int((layout * pairs).sum()), int(pairs.sum()) * layout.shape[0] * layout.shape[1]


def computed_fraction(layout: torch.Tensor, q: int, n: int, block: int, offset: int | None = None) -> float:
    """Of the causal attention (query, key) pairs, the fraction in the blocks the layout computes."""
    computed, causal = computed_work(layout, q, n, block, offset)
    return computed / causal


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: torch.Tensor,
    block: int,
    scale: float,
    offset: int | None = None,
    rows: int = 16,
) -> torch.Tensor:
    """Causal attention of ``query`` [B, Hq, q, d] over the key blocks ``layout`` [B, Hq, Qb, Kb] selects.

    ``key`` and ``value`` are [B, Hkv, n, d]; the result is [B, Hq, q, d], equal to dense causal attention whose
    mask also hides every key block the layout leaves out (a query with no visible key gets zeros). Query
    blocks are processed ``rows`` at a time, so memory stays bounded by ``rows`` query blocks x the most key
    blocks any of them selects.
    """
    b, hq, q, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    offset = n - q if offset is None else offset
    first, qb, kb = block_grid(q, n, block, offset)
    front = offset - first * block
    back = qb * block - front - q
    padded = torch.nn.functional.pad(query, (0, 0, front, back)).view(b, hq, qb, block, d)
    pad_keys = kb * block - n
    keys = torch.nn.functional.pad(key, (0, 0, 0, pad_keys)).view(b, hkv, kb, block, d)
    values = torch.nn.functional.pad(value, (0, 0, 0, pad_keys)).view(b, hkv, kb, block, d)
    kv_head = torch.arange(hq, device=query.device) // (hq // hkv)
    batch = torch.arange(b, device=query.device)[:, None, None, None]
    heads = kv_head[None, :, None, None]
    within = torch.arange(block, device=query.device)
    out = query.new_zeros(b, hq, qb, block, d)
    for start in range(0, qb, rows):
        part = layout[:, :, start : start + rows]  # [B, Hq, r, Kb]
        width = max(int(part.sum(dim=-1).max()), 1)
        # the selected key blocks of each query block, first the selected ones in order, then padding
        order = torch.sort(part.to(torch.int8), dim=-1, descending=True, stable=True)
        index, valid = order.indices[..., :width], order.values[..., :width].bool()  # [B, Hq, r, w]
        k_sel = keys[batch, heads, index]  # [B, Hq, r, w, block, d]
        v_sel = values[batch, heads, index]
        q_part = padded[:, :, start : start + rows]  # [B, Hq, r, block, d]
        scores = torch.einsum("bhrid,bhrwjd->bhriwj", q_part, k_sel) * scale
        q_pos = (first + start + torch.arange(part.shape[2], device=query.device))[:, None] * block + within
        k_pos = index[..., None] * block + within  # [B, Hq, r, w, block]
        allowed = (valid[..., None] & (k_pos < n))[:, :, :, None] & (
            k_pos[:, :, :, None] <= q_pos[None, None, :, :, None, None])
        scores = scores.masked_fill(~allowed, float("-inf")).flatten(-2)
        weights = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0).view_as(allowed)
        out[:, :, start : start + rows] = torch.einsum("bhriwj,bhrwjd->bhrid", weights.to(v_sel.dtype), v_sel)
    return out.view(b, hq, qb * block, d)[:, :, front : front + q]


def queries_per_key_head(key: torch.Tensor, hq: int) -> torch.Tensor:
    """``key`` [B, Hkv, n, d] repeated to [B, Hq, n, d], the key head each query head reads (GQA)."""
    return key.repeat_interleave(hq // key.shape[1], dim=1)


def grid_positions(q: int, n: int, block: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block rows [Qb, 1] of the queries and the block columns [1, Kb] of the keys, on the prompt's grid."""
    first, qb, kb = block_grid(q, n, block, offset)
    return torch.arange(first, first + qb)[:, None], torch.arange(kb)[None, :]


def smallest_set_reaching(mass: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per row of ``mass`` [..., k] (non-negative), the fewest entries whose sum reaches ``gamma`` of the row's
    total, largest first (ties by position); a bool mask of the same shape. A row of zeros selects nothing."""
    total = mass.sum(dim=-1, keepdim=True)
    ordered, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    before = ordered.cumsum(dim=-1) - ordered  # the mass of the larger entries, each entry's own left out
    keep = (before < gamma * total) & (ordered > 0)
    return torch.zeros_like(keep).scatter(-1, order, keep)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of the ``k`` largest entries of each row of ``scores`` [..., m] (all of them if k >= m; ties
    by position)."""
    k = min(k, scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, order, True)
