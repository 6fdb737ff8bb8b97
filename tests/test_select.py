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
from headwise.select import Quest, RecycledAttention, TokenSelect, parse_selector
from headwise.select.pages import (
    extended,
    least_similarity,
    page_bounds,
    page_sums,
    selected_tokens,
    soft_vote,
    upper_bound_scores,
)


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


RULES = ["quest:budget=40,page=8,sinks=2,window=8", "tokenselect:budget=40,sinks=2,window=8",
         "recycled:budget=40,sinks=2,window=8,stride=4"]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("policy", ["full", "snapkv"])
@pytest.mark.parametrize("rule", RULES)
def test_a_decoding_step_equals_dense_attention_over_the_selected_tokens(arch, policy, rule):
    model = tiny_model(arch)
    torch.manual_seed(2)
    prompt = torch.randint(0, 128, (1, 120))
    cache = make_cache(model, policy, ratio=0.25 if policy == "snapkv" else None, select=rule)
    prefill(model, prompt, cache)
    token = torch.randint(0, 128, (1, 1))
    with torch.no_grad():  # a first step (Recycled Attention's full one, after which it reads a subset)
        forward(model, cache, token)
    chosen = {}
    selector = cache.plan.select
    original = selector.choose

    def recording(query, keys, state):
        choice = original(query, keys, state)
        chosen[len(chosen)] = choice.index
        return choice

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


def test_soft_votes_similarity_and_page_sums_match_loops():
    torch.manual_seed(3)
    query, keys = torch.randn(2, 3, 8), torch.randn(2, 21, 8)
    votes = soft_vote(query, keys)
    for b in range(2):
        for t in range(21):
            expected = 0.0
            for g in range(3):
                logits = [float(query[b, g] @ keys[b, j]) / 8 ** 0.5 for j in range(21)]
                top = max(logits)
                expected += torch.tensor(logits[t] - top).exp().item() / sum(
                    torch.tensor(x - top).exp().item() for x in logits)
            assert abs(float(votes[b, t]) - expected) < 1e-5
    other = torch.randn(2, 3, 8)
    cosines = [float(query[b, g] @ other[b, g] / query[b, g].norm() / other[b, g].norm())
               for b in range(2) for g in range(3)]
    assert abs(least_similarity(query, other) - min(cosines)) < 1e-5
    assert abs(least_similarity(query, 2 * query) - 1.0) < 1e-5  # the scale of a query does not matter
    sums = page_sums(votes, 4)
    assert sums.shape == (2, 6)
    for b in range(2):
        for p in range(6):
            assert abs(float(sums[b, p]) - float(votes[b, p * 4 : (p + 1) * 4].sum())) < 1e-5
    grown = extended(votes, 25)
    assert grown.shape == (2, 25) and torch.isinf(grown[:, 21:]).all() and torch.equal(grown[:, :21], votes)


def test_tokenselect_reads_the_voted_tokens_and_reuses_them_for_a_similar_query():
    torch.manual_seed(4)
    rule = TokenSelect(budget=12, sinks=2, window=3)
    query, keys = torch.randn(1, 2, 8), torch.randn(1, 40, 8)
    first = rule.choose(query, keys, None)
    votes = soft_vote(query, keys)[0]
    forced = {0, 1, 37, 38, 39}
    ranked = [t for t in votes.argsort(descending=True).tolist() if t not in forced]
    assert first.index[0].tolist() == sorted(forced | set(ranked[:7]))
    assert first.overhead == 20  # every key scored: half of the head's 40 tokens' bytes
    # a query in the same direction reuses the selection: nothing scored, and the token stored since is read
    again = rule.choose(3 * query, torch.cat([keys, torch.randn(1, 1, 8)], dim=1), first.state)
    assert again.overhead == 0 and again.state is first.state and 40 in again.index[0].tolist()
    fresh = rule.choose(-query, keys, first.state)
    assert fresh.overhead == 20 and fresh.state is not first.state


def test_recycled_attention_attends_fully_every_stride_steps():
    torch.manual_seed(5)
    rule = RecycledAttention(budget=10, sinks=1, window=2, stride=3)
    keys, state, reads = torch.randn(1, 30, 8), None, []
    full_query = torch.randn(1, 2, 8)
    for step in range(7):
        choice = rule.choose(full_query if step == 0 else torch.randn(1, 2, 8), keys, state)
        state = choice.state
        reads.append(None if choice.index is None else choice.index[0].tolist())
        keys = torch.cat([keys, torch.randn(1, 1, 8)], dim=1)
    assert [r is None for r in reads] == [True, False, False, True, False, False, True]
    votes = soft_vote(full_query, keys[:, :30])[0]
    # the step after the full one: its top tokens, the sinks, the window and the token stored since (30)
    forced = {0, 29, 30}
    ranked = [t for t in votes.argsort(descending=True).tolist() if t not in forced]
    assert reads[1] == sorted(forced | set(ranked[:7]))
    with pytest.raises(HeadwiseError, match="stride"):
        RecycledAttention(budget=100, stride=0)


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
        else:  # whole pages within the budget: at most 48 of the 201 to 203 tokens held, and 13 pages' bounds
            assert (32 + 13) / 203 < cache.read_fraction() <= (48 + 13) / 201
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
            assert head.selection.covered == 120
            mins, maxs = page_bounds(head.keys[:, :120], 8)
            torch.testing.assert_close(head.selection.mins, mins)
            torch.testing.assert_close(head.selection.maxs, maxs)
    evicting = make_cache(model, "h2o", budget=64, mode="decode", select="quest:budget=32,page=8,window=8")
    out = prefill(model, torch.randint(0, 128, (1, 100)), evicting)
    forward(model, evicting, out.argmax(-1, keepdim=True))
    assert all(head.selection is None for layer in evicting.compressed_layers for head in layer.heads)


def test_head_aware_selection_reads_by_role(tmp_path):
    from headwise.select.headaware import SinksAndWindow
    from test_headwise_policy import synthetic_profile

    model = tiny_model("llama")  # 3 layers x 2 KV heads
    roles = [["retrieval", "local"], ["mixed", "local"], ["sink", "mixed"]]
    path = synthetic_profile(model, tmp_path, roles, [[0.6, 0.0], [0.0, 0.0], [0.0, 0.05]])
    cache = make_cache(model, "full",
                       select=f"roles:profile={path},budget=24,page=4,sinks=2,window=6,dense_layers=1")
    assert cache.plan.select.kinds() == {(0, 0): "dense", (0, 1): "dense", (1, 0): "quest", (1, 1): "streaming",
                                         (2, 0): "streaming", (2, 1): "quest"}
    out = prefill(model, torch.randint(0, 128, (1, 100)), cache)
    forward(model, cache, out.argmax(-1, keepdim=True))
    heads = [layer.heads for layer in cache.compressed_layers]
    assert heads[0][0].reads is None and heads[0][1].reads is None  # the first layer reads everything
    assert isinstance(heads[1][1].reads, SinksAndWindow) and isinstance(heads[2][0].reads, SinksAndWindow)
    assert isinstance(heads[1][0].reads, Quest) and heads[1][0].selection is not None
    streaming = heads[1][1].reads.choose(torch.randn(1, 2, 16), heads[1][1].keys, None)
    assert streaming.index[0].tolist() == [0, 1, *range(95, 101)] and streaming.overhead == 0
    # two dense heads read all 101 tokens, two streaming heads 8, two Quest heads at most 24 and 26 pages' bounds
    fixed, held = 2 * 101 + 2 * 8 + 2 * 26, 6 * 101
    assert (fixed + 2 * 20) / held <= cache.read_fraction() <= (fixed + 2 * 24) / held
    with pytest.raises(HeadwiseError, match="needs a profile"):
        parse_selector("roles:budget=100")
    other = tiny_model("qwen3")
    with pytest.raises(HeadwiseError, match="profile"):
        make_cache(other, "full", select=f"roles:profile={path},budget=24,page=4,sinks=2,window=6")


def test_a_sealed_cache_can_be_read_by_another_rule():
    model = tiny_model("llama")
    prompt = torch.randint(0, 128, (1, 150))
    cache = make_cache(model, "full")
    out = prefill(model, prompt, cache)
    cache.seal()
    token = out.argmax(-1, keepdim=True)[:, -1:]
    plain = forward(model, copy.deepcopy(cache), token).logits
    selected = copy.deepcopy(cache)
    selected.read_by(parse_selector("quest:budget=24,page=8,sinks=2,window=6"))  # 24 tokens, 19 pages
    assert cache.plan.select is None  # the original's plan is untouched
    logits = forward(model, selected, token).logits
    assert 0 < selected.read_fraction() < 0.3 and not torch.allclose(logits, plain)
    undone = copy.deepcopy(cache)
    undone.read_by(parse_selector("quest:budget=24,page=8,sinks=2,window=6"))
    undone.read_by(None)  # reading every token again is the plain cache
    torch.testing.assert_close(forward(model, undone, token).logits, plain)
    assert undone.read_fraction() == 1.0
