"""Block-sparse prefill: the block maths against naive dense references on random tensors (GQA, chunks)."""

from __future__ import annotations

import pytest
import torch

from headwise.errors import HeadwiseError
from headwise.sparse import AShape, CumulativeMass, Dense, MoBA, VerticalSlash, parse_pattern
from headwise.sparse.blocks import (
    block_grid,
    block_sparse_attention,
    causal_layout,
    causal_pairs,
    computed_fraction,
    smallest_set_reaching,
    top_k_mask,
)
from headwise.sparse.mass import antidiagonal_mass
from headwise.sparse.plan import plan_from_profile


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
    got = block_sparse_attention(query, key, value, layout, block, 0.3, max_blocks=3)
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
    layout[..., 0] = True  # the first key block for every query block: 36 + 3 * 64 of the 528 causal pairs
    assert computed_fraction(layout, 32, 32, 8) == pytest.approx(228 / 528)
    layout[0, 0, 0, 3] = True  # a block after the query's own is not causal: not counted
    assert computed_fraction(layout, 32, 32, 8) == pytest.approx(228 / 528)


@pytest.mark.parametrize(("q", "n", "block"), [(32, 32, 8), (13, 50, 8), (7, 7, 4), (20, 45, 16)])
def test_causal_pairs_counts_the_pairs_of_every_block(q, n, block):
    offset = n - q
    first = offset // block
    expected = torch.zeros(block_grid(q, n, block)[1:], dtype=torch.long)
    for i in range(offset, n):
        for j in range(i + 1):
            expected[i // block - first, j // block] += 1
    assert torch.equal(causal_pairs(q, n, block), expected)


def test_ashape_selects_the_sinks_and_a_local_band_of_causal_blocks():
    pattern = AShape(block=8, min_length=0, last_dense=0, sink_blocks=1, local_blocks=2)
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
    everything = AShape(block=8, min_length=0, last_dense=0, sink_blocks=1, local_blocks=100)  # every causal block
    logits = {}
    for name, pattern in (("dense", None), ("all blocks", everything),
                          ("ashape", AShape(block=8, min_length=0, last_dense=0, local_blocks=2))):
        cache = make_cache(model, "full", sparse=pattern)
        logits[name] = prefill(model, prompt, cache, chunk_size=chunk)
        if name == "ashape":
            assert 0.1 < cache.computed_fraction() < 0.4
        elif name == "all blocks":
            assert cache.computed_fraction() == 1.0
    torch.testing.assert_close(logits["all blocks"], logits["dense"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits["ashape"], logits["dense"])


def test_smallest_set_reaching_and_top_k_match_a_sort_by_hand():
    torch.manual_seed(3)
    mass = torch.rand(5, 9) ** 3
    mass[2] = 0
    for gamma in (0.3, 0.8, 1.0):
        got = smallest_set_reaching(mass, gamma)
        for row, picked in zip(mass, got, strict=True):
            expected, total = set(), 0.0
            for j in sorted(range(9), key=lambda j: (-row[j].item(), j)):
                if total >= gamma * row.sum().item() or row[j] == 0:
                    break
                expected.add(j)
                total += row[j].item()
            assert set(torch.nonzero(picked).flatten().tolist()) == expected
    top = top_k_mask(mass, 3)
    for row, picked in zip(mass, top, strict=True):
        assert set(torch.nonzero(picked).flatten().tolist()) == set(sorted(range(9), key=lambda j: (-row[j], j))[:3])
    assert top_k_mask(mass, 20).all()


def naive_antidiagonal_mass(query, key, offset, block, stride, scale):
    """Tile by tile: the mean of each stride x stride tile's antidiagonal, softmaxed over the causal tiles of a
    row of tiles, summed into blocks."""
    b, hq, q, d = query.shape
    n, group = key.shape[2], hq // key.shape[1]
    first, qb, kb = block_grid(q, n, block, offset)
    out = torch.zeros(b, hq, qb, kb)
    for bi in range(b):
        for h in range(hq):
            for a in range(first * block // stride, (first + qb) * block // stride):
                if not ((a + 1) * stride > offset and a * stride < offset + q):
                    continue  # a tile row with no query of this forward
                logits = []
                for t in range(a + 1):
                    if t * stride >= n:
                        break
                    total = 0.0
                    for s in range(stride):
                        i, j = a * stride + stride - 1 - s, t * stride + s
                        qi = query[bi, h, i - offset] if offset <= i < offset + q else torch.zeros(d)
                        kj = key[bi, h // group, j] if j < n else torch.zeros(d)
                        total = total + qi @ kj
                    logits.append(total * scale / stride)
                weights = torch.stack(logits).softmax(dim=0)
                for t, w in enumerate(weights):
                    out[bi, h, a * stride // block - first, t * stride // block] += w
    return out


@pytest.mark.parametrize(("q", "n"), [(32, 32), (19, 48), (40, 45)])
def test_antidiagonal_mass_matches_the_tiles_by_hand(q, n):
    torch.manual_seed(q + n)
    query, key = torch.randn(1, 4, q, 4), torch.randn(1, 2, n, 4)
    got = antidiagonal_mass(query, key, n - q, 8, 4, 0.5)
    torch.testing.assert_close(got, naive_antidiagonal_mass(query, key, n - q, 8, 4, 0.5), rtol=1e-4, atol=1e-5)


def test_vertical_slash_finds_a_column_and_a_distance_by_hand():
    """The last queries all look at key block 2 and two blocks back: those are the vertical and the slash."""
    n, block, d = 64, 8, 8
    key = torch.randn(1, 1, n, d) * 0.01
    query = torch.randn(1, 1, n, d) * 0.01
    key[0, 0, 16:24] = 4.0  # block 2 attracts every query
    key[0, 0, 16:24, 1:] = 0.0
    query[..., 0] = 4.0
    pattern = VerticalSlash(block=block, min_length=0, last_dense=0, last_q=8, vertical=1, slash=0)
    layout = pattern.layout(query, key, 0)[0, 0]
    for row in range(8):
        expected = {0, row} | ({2} if row >= 2 else set())
        assert set(torch.nonzero(layout[row]).flatten().tolist()) == expected
    # a slash: each query looks exactly 16 positions back
    query, key = torch.zeros(1, 1, n, n), torch.eye(n)[None, None] * 20
    for i in range(16, n):
        query[0, 0, i, i - 16] = 20
    pattern = VerticalSlash(block=block, min_length=0, last_dense=0, last_q=8, vertical=0, slash=1)
    layout = pattern.layout(query, key, 0)[0, 0]
    for row in range(8):
        # distance 16 is block distance 2; token distances 16..23 cross block distances 2 and 3
        expected = {0, row} | {c for c in (row - 3, row - 2) if c >= 0}
        assert set(torch.nonzero(layout[row]).flatten().tolist()) == expected


def test_moba_gates_by_mean_query_against_mean_key():
    torch.manual_seed(0)
    n, block = 48, 8
    query, key = torch.randn(1, 2, n, 4), torch.randn(1, 1, n, 4)
    layout = MoBA(block=block, min_length=0, last_dense=0, top_k=2).layout(query, key, 0)
    mean_q, mean_k = query.view(1, 2, 6, 8, 4).mean(3), key.view(1, 1, 6, 8, 4).mean(3)
    for h in range(2):
        for row in range(6):
            gates = {c: float(mean_q[0, h, row] @ mean_k[0, 0, c]) for c in range(row)}
            expected = {row} | set(sorted(gates, key=lambda c: -gates[c])[:2])
            assert set(torch.nonzero(layout[0, h, row]).flatten().tolist()) == expected


@pytest.mark.parametrize("pattern", [VerticalSlash(block=8, min_length=0, last_dense=0, vertical=10, slash=0),
                                     CumulativeMass(block=8, min_length=0, last_dense=0, gamma=1.0, stride=4),
                                     MoBA(block=8, min_length=0, last_dense=0, top_k=10),
                                     Dense(block=8, min_length=0, last_dense=0)])
def test_each_pattern_at_its_widest_is_every_causal_block(pattern):
    torch.manual_seed(1)
    query, key = torch.randn(1, 4, 70, 8), torch.randn(1, 2, 70, 8)
    assert torch.equal(pattern.layout(query, key, 0), causal_layout(1, 4, 70, 70, 8))
    chunk = pattern.layout(query[:, :, 50:], key, 50)  # a later chunk
    assert torch.equal(chunk, causal_layout(1, 4, 20, 70, 8, 50))


def test_patterns_keep_the_first_block_and_the_own_block_and_stay_causal():
    torch.manual_seed(2)
    query, key = torch.randn(1, 3, 100, 8), torch.randn(1, 1, 100, 8)
    for pattern in (VerticalSlash(block=8, min_length=0, last_dense=0, vertical=1, slash=1),
                    CumulativeMass(block=8, min_length=0, last_dense=0, gamma=0.5, stride=4)):
        layout = pattern.layout(query, key, 0)
        causal = causal_layout(1, 3, 100, 100, 8)
        assert not (layout & ~causal).any()
        assert layout[..., 0].all() and torch.diagonal(layout, dim1=-2, dim2=-1).all()
        assert computed_fraction(layout, 100, 100, 8) < 0.9
    with pytest.raises(HeadwiseError, match="stride"):
        CumulativeMass(block=8, stride=3)
    assert parse_pattern("mass:gamma=0.5").describe() == ("mass:block=64,min_length=1024,last_dense=64,gamma=0.5,"
                                                          "stride=8")


def test_the_last_queries_of_a_forward_attend_densely():
    query, key = torch.randn(1, 2, 40, 4), torch.randn(1, 1, 40, 4)
    pattern = AShape(block=8, min_length=0, last_dense=10, local_blocks=1)
    layout = pattern.layout(query, key, 0)
    dense = causal_layout(1, 2, 40, 40, 8)
    assert torch.equal(layout[:, :, 3:], dense[:, :, 3:])  # positions 30..39 fall in blocks 3 and 4
    assert torch.nonzero(layout[0, 0, 2]).flatten().tolist() == [0, 2]
    # a question of 10 tokens after a sealed context of 30: all dense
    assert torch.equal(pattern.layout(query[:, :, 30:], key, 30), causal_layout(1, 2, 10, 40, 8, 30))


def test_a_plan_from_a_profile_gives_each_head_its_pattern_through_the_cache(tmp_path):
    import json

    from conftest import tiny_model
    from headwise.api import make_cache
    from headwise.generation import prefill
    from headwise.profile.schema import HeadProfile
    from test_headwise_policy import synthetic_profile

    model = tiny_model("llama")  # 3 layers x 2 KV heads
    roles = [["retrieval", "local"], ["mixed", "local"], ["sink", "mixed"]]
    profile = HeadProfile.load(synthetic_profile(model, tmp_path, roles, [[0.6, 0.0], [0.0, 0.0], [0.0, 0.05]]))
    small = "block=8,min_length=0,last_dense=0"
    plan = plan_from_profile(profile, {"streaming": f"ashape:{small},local_blocks=2", "retrieval": "dense",
                                       "other": f"mass:{small},gamma=0.5"})
    assert plan["heads"] == [["retrieval", "streaming"], ["other", "streaming"], ["streaming", "other"]]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    prompt = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(1))
    cache = make_cache(model, "full", sparse=str(path))
    assert "ashape 3" in cache.plan.sparse.describe() and "dense 1" in cache.plan.sparse.describe()
    prefill(model, prompt, cache, chunk_size=50)
    fractions = cache.computed_fractions()
    assert fractions[0][0] == 1.0  # the retrieval head computed densely
    assert fractions[0][1] == pytest.approx(fractions[1][1]) and fractions[0][1] < 0.5  # A-shape's share
    assert 0 < fractions[1][0] < 1 and 0 < cache.computed_fraction() < 1
    # every head dense: the dense answer, exactly
    plan["heads"] = [["dense", "dense"]] * 3
    path.write_text(json.dumps(plan))
    dense = make_cache(model, "full", sparse=str(path))
    torch.testing.assert_close(prefill(model, prompt, dense), prefill(model, prompt, make_cache(model, "full")))
    assert dense.computed_fraction() == 1.0
    plan["heads"] = [["dense", "dense"]] * 2
    path.write_text(json.dumps(plan))
    with pytest.raises(HeadwiseError, match="the model has 3 of 2"):
        make_cache(model, "full", sparse=str(path))
    plan["heads"] = [["dense", "nonsense"]] * 3
    path.write_text(json.dumps(plan))
    with pytest.raises(HeadwiseError, match="unknown sparse pattern 'nonsense'"):
        make_cache(model, "full", sparse=str(path))


def test_sparse_plan_command_writes_an_editable_plan(tmp_path, capsys):
    import json

    from conftest import tiny_model
    from headwise.cli import SPARSE_KINDS as KINDS
    from headwise.cli import main
    from headwise.sparse.plan import ROLE_PATTERNS
    from test_headwise_policy import synthetic_profile

    assert set(KINDS) == set(ROLE_PATTERNS)
    profile = synthetic_profile(tiny_model("llama"), tmp_path, [["retrieval", "local"]] * 3, [[0.6, 0.0]] * 3)
    out = tmp_path / "plan.json"
    assert main(["sparse-plan", "--profile", profile, "--out", str(out), "--other", "moba:top_k=2"]) == 0
    plan = json.loads(out.read_text())
    assert plan["patterns"] == {**ROLE_PATTERNS, "other": "moba:top_k=2"}
    assert plan["heads"] == [["retrieval", "streaming"]] * 3 and "ashape 3, dense 3" in capsys.readouterr().out
    assert out.read_text().count("\n") == 16  # one line per layer
    assert main(["sparse-plan", "--profile", profile, "--out", str(out), "--streaming", "bogus"]) == 2


@pytest.mark.parametrize("spec", ["ashape", "vertical_slash", "mass", "moba"])
def test_patterns_choose_the_same_blocks_in_bfloat16(spec: str) -> None:
    """A bfloat16 model's queries and keys choose blocks as their float32 values would (selection scores in
    float32), and the kernel computes them in bfloat16."""

    torch.manual_seed(0)
    pattern = parse_pattern(f"{spec}:block=16,min_length=0,last_dense=0")
    query, key, value = torch.randn(1, 4, 128, 16), torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    q16, k16, v16 = (t.bfloat16() for t in (query, key, value))
    layout = pattern.layout(q16, k16, 0)
    assert torch.equal(layout, pattern.layout(q16.float(), k16.float(), 0))
    out = block_sparse_attention(q16, k16, v16, layout, 16, 0.25, 0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), block_sparse_attention(q16.float(), k16.float(), v16.float(), layout, 16,
                                                                   0.25, 0), atol=0.02, rtol=0.02)
