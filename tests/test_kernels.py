"""The attention kernels against naive references, and the cache's decoding steps in bfloat16."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from headwise.api import make_cache
from headwise.compat import forward
from headwise.kernels import causal_attention, single_query_attention


def naive(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None,
          bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Softmax of scaled dot products, one query head and one row at a time, in float64."""
    b, g, _, d = query.shape
    out = torch.zeros(b, g, 1, d, dtype=torch.float64)
    for i in range(b):
        for j in range(g):
            s = (keys[i, 0].double() @ query[i, j, 0].double()) * scale
            if bias is not None:
                s = s + bias[i, 0, 0].double()
            if allowed is not None:
                s = s.masked_fill(~allowed[i, 0, 0], float("-inf"))
            out[i, j, 0] = s.softmax(-1) @ values[i, 0].double()
    return out


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_single_query_attention_matches_naive(mask: str) -> None:
    torch.manual_seed(0)
    b, g, n, d = 2, 3, 37, 16
    query, keys, values = torch.randn(b, g, 1, d), torch.randn(b, 1, n, d), torch.randn(b, 1, n, d)
    allowed = torch.rand(b, 1, 1, n) > 0.3 if mask == "bool" else None
    bias = torch.randn(b, 1, 1, n) if mask == "additive" else None
    got = single_query_attention(query, keys, values, allowed if mask == "bool" else bias, 0.25)
    assert got.shape == (b, g, 1, d)
    torch.testing.assert_close(got.double(), naive(query, keys, values, allowed, bias, 0.25), atol=1e-5, rtol=1e-5)


def test_single_query_attention_in_bfloat16_is_close_to_float32() -> None:
    torch.manual_seed(1)
    query, keys, values = torch.randn(1, 3, 1, 64), torch.randn(1, 1, 512, 64), torch.randn(1, 1, 512, 64)
    got = single_query_attention(*(t.bfloat16() for t in (query, keys, values)), None, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), single_query_attention(query, keys, values, None, 0.125),
                               atol=0.02, rtol=0.02)


def naive_causal(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention of the last q positions, one query at a time, in float64."""
    b, hq, q, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    out = torch.zeros(b, hq, q, d, dtype=torch.float64)
    for i in range(b):
        for j in range(hq):
            kv = j // (hq // hkv)
            for r in range(q):
                seen = n - q + r + 1
                s = (keys[i, kv, :seen].double() @ query[i, j, r].double()) * scale
                out[i, j, r] = s.softmax(-1) @ values[i, kv, :seen].double()
    return out


@pytest.mark.parametrize(("q", "n"), [(23, 23), (7, 30), (1, 9), (40, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_matches_naive(q: int, n: int, dtype: torch.dtype) -> None:
    """Both paths (the fused kernel in float32, the query blocks in bfloat16, blocks of 8 here so that a
    forward spans several and ends in a partial one), GQA, queries that are the last of the keys."""
    torch.manual_seed(2)
    b, hq, hkv, d = 2, 6, 2, 16
    query, keys, values = (torch.randn(b, h, m, d) for h, m in ((hq, q), (hkv, n), (hkv, n)))
    got = causal_attention(*(t.to(dtype) for t in (query, keys, values)), 0.25, block=8)
    assert got.shape == (b, hq, q, d) and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 0.05  # bfloat16: scores and weights rounded to 8 bits
    torch.testing.assert_close(got.double(), naive_causal(query, keys, values, 0.25), atol=tolerance, rtol=tolerance)


@torch.inference_mode()
def test_bfloat16_decoding_steps_follow_float32() -> None:
    """A tiny model's greedy decoding from a headwise cache in bfloat16 stays near its float32 logits."""
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("llama").to(dtype)
        cache = make_cache(model, "full")
        ids = torch.arange(3, 40).view(1, -1)
        out = forward(model, cache, ids, logits_to_keep=1)
        steps = []
        for token in (5, 9, 11):
            out = forward(model, cache, torch.tensor([[token]]))
            steps.append(out.logits[0, -1].float())
        logits[dtype] = torch.stack(steps)
    torch.testing.assert_close(logits[torch.bfloat16], logits[torch.float32], atol=0.05, rtol=0.05)


@torch.inference_mode()
def test_decoding_from_shared_room_equals_transformers_cache() -> None:
    """Decoding steps past the end of one room (DECODE_ROOM) attend over all heads in one product, from buffers
    the heads share, and give transformers' own cache's logits; the bytes held are the shared buffers'."""
    from transformers import DynamicCache

    from headwise.cache import DECODE_ROOM

    model = tiny_model("llama")
    ids = torch.arange(3, 40).view(1, -1)
    tokens = torch.randint(0, 128, (DECODE_ROOM + 20,), generator=torch.Generator().manual_seed(0))
    reference = DynamicCache(config=model.config)
    model.set_attn_implementation("sdpa")
    forward(model, reference, ids)
    expected = [forward(model, reference, t.view(1, 1)).logits[0, -1] for t in tokens]
    cache = make_cache(model, "full")
    forward(model, cache, ids)
    for step, (token, want) in enumerate(zip(tokens, expected, strict=True)):
        got = forward(model, cache, token.view(1, 1)).logits[0, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    for layer in cache.compressed_layers:
        stacked = layer._stacked()
        assert stacked is not None and stacked[2] == ids.shape[1] + len(tokens)
        assert layer.nbytes() == layer.shared["keys"].nbytes + layer.shared["values"].nbytes
