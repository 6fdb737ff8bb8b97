"""Attention kernels for the shapes where PyTorch's fused CPU attention is slow.

PyTorch's fused CPU attention (the flash kernel behind ``scaled_dot_product_attention``) parallelises over
query blocks. A decoding step has one query per head, so it gets no parallelism from them, and in bfloat16
it runs several times slower than two plain matrix products (BENCHMARKS.md, "Speed on CPU").
:func:`single_query_attention` is those two products. The scores come out as ``keys @ queries^T``, one
row per key: with the few query heads of a group as the short side, that product runs at the speed of
reading the keys, in bfloat16 as in float32, where ``queries @ keys^T`` takes several times longer.
"""

from __future__ import annotations

import torch


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
