"""Attention kernels for the shapes where PyTorch's fused CPU attention is slow.

PyTorch's fused CPU attention (the flash kernel behind ``scaled_dot_product_attention``) runs no faster in
bfloat16 than in float32 (3.9 s against 3.7 s of a 4K-token prefill's attention on SmolLM2-135M), so it gains
nothing from the CPU's bfloat16 dot products, and it parallelises over query blocks, so a decoding step (one
query per head) gets no parallelism at all. Measured on SmolLM2-135M's shapes (BENCHMARKS.md, "Speed on CPU"):

* :func:`single_query_attention` is a decoding step as two plain matrix products. The scores come out as
  ``keys @ queries^T``, one row per key: with the few query heads of a group as the short side, that product
  runs at the speed of reading the keys, in bfloat16 as in float32, where ``queries @ keys^T`` takes several
  times longer.
* :func:`causal_attention` is a causal prefill. In bfloat16 it runs block of queries by block of queries,
  one KV head at a time, as two bfloat16 products and a softmax over the keys each block may see: about 1.8x
  faster than the fused kernel at 4K and 8K tokens. In float32 the fused kernel is the faster, so it is used.

In bfloat16 both round as transformers' ``eager`` attention does: the scores and the attention weights are
held in bfloat16, the softmax sums in float32. The fused kernel keeps its scores in float32, so its bfloat16
outputs are a little closer to float32's; the tests bound both, and the benchmark's precision match
(BENCHMARKS.md, "Precision") measures what it does to answers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_BLOCK = 128  # queries per block of causal_attention: faster than 256 at 4K and 8K, and than 64 at 8K


def single_query_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of one query per head, ``query`` [B, Hq, 1, d], over ``keys`` and ``values`` [B, Hkv, n, d]
    (GQA: each run of ``Hq / Hkv`` query heads shares one KV head).

    ``mask`` is None, a bool tensor (True: may attend) or an additive float tensor, of a shape that
    broadcasts to [B, 1, 1, n]. Returns [B, Hq, 1, d], equal to ``scaled_dot_product_attention`` up to
    rounding: the products run in the inputs' dtype, the softmax in float32.
    """
    b, hq, _, d = query.shape
    hkv = keys.shape[1]
    columns = query.reshape(b, hkv, hq // hkv, d).transpose(-1, -2)  # [B, Hkv, d, G]: a group's queries side by side
    scores = torch.matmul(keys, columns).transpose(-1, -2).float() * scale  # [B, Hkv, G, n]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(dim=-1).to(values.dtype)
    return torch.matmul(weights, values).view(b, hq, 1, d)


def causal_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, block: int = QUERY_BLOCK
) -> torch.Tensor:
    """Causal attention of ``query`` [B, Hq, q, d], the last ``q`` of the ``n`` positions of ``keys`` and
    ``values`` [B, Hkv, n, d] (GQA), each query seeing the keys up to its own position. Returns [B, Hq, q, d].

    bfloat16 inputs take the blockwise products, ``block`` queries at a time (module docstring); any other dtype
    takes PyTorch's fused kernel.
    """
    if query.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=_causal_mask(query, keys), scale=scale, enable_gqa=True,
            is_causal=query.shape[2] == keys.shape[2])
    b, hq, q, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    group, offset = hq // hkv, n - q
    above = torch.ones(block, block, dtype=torch.bool, device=query.device).triu_(1)
    output = torch.empty(b, hq, q, d, dtype=query.dtype, device=query.device)
    query = query * scale  # scaled once here, not every block's scores (exact for a power of two, as 1/sqrt(64))
    for h in range(hkv):  # one KV head at a time: its blocks of scores stay in the CPU's caches
        heads = slice(h * group, (h + 1) * group)
        queries, keys_t, head_values = query[:, heads], keys[:, h : h + 1].mT, values[:, h : h + 1]
        for start in range(0, q, block):
            rows = min(block, q - start)
            seen = offset + start + rows  # the keys this block's last query may see
            scores = torch.matmul(queries[:, :, start : start + rows], keys_t[..., :seen])  # [B, G, rows, seen]
            scores[..., offset + start :].masked_fill_(above[:rows, :rows], float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            output[:, heads, start : start + rows] = torch.matmul(weights, head_values[..., :seen, :])
    return output


def _causal_mask(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """The bool mask of the last ``q`` queries over ``n`` keys (None when ``q == n``: SDPA's own causal flag)."""
    q, n = query.shape[2], keys.shape[2]
    if q == n:
        return None
    return torch.arange(n, device=query.device)[None, :] <= torch.arange(n - q, n, device=query.device)[:, None]
