"""Decode-time selection: the page maths against naive loops, and a decoding step against dense attention over
the very tokens selected."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from headwise.api import make_cache
from headwise.compat import forward
from headwise.errors import HeadwiseError
from headwise.generation import prefill
from headwise.select import Quest, parse_selector
from headwise.select.pages import page_bounds, selected_tokens, upper_bound_scores


def test_page_bounds_and_quest_scores_match_loops():
    torch.manual_seed(0)
    keys, query, page = torch.randn(2, 37, 8), torch.randn(2, 3, 8), 8
    mins, maxs = page_bounds(keys, page)
    scores = upper_bound_scores(query, mins, maxs)
    for b in range(2):
        for p in range(5):
            block = keys[b, p * page : (p + 1) * page]
            torch.testing.assert_close(mins[b, p], block.min(dim=0).values)
            torch.testing.assert_close(maxs[b, p], block.max(dim=0).values)
            bound = max(sum(max(float(q[i] * block[:, i].min()), float(q[i] * block[:, i].max()))
                            for i in range(8)) for q in query[b])
            assert abs(float(scores[b, p]) - bound) < 1e-4
            # an upper bound of every key's logit in the page, for every query head
            assert float((query[b] @ block.T).max()) <= float(scores[b, p]) + 1e-5


def naive_selection(n, scores, page, budget, sinks, window):
    chosen = set(range(min(sinks, n))) | set(range(max(0, n - window), n))
    for p in sorted(range(len(scores)), key=lambda p: -scores[p]):
        fresh = [t for t in range(p * page, min(n, (p + 1) * page)) if t not in chosen]
        if len(chosen) + len(fresh) > budget:
            break
        chosen |= set(fresh)
    return sorted(chosen)


@pytest.mark.parametrize(("n", "page", "budget", "sinks", "window"),
                         [(100, 16, 48, 4, 16), (64, 8, 40, 0, 8), (37, 8, 20, 2, 5), (50, 16, 60, 4, 16)])
def test_selected_tokens_match_a_naive_greedy(n, page, budget, sinks, window):
    torch.manual_seed(n)
    scores = torch.randn(1, -(-n // page))
    got = selected_tokens(n, scores, page, budget, sinks, window)[0].tolist()
    expected = list(range(n)) if budget >= n else naive_selection(n, scores[0].tolist(), page, budget, sinks, window)
    assert got == expected
    assert len(got) <= max(budget, sinks + window)


def test_rows_of_a_batch_read_as_many_tokens():
    torch.manual_seed(1)
    index = selected_tokens(45, torch.randn(3, 6), 8, 30, 4, 4)
    assert index.shape[0] == 3 and all(len(set(row.tolist())) == index.shape[1] for row in index)
    assert all(row.tolist() == sorted(row.tolist()) for row in index)


def test_selector_options_are_checked():
    with pytest.raises(HeadwiseError, match="exactly one"):
        Quest()
    with pytest.raises(HeadwiseError, match="exactly one"):
        Quest(budget=64, fraction=0.5)
    with pytest.raises(HeadwiseError, match="below sinks"):
        Quest(budget=10, sinks=4, window=16)
    assert parse_selector("quest:budget=96, page=8") == Quest(budget=96, page=8)
    for bad, fragment in [("nope", "unknown selection"), ("quest:size=3", "unknown option"),
                          ("quest:budget=x", "expected a int"), ("quest:budget", "KEY=VALUE")]:
        with pytest.raises(HeadwiseError, match=fragment):
            parse_selector(bad)


def dense_over(model, cache, token, index_of):
    """The next logits when every compressed layer's heads attend only to the tokens ``index_of(layer, head)``:
    computed by copying the cache and keeping exactly those tokens (eviction), then a plain decoding step."""
    restricted = copy.deepcopy(cache)
    restricted.plan.select = None
    for layer in restricted.compressed_layers:
        for h, head in enumerate(layer.heads):
            index = index_of(layer.layer_idx, h)
            head.keep(index[index < head.keys.shape[1]][None])  # the step's own token is stored by the step
    return forward(model, restricted, token).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("policy", ["full", "snapkv"])
def test_a_decoding_step_equals_dense_attention_over_the_selected_tokens(arch, policy):
    model = tiny_model(arch)
    torch.manual_seed(2)
    prompt = torch.randint(0, 128, (1, 120))
    cache = make_cache(model, policy, ratio=0.25 if policy == "snapkv" else None,
                       select="quest:budget=40,page=8,sinks=2,window=8")
    prefill(model, prompt, cache)
    token = torch.randint(0, 128, (1, 1))
    chosen = {}
    selector = cache.plan.select
    original = selector.choose

    def recording(query, keys, summary):
        index, summary = original(query, keys, summary)
        chosen[len(chosen)] = index
        return index, summary

    selector.choose = recording  # an instance attribute of the test's own selector: records what it picks
    reference = copy.deepcopy(cache)
    logits = forward(model, cache, token).logits
    order = iter(range(len(chosen)))
    picks = {(layer.layer_idx, h): chosen[next(order)] for layer in reference.compressed_layers
             for h in range(len(layer.heads))}
    assert any(v is not None for v in picks.values())  # the budget is below what the heads hold
    expected = dense_over(model, reference, token,
                          lambda i, h: picks[(i, h)] if picks[(i, h)] is not None
                          else torch.arange(reference.layers[i].heads[h].keys.shape[1])[None])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert 0 < cache.read_fraction() < 1


def test_selection_reads_less_and_a_budget_above_the_cache_reads_all():
    model = tiny_model("llama")
    prompt = torch.randint(0, 128, (1, 200))
    logits = {}
    for budget in (48, 1000):
        cache = make_cache(model, "full", select=f"quest:budget={budget},page=16,window=16")
        out = prefill(model, prompt, cache)
        for _ in range(3):
            out = forward(model, cache, out.argmax(-1, keepdim=True)).logits[:, -1]
        logits[budget] = out
        if budget == 1000:
            assert cache.read_fraction() == 1.0
        else:  # whole pages within the budget: at most 48 of the 201 to 203 tokens held
            assert 32 / 203 < cache.read_fraction() <= 48 / 201
    plain = make_cache(model, "full")
    out = prefill(model, prompt, plain)
    for _ in range(3):
        out = forward(model, plain, out.argmax(-1, keepdim=True)).logits[:, -1]
    torch.testing.assert_close(logits[1000], out)  # reading everything is the plain cache


def test_page_summaries_follow_appends_and_eviction():
    model = tiny_model("llama")
    cache = make_cache(model, "full", select="quest:budget=32,page=8,window=8")
    out = prefill(model, torch.randint(0, 128, (1, 100)), cache)
    for _ in range(20):  # pages fill up as tokens are appended: summaries are extended, not rebuilt
        out = forward(model, cache, out.argmax(-1, keepdim=True)).logits[:, -1]
    for layer in cache.compressed_layers:
        for head in layer.heads:
            assert head.pages.covered == 120
            mins, maxs = page_bounds(head.keys[:, :120], 8)
            torch.testing.assert_close(head.pages.mins, mins)
            torch.testing.assert_close(head.pages.maxs, maxs)
    evicting = make_cache(model, "h2o", budget=64, mode="decode", select="quest:budget=32,page=8,window=8")
    out = prefill(model, torch.randint(0, 128, (1, 100)), evicting)
    forward(model, evicting, out.argmax(-1, keepdim=True))
    assert all(head.pages is None for layer in evicting.compressed_layers for head in layer.heads)
