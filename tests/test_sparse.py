"""Block-sparse prefill: the block maths against naive dense references on random tensors (GQA, chunks)."""

from __future__ import annotations

import pytest
import torch

from headwise.errors import HeadwiseError
from headwise.sparse import AShape
from headwise.sparse.blocks import block_grid, block_sparse_attention, causal_layout, computed_fraction


def naive(query, key, value, layout, block, scale, offset):
    """Dense attention, one query at a time, over the keys that are causal and in a selected block."""
    b, hq, q, _ = query.shape
    group = hq // key.shape[1]
    first = offset // block
    out = torch.zeros_like(query)
    for bi in range(b):
        for h in range(hq):
            for i in range(q):
                pos = offset + i
                keys = [j for j in range(key.shape[2]) if j <= pos and layout[bi, h, pos // block - first, j // block]]
                if not keys:
                    continue
                logits = torch.stack([query[bi, h, i] @ key[bi, h // group, j] for j in keys]) * scale
                weights = logits.softmax(dim=0)
                out[bi, h, i] = sum(w * value[bi, h // group, j] for w, j in zip(weights, keys, strict=True))
    return out


@pytest.mark.parametrize(("q", "n", "block", "hq", "hkv"),
                         [(40, 40, 8, 4, 2), (37, 37, 8, 3, 1), (13, 50, 8, 2, 2), (21, 64, 16, 6, 3)])
def test_block_sparse_attention_matches_dense_over_the_same_blocks(q, n, block, hq, hkv):
    torch.manual_seed(q * n)
    query, key, value = torch.randn(2, hq, q, 8), torch.randn(2, hkv, n, 8), torch.randn(2, hkv, n, 8)
    offset = n - q  # the last q of n tokens: a whole prompt when q == n, a later chunk otherwise
    _, qb, kb = block_grid(q, n, block)
    layout = torch.rand(2, hq, qb, kb) < 0.5
    got = block_sparse_attention(query, key, value, layout, block, 0.3, rows=2)
    torch.testing.assert_close(got, naive(query, key, value, layout, block, 0.3, offset), rtol=1e-4, atol=1e-5)


def test_the_causal_layout_is_dense_causal_attention():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    layout = causal_layout(1, 4, 30, 30, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.5,
                                                                enable_gqa=True)
    torch.testing.assert_close(block_sparse_attention(query, key, value, layout, 8, 0.5), expected,
                               rtol=1e-5, atol=1e-5)
    assert computed_fraction(layout, 30, 30, 8) == 1.0


def test_block_grid_and_computed_fraction():
    assert block_grid(40, 40, 8) == (0, 5, 5)
    assert block_grid(13, 50, 8) == (4, 3, 7)  # positions 37..49: blocks 4, 5, 6
    layout = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    layout[..., 0] = True  # the first key block for every query block: 4 of the 10 causal blocks
    assert computed_fraction(layout, 32, 32, 8) == pytest.approx(0.4)
    layout[0, 0, 0, 3] = True  # a block after the query's own is not causal: not counted
    assert computed_fraction(layout, 32, 32, 8) == pytest.approx(0.4)


def test_ashape_selects_the_sinks_and_a_local_band_of_causal_blocks():
    pattern = AShape(block=8, min_length=0, sink_blocks=1, local_blocks=2)
    query, key = torch.randn(1, 2, 40, 4), torch.randn(1, 1, 40, 4)
    layout = pattern.layout(query, key, 0)
    for qb in range(5):
        expected = sorted({0} | {k for k in (qb - 1, qb) if k >= 0})
        assert torch.nonzero(layout[0, 1, qb]).flatten().tolist() == expected
    # a later chunk (positions 30..39) shares the prompt's block grid: its query blocks are 3 and 4
    chunk = pattern.layout(query[:, :, 30:], key, 30)
    assert torch.equal(chunk, layout[:, :, 3:])
    # below min_length, every causal block
    assert torch.equal(AShape(block=8, min_length=41).layout(query, key, 0), causal_layout(1, 2, 40, 40, 8))
    with pytest.raises(HeadwiseError, match="local_blocks"):
        AShape(local_blocks=0)


@pytest.mark.parametrize("chunk", [None, 48])
def test_sparse_prefill_through_the_cache_equals_dense_over_the_same_blocks(chunk):
    from conftest import tiny_model
    from headwise.api import make_cache
    from headwise.generation import prefill

    model = tiny_model("llama")
    prompt = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(1))
    everything = AShape(block=8, min_length=0, sink_blocks=1, local_blocks=100)  # every causal block
    logits = {}
    for name, pattern in (("dense", None), ("all blocks", everything),
                          ("ashape", AShape(block=8, min_length=0, local_blocks=2))):
        cache = make_cache(model, "full", sparse=pattern)
        logits[name] = prefill(model, prompt, cache, chunk_size=chunk)
        if name == "ashape":
            assert 0.1 < cache.computed_fraction() < 0.4
        elif name == "all blocks":
            assert cache.computed_fraction() == 1.0
    torch.testing.assert_close(logits["all blocks"], logits["dense"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits["ashape"], logits["dense"])
