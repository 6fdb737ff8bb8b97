"""KVzip (headwise.policies.kvzip): the reconstruction's attention against a naive reference, the chunked
reconstruction against one forward over the whole copy, and caches built from it."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from headwise.api import make_cache, make_plan
from headwise.bench.runner import plan_cells
from headwise.dense import LayerTensors, capture, compress, reconstruct
from headwise.errors import HeadwiseError
from headwise.policies.kvzip import reconstruction_attention


def naive_reconstruction(query, keys, n, scaling):
    """Per query head and query: a causal softmax over the keys up to the query's position; max over queries,
    then over the query heads of each KV head."""
    b, hq, m, _ = query.shape
    kv, total = keys.shape[1], keys.shape[2]
    group = hq // kv
    out = torch.zeros(b, kv, n)
    for batch in range(b):
        for qh in range(hq):
            for i in range(m):
                pos = total - m + i
                logits = torch.stack([query[batch, qh, i] @ keys[batch, qh // group, j] for j in range(pos + 1)])
                weights = torch.softmax(logits * scaling, dim=0)
                seen = min(n, pos + 1)
                out[batch, qh // group, :seen] = torch.maximum(out[batch, qh // group, :seen], weights[:seen])
    return out


@pytest.mark.parametrize(("hq", "kv", "block"), [(4, 2, 3), (3, 3, 256), (6, 1, 5)])
def test_reconstruction_attention_matches_naive_reference(hq, kv, block):
    torch.manual_seed(hq + kv)
    n, m, d = 9, 7, 8
    query, keys = torch.randn(2, hq, m, d), torch.randn(2, kv, n + m, d)
    got = reconstruction_attention(query, keys, n, d ** -0.5, block=block)
    assert got.shape == (2, kv, n)
    torch.testing.assert_close(got, naive_reconstruction(query, keys, n, d ** -0.5))


def test_chunked_reconstruction_is_the_max_over_its_chunks():
    """Each chunk runs on its own copy of the context's cache: its scores are those of one forward over the context,
    the request and that chunk alone (captured here directly); the result is their maximum."""
    model = tiny_model("llama")
    torch.manual_seed(2)
    context, request, copy_ids = (torch.randint(0, 128, (k,)).tolist() for k in (40, 3, 30))
    got = reconstruct(model, capture(model, torch.tensor([context])), request, copy_ids, chunk=12)
    want = None
    for start in range(0, 30, 12):
        tail = request + copy_ids[start : start + 12]
        dense = capture(model, torch.tensor([context + tail]))
        rows = [reconstruction_attention(layer.query[:, :, -len(tail):], layer.keys, 40, layer.scaling)
                for layer in dense.layers if isinstance(layer, LayerTensors)]
        want = rows if want is None else [torch.maximum(a, b) for a, b in zip(want, rows, strict=True)]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_kvzip_needs_the_dense_path():
    model = tiny_model("llama")
    with pytest.raises(HeadwiseError, match="reconstruction"):
        make_cache(model, "kvzip", ratio=0.5)
    dense = capture(model, torch.randint(0, 128, (1, 20)))
    with pytest.raises(HeadwiseError, match="reconstruction"):
        compress(model, dense, make_plan("kvzip", ratio=0.5))
    with pytest.raises(HeadwiseError, match="question-agnostic"):
        plan_cells("m", ["kvzip"], [0.5], ["passkey"], [1024], protocols=("aware",), n_samples=1, seed=0)
    assert make_plan("kvzip", ratio=0.5).allocation == "global"  # the paper's budgets, by default
    with pytest.raises(HeadwiseError, match="needs allocation=global"):
        make_plan("kvzip", ratio=0.5, options={"allocation": "uniform"})


def test_a_policys_plan_defaults_apply_only_where_no_option_is_given():
    assert make_plan("kvzip", ratio=0.5).floor == 0.0  # kvzip's dev-chosen floor
    assert make_plan("kvzip", ratio=0.5, options={"floor": "0.3"}).floor == 0.3
    assert make_plan("snapkv", ratio=0.5, options={"allocation": "global"}).floor == 0.2  # the plan's own default
    with pytest.raises(HeadwiseError, match="floor applies only"):
        make_plan("snapkv", ratio=0.5, options={"floor": "0.1"})


def test_head_aware_policy_ranks_its_other_heads_by_reconstruction(tmp_path):
    from test_headwise_policy import synthetic_profile

    model = tiny_model("llama")  # 3 layers x 2 KV heads
    roles = [["retrieval", "local"], ["mixed", "local"], ["sink", "mixed"]]
    path = synthetic_profile(model, tmp_path, roles, [[0.6, 0.0], [0.0, 0.0], [0.0, 0.05]])
    torch.manual_seed(4)
    context = torch.randint(0, 128, (120,)).tolist()
    dense = capture(model, torch.tensor([context]))
    rows = [r for r in reconstruct(model, dense, [7, 8], context) if r is not None]
    plan = make_plan("headwise", ratio=0.6, options={"profile": path, "sinks": 2, "window": 10, "other": "kvzip",
                                                     "budgets": "roles"})
    with pytest.raises(HeadwiseError, match="reconstruction"):
        make_cache(model, "headwise", ratio=0.6, options={"profile": path, "other": "kvzip"})
    cache = compress(model, dense, plan, tuple(rows))
    layers = cache.compressed_layers
    assert layers[0].heads[0].positions.shape[1] == 120  # the retrieval head keeps everything
    assert layers[0].heads[1].positions[0].tolist() == [0, 1, *range(110, 120)]  # streaming: sinks + window
    for layer, h in ((1, 0), (2, 1)):  # the other heads: sinks, then their top reconstruction scores
        head = layers[layer].heads[h]
        score = rows[layer][0, h].clone()
        score[:2] = float("inf")
        want = torch.topk(score, head.positions.shape[1]).indices.sort().values
        assert torch.equal(head.positions[0].long(), want)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_global_allocation_keeps_the_top_scores_over_every_head_of_every_layer(arch):
    """KVzip's budgets: one top-k over all heads of all compressed layers (no floor), against a naive count."""
    model = tiny_model(arch)
    torch.manual_seed(5)
    context = torch.randint(0, 128, (80,)).tolist()
    dense = capture(model, torch.tensor([context]))
    rows = reconstruct(model, dense, [3, 4], context)
    cache = compress(model, dense, make_plan("kvzip", ratio=0.75, options={"floor": 0}), rows)
    scores = [r[0, h] for r in rows if r is not None for h in range(r.shape[1])]
    total = 20 * len(scores)  # a quarter of 80 tokens per head, on average
    threshold = torch.cat(scores).sort(descending=True).values[total - 1]
    kept = [head.positions[0].long() for layer in cache.compressed_layers for head in layer.heads]
    assert sum(k.numel() for k in kept) == total
    assert len({k.numel() for k in kept}) > 1  # the heads keep different amounts
    for k, s in zip(kept, scores, strict=True):
        assert torch.equal(k, torch.nonzero(s >= threshold).flatten())  # no ties in random scores
    with pytest.raises(HeadwiseError, match="dense prefill"):
        make_cache(model, "snapkv", ratio=0.5, options={"allocation": "global"})


def test_global_allocation_floor_keeps_a_share_in_every_head():
    model = tiny_model("llama")
    context = torch.randint(0, 128, (80,), generator=torch.Generator().manual_seed(6)).tolist()
    dense = capture(model, torch.tensor([context]))
    def kept(floor):
        plan = make_plan("snapkv", ratio=0.75, options={"allocation": "global", "floor": floor, "window": 4})
        return [n for layer in compress(model, dense, plan).compressed_layers for n in layer.kept()]

    assert min(kept(0)) < 18 and sum(kept(0)) == 20 * len(kept(0))
    assert min(kept(0.9)) >= 18 and sum(kept(0.9)) == 20 * len(kept(0.9))  # floor: 0.9 of a head's 20-token share


def test_head_aware_scores_budgets_keep_retrieval_heads_whole_and_the_rest_by_one_top_k(tmp_path):
    from test_headwise_policy import synthetic_profile

    model = tiny_model("llama")  # 3 layers x 2 KV heads
    roles = [["retrieval", "local"], ["mixed", "local"], ["sink", "mixed"]]
    path = synthetic_profile(model, tmp_path, roles, [[0.6, 0.0], [0.0, 0.0], [0.0, 0.05]])
    options = {"profile": path, "sinks": 2, "other": "kvzip", "budgets": "scores"}
    with pytest.raises(HeadwiseError, match="allocation=global"):
        make_plan("headwise", ratio=0.5, options={**options, "allocation": "adaptive"})
    context = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(7)).tolist()
    dense = capture(model, torch.tensor([context]))
    rows = reconstruct(model, dense, [9], context)
    plan = make_plan("headwise", ratio=0.5, options={**options, "floor": 0})
    cache = compress(model, dense, plan, rows)
    heads = [(layer, h) for layer in range(3) for h in range(2)]
    kept = {(layer, h): cache.compressed_layers[layer].heads[h].positions[0].long() for layer, h in heads}
    assert kept[0, 0].numel() == 100  # the retrieval head keeps everything
    assert sum(k.numel() for k in kept.values()) == 50 * 6
    rest = {k: rows[k[0]][0, k[1]].clone() for k in heads if k != (0, 0)}
    for s in rest.values():
        s[:2] = float("inf")  # sinks
    threshold = torch.cat(list(rest.values())).sort(descending=True).values[50 * 6 - 100 - 1]
    for k, s in rest.items():
        assert torch.equal(kept[k], torch.nonzero(s >= threshold).flatten()), k


def test_head_aware_scores_budgets_with_retrieval_keep_give_retrieval_heads_a_floor_not_the_whole(tmp_path):
    from test_headwise_policy import synthetic_profile

    model = tiny_model("llama")  # 3 layers x 2 KV heads; (0, 0) is the one retrieval head
    roles = [["retrieval", "local"], ["mixed", "local"], ["sink", "mixed"]]
    path = synthetic_profile(model, tmp_path, roles, [[0.6, 0.0], [0.0, 0.0], [0.0, 0.05]])
    context = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(8)).tolist()
    dense = capture(model, torch.tensor([context]))
    rows = reconstruct(model, dense, [9], context)
    options = {"profile": path, "sinks": 2, "other": "kvzip", "budgets": "scores", "retrieval_keep": 0.3}
    cache = compress(model, dense, make_plan("headwise", ratio=0.8, options={**options, "floor": 0}), rows)
    heads = [(layer, h) for layer in range(3) for h in range(2)]
    kept = {(layer, h): cache.compressed_layers[layer].heads[h].positions[0].long() for layer, h in heads}
    assert sum(k.numel() for k in kept.values()) == 20 * 6
    # naive reference: sinks and the retrieval head's top 30 tokens first, then one top-k over all the rest
    scores = {k: rows[k[0]][0, k[1]].clone() for k in heads}
    scores[0, 0][torch.topk(scores[0, 0], 30).indices] = float("inf")
    for s in scores.values():
        s[:2] = float("inf")
    threshold = torch.cat(list(scores.values())).sort(descending=True).values[20 * 6 - 1]
    for k, s in scores.items():
        assert torch.equal(kept[k], torch.nonzero(s >= threshold).flatten()), k
    assert 30 <= kept[0, 0].numel() < 100  # a floor, not the whole context
