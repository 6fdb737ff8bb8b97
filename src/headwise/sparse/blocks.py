"""Block-sparse prefill attention: each query block attends only to the key blocks its layout selects.

The maths as small pure functions over a layer's tensors. Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` KV
heads (``Hq`` a multiple: GQA), ``q`` queries, ``n`` keys, ``d`` head size. Blocks are ``block`` consecutive
positions counted from position 0, for queries and keys alike, so a chunk of queries that starts mid-block
(chunked prefill) shares the block grid of the whole prompt: query ``i`` of a call sits at position
``offset + i`` (``offset = n - q`` when the queries are the last ``q`` of the ``n`` keys).

A layout is a bool tensor ``[B, Hq, Qb, Kb]``: ``Qb`` query blocks (those the queries fall in, from the first
one's) by ``Kb = ceil(n / block)`` key blocks. :func:`block_sparse_attention` gathers only the selected key
blocks of every query block and computes attention over them with PyTorch's fused SDPA, causal inside, with no
mask or score over the blocks it skips and no ``q x n`` matrix: its cost grows with the blocks selected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


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
    max_blocks: int = 4096,
) -> torch.Tensor:
    """Causal attention of ``query`` [B, Hq, q, d] over the key blocks ``layout`` [B, Hq, Qb, Kb] selects.

    ``key`` and ``value`` are [B, Hkv, n, d]; the result is [B, Hq, q, d], equal to dense causal attention whose
    mask also hides every key block the layout leaves out (a query block with no causal block selected gets
    zeros). Each (query head, query block) is a task: its selected key blocks, gathered in order, are one
    contiguous run of keys, all visible but the query block's own, the last of the run, which is causal. So the
    tasks of equal width (and own block in or out) go to SDPA together, with lower-right causal
    alignment (:func:`torch.nn.attention.bias.causal_lower_right`) or no mask at all: the work grows with the
    blocks selected, at the speed of the fused kernel. At most ``max_blocks`` key blocks are gathered at once.
    """
    b, hq, q, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    offset = n - q if offset is None else offset
    first, qb, kb = block_grid(q, n, block, offset)
    front = offset - first * block
    queries = F.pad(query, (0, 0, front, qb * block - front - q)).reshape(b * hq * qb, block, d)
    keys = F.pad(key, (0, 0, 0, kb * block - n)).reshape(b * hkv * kb, block, d)
    values = F.pad(value, (0, 0, 0, kb * block - n)).reshape(b * hkv * kb, block, d)
    chosen = (layout & causal_layout(b, hq, q, n, block, offset).to(layout.device)).reshape(-1, kb)  # [T, Kb]
    width = chosen.sum(dim=-1)
    rows = (first + torch.arange(qb, device=layout.device)).repeat(b * hq)
    own = chosen.gather(1, rows[:, None]).squeeze(1)
    # each task's first key block in the flat keys: its batch and KV head (query head h reads h // group)
    task = torch.arange(b * hq * qb, device=layout.device)
    base = ((task // (hq * qb)) * hkv + (task // qb) % hq // (hq // hkv)) * kb
    order = torch.sort(chosen.to(torch.int8), dim=-1, descending=True, stable=True).indices  # selected, ascending
    out = query.new_zeros(b * hq * qb, block, d)
    for w, has_own in torch.unique(torch.stack([width, own.long()], dim=1), dim=0).tolist():
        if w == 0:
            continue
        mask = causal_lower_right(block, w * block) if has_own else None
        tasks = torch.nonzero((width == w) & (own == bool(has_own))).flatten()
        for part in tasks.split(max(1, max_blocks // w)):
            index = (order[part, :w] + base[part, None]).flatten()  # the flat key blocks, w per task
            runs = (len(part), w * block, d)
            out.index_copy_(0, part, F.scaled_dot_product_attention(  # 4-D: [1, t, ...] takes the fused kernel
                queries.index_select(0, part)[None], keys.index_select(0, index).view(runs)[None],
                values.index_select(0, index).view(runs)[None], attn_mask=mask, scale=scale)[0])
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
