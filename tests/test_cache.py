"""The compressed cache on tiny random models of each architecture (Llama GQA, Gemma 3 sliding, Qwen3 q/k norms).

What must hold: ratio 0 changes nothing; the kept tokens are exactly the policy's top scores; attention
over the compressed cache equals attention restricted to the kept keys at their original positions; the
bytes held follow the kept count.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from headwise.api import make_cache, make_plan
from headwise.attention import register
from headwise.cache import CompressedLayer, HeadwiseCache
from headwise.compat import cache_argument, cache_kwargs, forward
from headwise.errors import HeadwiseError
from headwise.generation import cache_bytes, prefill
from headwise.policies import POLICIES

ARCHS = ["llama", "gemma3", "qwen3"]

N = 48

# --- reference attention functions, registered through the same public interface -----------------------

RECORDED: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
KEPT: dict[int, list[torch.Tensor]] = {}


def _eager(query, key, value, allowed, scaling):
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    logits = (query @ key.transpose(-1, -2)) * scaling
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ value).transpose(1, 2), None


def _given_mask(attention_mask, q, n):
    if attention_mask is None:
        return torch.ones(q, n, dtype=torch.bool).tril(n - q)[None, None]
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0


def record_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Dense attention that records each layer's post-RoPE queries and keys."""
    RECORDED[module.layer_idx] = (query.detach().clone(), key.detach().clone(), scaling)
    return _eager(query, key, value, _given_mask(attention_mask, query.shape[2], key.shape[2]), scaling)


def kept_only_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Dense attention where the last query of a compressed layer sees only the kept keys (and itself)."""
    q, n = query.shape[2], key.shape[2]
    allowed = _given_mask(attention_mask, q, n).expand(1, query.shape[1], q, n).clone()
    if module.layer_idx in KEPT:
        group = query.shape[1] // key.shape[1]
        for h in range(query.shape[1]):
            row = torch.zeros(n, dtype=torch.bool)
            row[KEPT[module.layer_idx][h // group][0].long()] = True
            row[-1] = True
            allowed[0, h, -1] = row
    return _eager(query, key, value, allowed, scaling)


def compensated_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Like ``kept_only_attention``, plus one token per head for the evicted ones (all but the last query's
    own): their mean key and value, with its logit raised by log(count) so it weighs as that many tokens."""
    out, _ = kept_only_attention(module, query, key, value, attention_mask, scaling)
    if module.layer_idx not in KEPT:
        return out, None
    group = query.shape[1] // key.shape[1]
    n = key.shape[2]
    for h in range(query.shape[1]):
        keep = torch.zeros(n, dtype=torch.bool)
        keep[KEPT[module.layer_idx][h // group][0].long()] = True
        keep[-1] = True
        k, v = key[0, h // group], value[0, h // group]
        gone = ~keep
        keys = torch.cat([k[gone].mean(0, keepdim=True), k[keep]])
        values = torch.cat([v[gone].mean(0, keepdim=True), v[keep]])
        logits = (keys @ query[0, h, -1]) * scaling
        logits[0] += torch.log(gone.sum().float())
        out[0, -1, h] = logits.softmax(-1) @ values
    return out, None


ALLOWED: dict[int, torch.Tensor] = {}


def row_masked_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Dense attention where query row i of a compressed layer's KV head h sees the keys ``ALLOWED[layer][h, i]``."""
    q, n = query.shape[2], key.shape[2]
    allowed = _given_mask(attention_mask, q, n)
    if module.layer_idx in ALLOWED:
        group = query.shape[1] // key.shape[1]
        allowed = allowed & ALLOWED[module.layer_idx].repeat_interleave(group, 0)[None]
    return _eager(query, key, value, allowed, scaling)


for _name, _fn in (("record", record_attention), ("kept_only", kept_only_attention),
                   ("compensated", compensated_attention), ("row_masked", row_masked_attention)):
    register(_name, _fn)


def ids(n: int = N, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def plain_logits(model, input_ids, attn="sdpa") -> torch.Tensor:
    model.set_attn_implementation(attn)
    with torch.inference_mode():
        return forward(model, DynamicCache(config=model.config), input_ids).logits


def filled_layers(cache: HeadwiseCache, model, seen: int) -> list[CompressedLayer]:
    """The cache's compressed layers, after checking that every one holds every KV head and saw ``seen`` tokens
    (so a loop over heads cannot pass on a cache that was never filled)."""
    layers = cache.compressed_layers
    assert layers, "no compressed layer"
    for layer in layers:
        assert len(layer.heads) == model.config.num_key_value_heads and layer.seen == seen
        assert all(head.keys.shape[1] > 0 for head in layer.heads)
    return layers


# --- ratio 0 changes nothing -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_ratio_zero_gives_the_plain_logits(arch, mode):
    model = tiny_model(arch)
    prompt, follow = ids(N), ids(6, seed=1)
    reference = plain_logits(model, torch.cat([prompt, follow], 1))
    # the head-aware policy needs a profile; a reconstructing one (kvzip) a dense prefill (tests/test_kvzip.py)
    for policy in (name for name, cls in POLICIES.items() if name != "headwise" and not cls().reconstructs()):
        cache = make_cache(model, policy, ratio=None if policy == "full" else 0.0, mode=mode)
        with torch.inference_mode():
            first = forward(model, cache, prompt).logits
            steps = [forward(model, cache, follow[:, i : i + 1]).logits for i in range(follow.shape[1])]
        got = torch.cat([first, *steps], dim=1)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5, msg=f"{policy} {mode}")


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_at_ratio_zero_gives_the_plain_logits(arch):
    model = tiny_model(arch)
    prompt = ids(N)
    reference = plain_logits(model, prompt)
    for policy in ("snapkv", "h2o", "knorm"):
        cache = make_cache(model, policy, ratio=0.0)
        with torch.inference_mode():
            chunks = [forward(model, cache, prompt[:, s : s + 13]).logits for s in range(0, N, 13)]
        torch.testing.assert_close(torch.cat(chunks, 1), reference, rtol=1e-5, atol=1e-5, msg=policy)


# --- the kept tokens are the policy's top scores -----------------------------------------------------------


def reference_kept(policy, query, key, scaling, budget, group_reduce="mean") -> list[torch.Tensor]:
    """Positions each KV head should keep, computed densely from recorded queries and keys."""
    b, hq, n, _ = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    logits = (query @ key.repeat_interleave(group, 1).transpose(-1, -2)) * scaling
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    probs = probs.view(b, hkv, group, n, n)
    probs = probs.mean(2) if group_reduce == "mean" else probs.amax(2)
    kept = []
    for h in range(hkv):
        state = torch.zeros(b, 1, n)
        needed = policy.queries_needed()
        if needed != 0:
            rows = probs[:, h : h + 1] if needed is None else probs[:, h : h + 1, -needed:]
            state = policy.accumulate(state, rows)
        positions = torch.arange(n, dtype=torch.int32).expand(b, 1, n)
        score = policy.score(key[:, h : h + 1], key[:, h : h + 1], state, positions)[:, 0].float().clone()
        score[:, : policy.sinks] = float("inf")
        recent = policy.recent(budget)
        if recent:
            score[:, n - recent :] = float("inf")
        kept.append(torch.topk(score, budget, dim=1).indices.sort(dim=1).values)
    return kept


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy_name", ["streaming_llm", "h2o", "a2sf", "snapkv", "tova", "knorm"])
def test_kept_tokens_are_the_top_scores(arch, policy_name):
    check_kept_tokens(arch, policy_name, "mean")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy_name", ["h2o", "snapkv", "tova"])
def test_kept_tokens_are_the_top_scores_with_the_max_over_a_query_group(arch, policy_name):
    check_kept_tokens(arch, policy_name, "max")


def check_kept_tokens(arch: str, policy_name: str, group_reduce: str) -> None:
    model = tiny_model(arch)
    prompt = ids(N, seed=2)
    RECORDED.clear()
    plain_logits(model, prompt, attn="record")
    # TOVA per KV head here; its default, one choice per layer, has its own test below.
    options = {"snapkv": {"window": 8}, "tova": {"heads": "kv"}}.get(policy_name, {})
    cache = make_cache(model, policy_name, ratio=0.5, options={**options, "group_reduce": group_reduce})
    prefill(model, prompt, cache)
    budget = N // 2
    for layer in filled_layers(cache, model, N):
        query, key, scaling = RECORDED[layer.layer_idx]
        expected = reference_kept(layer.plan.policy, query, key, scaling, budget, group_reduce)
        for h, head in enumerate(layer.heads):
            assert head.positions.shape == (1, budget)
            assert torch.equal(head.positions.long(), expected[h]), (policy_name, layer.layer_idx, h)
            torch.testing.assert_close(head.keys, key[:, h].gather(1, expected[h][..., None].expand(-1, -1, 16)))


@pytest.mark.parametrize("arch", ARCHS)
def test_tova_keeps_in_every_head_the_top_tokens_of_the_last_query_averaged_over_the_layer(arch):
    """TOVA as Oren et al. (2024) define it: one choice per layer, by the last query's attention averaged over
    every query head of the layer."""
    model = tiny_model(arch)
    prompt = ids(N, seed=2)
    RECORDED.clear()
    plain_logits(model, prompt, attn="record")
    cache = make_cache(model, "tova", ratio=0.5)
    prefill(model, prompt, cache)
    budget = N // 2
    for layer in filled_layers(cache, model, N):
        query, key, scaling = RECORDED[layer.layer_idx]
        group = query.shape[1] // key.shape[1]
        last = (query[:, :, -1:] @ key.repeat_interleave(group, 1).transpose(-1, -2)) * scaling
        expected = torch.topk(last.softmax(-1).mean(dim=(1, 2)), budget, dim=1).indices.sort(dim=1).values
        for head in layer.heads:
            assert torch.equal(head.positions.long(), expected), layer.layer_idx
    per_kv_head = make_cache(model, "tova", ratio=0.5, options={"heads": "kv"})
    prefill(model, prompt, per_kv_head)
    if model.config.num_key_value_heads > 1:  # per KV head, the heads of some layer choose differently
        choices = [{tuple(h.positions[0].tolist()) for h in layer.heads} for layer in per_kv_head.compressed_layers]
        assert any(len(c) > 1 for c in choices)
    with pytest.raises(HeadwiseError, match="same tokens in every head"):
        make_plan("tova", ratio=0.5, options={"allocation": "adaptive"})
    make_plan("tova", ratio=0.5, options={"allocation": "adaptive", "heads": "kv"})


def test_random_drops_different_tokens_in_every_head_and_layer_reproducibly():
    model = tiny_model("llama")  # 3 layers x 2 KV heads

    def choices(seed: int) -> list[tuple[int, ...]]:
        cache = make_cache(model, "random", ratio=0.5, options={"seed": seed})
        prefill(model, ids(N, seed=5), cache)
        return [tuple(h.positions[0].tolist()) for layer in filled_layers(cache, model, N) for h in layer.heads]

    first = choices(0)
    assert len(set(first)) == len(first) == 6
    assert choices(0) == first and choices(1) != first


# --- attention over the compressed cache = attention to the kept keys at their original positions ---------


def next_logits_and_references(model, cache, *attns: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill a prompt into ``cache``, feed one more token; return its logits and those of each reference
    attention in ``attns`` run densely over prompt + token with ``KEPT`` set to the cache's kept positions
    (the reference layers see the fed token too: it is stored, never evicted here)."""
    prompt, extra = ids(N, seed=3), ids(1, seed=4)
    prefill(model, prompt, cache)
    with torch.inference_mode():
        got = forward(model, cache, extra).logits[:, -1]
    KEPT.clear()
    KEPT.update({layer.layer_idx: [h.positions for h in layer.heads] for layer in cache.compressed_layers})
    return got, [plain_logits(model, torch.cat([prompt, extra], 1), attn=a)[:, -1] for a in attns]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("allocation", ["uniform", "adaptive"])
def test_attention_over_compressed_cache_equals_kept_only_reference(arch, allocation):
    model = tiny_model(arch)
    cache = make_cache(model, "h2o", ratio=0.6, options={"allocation": allocation, "schedule": "pyramid"})
    got, [reference] = next_logits_and_references(model, cache, "kept_only")
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("policy", "options"), [("h2o", {}), ("snapkv", {"window": 4}), ("knorm", {})])
def test_chunked_prefill_with_eviction_equals_dense_attention_over_kept_tokens_plus_the_chunk(arch, policy, options):
    """Every query of chunk c sees what the cache kept after chunk c-1 and its own chunk up to itself; a dense
    forward masked row by row that way gives the same logits for every position of every chunk."""
    model = tiny_model(arch)
    prompt, size = ids(N, seed=20), 16
    cache = make_cache(model, policy, ratio=0.5, options=options)
    allowed = {layer.layer_idx: torch.zeros(model.config.num_key_value_heads, N, N, dtype=torch.bool)
               for layer in cache.compressed_layers}
    chunks = []
    for start in range(0, N, size):
        for layer in cache.compressed_layers:
            for h, head in enumerate(layer.heads):  # kept after the previous chunk
                allowed[layer.layer_idx][h, start : start + size, head.positions[0].long()] = True
            causal = torch.ones(size, size, dtype=torch.bool).tril()
            allowed[layer.layer_idx][:, start : start + size, start : start + size] |= causal
        with torch.inference_mode():
            chunks.append(forward(model, cache, prompt[:, start : start + size]).logits)
    assert all(n < N // 2 + size for layer in filled_layers(cache, model, N) for n in layer.kept())  # it evicted
    ALLOWED.clear()
    ALLOWED.update(allowed)
    reference = plain_logits(model, prompt, attn="row_masked")
    torch.testing.assert_close(torch.cat(chunks, 1), reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reference, plain_logits(model, prompt), rtol=1e-4, atol=1e-5)  # eviction mattered


class CopyingCache(HeadwiseCache):
    """A cache whose ``update`` returns a cast copy of what the layer returned: what a model does when it changes
    the key (a dtype cast, ``contiguous()``, a reshape) between ``update`` and attention."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        key, value = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return key.to(torch.float64).to(key.dtype).clone(), value.clone()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_model_that_changes_the_key_after_update_still_attends_over_the_kept_tokens(arch):
    model = tiny_model(arch)
    plan = make_plan("h2o", ratio=0.6)
    cache = make_cache(model, "h2o", ratio=0.6)
    got, [reference] = next_logits_and_references(model, cache, "kept_only")
    model.set_attn_implementation("headwise")
    copied, _ = next_logits_and_references(model, CopyingCache(model.config, plan), "kept_only")
    torch.testing.assert_close(copied, got, rtol=0, atol=0)
    torch.testing.assert_close(copied, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_compensation_token_equals_mean_of_evicted_weighted_by_their_count(arch):
    model = tiny_model(arch)
    cache = make_cache(model, "snapkv", ratio=0.6, options={"compensate": "true", "window": 4})
    got, [reference, without] = next_logits_and_references(model, cache, "compensated", "kept_only")
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    # Without the token the logits differ: the test can tell the two apart.
    assert not torch.allclose(got, without, rtol=1e-4, atol=1e-5)


def test_compensation_merges_every_eviction_across_chunks_and_counts_its_bytes():
    model = tiny_model("llama")
    prompt = ids(N, seed=6)
    plain_logits(model, prompt, attn="record")  # layer 0's keys/values do not depend on earlier attention
    _, key, _ = RECORDED[0]
    cache = make_cache(model, "knorm", ratio=0.75, options={"compensate": True})
    prefill(model, prompt, cache, chunk_size=16)
    layer = filled_layers(cache, model, N)[0]
    for h, head in enumerate(layer.heads):
        gone = torch.ones(N, dtype=torch.bool)
        gone[head.positions[0].long()] = False
        assert head.evicted.item() == gone.sum().item() == N - head.keys.shape[1]
        torch.testing.assert_close(head.summary[0][0, 0], key[0, h][gone].mean(0), rtol=1e-5, atol=1e-6)
    d = model.config.head_dim
    assert layer.nbytes() == sum((n + 1) * 2 * d * 4 for n in layer.kept())


# --- memory follows the kept count -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_bytes_follow_kept_count(arch, ratio):
    model = tiny_model(arch)
    prompt = ids(100, seed=5)
    full = DynamicCache(config=model.config)
    prefill(model, prompt, full)
    cache = make_cache(model, "knorm", ratio=ratio)
    prefill(model, prompt, cache)
    keep = round((1 - ratio) * 100)
    cfg = model.config
    per_token = 2 * cfg.head_dim * 4  # key + value, float32
    for layer in cache.compressed_layers:
        assert layer.kept() == [keep] * cfg.num_key_value_heads
        assert layer.nbytes() == keep * per_token * cfg.num_key_value_heads
    compressed_full_layers = [i for i, layer in enumerate(cache.layers) if isinstance(layer, CompressedLayer)]
    full_bytes_there = sum(full.layers[i].keys.nbytes + full.layers[i].values.nbytes for i in compressed_full_layers)
    held_there = sum(cache.layers[i].nbytes() for i in compressed_full_layers)
    assert held_there / full_bytes_there == pytest.approx(1 - ratio, rel=0.01)
    assert cache_bytes(cache) < cache_bytes(full)


def test_adaptive_allocation_gives_heads_different_budgets_and_frees_their_memory():
    model = tiny_model("qwen3")
    cache = make_cache(model, "snapkv", ratio=0.7, options={"allocation": "adaptive", "window": 4, "floor": 0.1})
    prefill(model, ids(120, seed=6), cache)
    target = round(0.3 * 120)
    for layer in cache.compressed_layers:
        kept = layer.kept()
        assert sum(kept) == target * len(kept)
        assert layer.nbytes() == sum(kept) * 2 * 16 * 4
    assert any(len(set(layer.kept())) > 1 for layer in cache.compressed_layers)


@pytest.mark.parametrize(
    ("policy", "amount", "expected"),
    [
        ("knorm", {"budget": 40}, [60, 40, 20]),
        ("knorm", {"ratio": 0.2}, [100, 90, 50]),  # the first layer holds only 100: its 20 more go to the others
        ("snapkv", {"ratio": 0.6}, [54, 34, 32]),  # the last layer keeps SnapKV's 32 (its window), not 20
    ],
)
def test_pyramid_schedule_shrinks_with_depth_and_keeps_the_mean_budget(policy, amount, expected):
    model = tiny_model("llama")  # 3 layers, multipliers 1.5, 1, 0.5
    cache = make_cache(model, policy, **amount, options={"schedule": "pyramid", "slope": 0.5})
    prefill(model, ids(100, seed=7), cache)
    assert [layer.kept() for layer in cache.compressed_layers] == [[n, n] for n in expected]


# --- the three ways to apply it ----------------------------------------------------------------------------


def test_chunked_prefill_holds_budget_plus_one_chunk():
    model = tiny_model("llama")
    cache = make_cache(model, "snapkv", budget=30, options={"window": 8})
    cache.check_prompt(120)  # chunks by hand: the first forward is not the whole prompt
    stored = []
    for start in range(0, 120, 20):
        chunk = ids(120, seed=8)[:, start : start + 20]
        with torch.inference_mode():
            forward(model, cache, chunk)
        stored.append(max(max(k) for k in cache.kept()))
    assert stored == [20, 30, 30, 30, 30, 30]
    assert cache.get_seq_length() == 120


def test_decode_mode_keeps_the_budget_while_generating():
    model = tiny_model("gemma3")
    cache = make_cache(model, "tova", budget=20, mode="decode")
    prefill(model, ids(40, seed=9), cache)
    with torch.inference_mode():
        for token in ids(15, seed=10)[0]:
            forward(model, cache, token.view(1, 1))
            assert cache.kept() == [[20], [20]]
    assert cache.get_seq_length() == 55


def test_seal_stops_compression_so_questions_are_kept():
    model = tiny_model("llama")
    cache = make_cache(model, "knorm", ratio=0.5)
    prefill(model, ids(40, seed=11), cache)
    cache.seal()
    prefill(model, ids(10, seed=12), cache)
    assert cache.kept()[0] == [30, 30]


def test_generate_greedy_and_sampling_with_a_compressed_cache():
    model = tiny_model("llama")
    prompt = ids(40, seed=13)
    cache = make_cache(model, "snapkv", ratio=0.5, options={"window": 8})
    out = model.generate(prompt, **cache_kwargs(model, cache), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert cache.get_seq_length() == 47  # the prompt and every generated token but the last went through it
    # The same tokens from a manual greedy loop on a fresh cache.
    manual = make_cache(model, "snapkv", ratio=0.5, options={"window": 8})
    logits = prefill(model, prompt, manual)
    tokens = []
    with torch.inference_mode():
        for _ in range(8):
            tokens.append(int(logits.argmax(-1)))
            logits = forward(model, manual, torch.tensor([[tokens[-1]]])).logits[:, -1]
    assert out[0, 40:].tolist() == tokens
    sampled = model.generate(prompt, **cache_kwargs(model, make_cache(model, "h2o", budget=16, mode="decode")),
                             max_new_tokens=8, do_sample=True, top_k=5, pad_token_id=0)
    assert sampled.shape == (1, 48)


@pytest.mark.skipif(cache_argument(tiny_model("llama")) != "cache", reason="before 5.24 it is past_key_values")
def test_generate_takes_a_headwise_cache_under_its_new_name():
    model = tiny_model("llama")
    cache = make_cache(model, "knorm", ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.generate(ids(40, seed=13), cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert cache.get_seq_length() == 43 and cache.kept()[0] == [23, 23]  # 20 kept + 3 generated


def test_batch_after_prefill_matches_each_row_alone():
    model = tiny_model("qwen3")
    batch = ids(40, seed=14, batch=2)
    cache = make_cache(model, "snapkv", ratio=0.5, options={"window": 8})
    logits = prefill(model, batch, cache)
    follow = ids(1, seed=15).expand(2, 1)
    with torch.inference_mode():
        step = forward(model, cache, follow).logits[:, -1]
    for row in range(2):
        alone = make_cache(model, "snapkv", ratio=0.5, options={"window": 8})
        torch.testing.assert_close(prefill(model, batch[row : row + 1], alone), logits[row : row + 1])
        with torch.inference_mode():
            single = forward(model, alone, follow[:1]).logits[:, -1]
        torch.testing.assert_close(single, step[row : row + 1], rtol=1e-4, atol=1e-5)


def test_left_padded_batch_at_ratio_zero_matches_unpadded_rows():
    model = tiny_model("llama")
    long, short = ids(30, seed=16), ids(22, seed=17)
    padded = torch.cat([torch.zeros(1, 8, dtype=torch.long), short], 1)
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.zeros(1, 8), torch.ones(1, 22)], 1)]).long()
    cache = make_cache(model, "knorm", ratio=0.0)
    with torch.inference_mode():
        out = forward(model, cache, torch.cat([long, padded]), attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(out[1:], plain_logits(model, short)[:, -1], rtol=1e-4, atol=1e-5)


def test_deepcopy_lets_one_compressed_context_serve_several_questions():
    model = tiny_model("llama")
    cache = make_cache(model, "knorm", ratio=0.5)
    prefill(model, ids(40, seed=18), cache)
    cache.seal()
    first = copy.deepcopy(cache)
    prefill(model, ids(5, seed=19), first)
    assert cache.get_seq_length() == 40 and first.get_seq_length() == 45


# --- clear errors ------------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(HeadwiseError, match=r"ratio must be in \[0, 1\)"):
        make_plan("snapkv", ratio=1.0)
    with pytest.raises(HeadwiseError, match="ratio must be"):
        make_plan("snapkv", ratio=-0.1)
    with pytest.raises(HeadwiseError, match="larger than the prompt"):
        make_plan("knorm", budget=100, prompt_length=50)
    with pytest.raises(HeadwiseError, match="below the minimum"):
        make_plan("streaming_llm", budget=2)
    with pytest.raises(HeadwiseError, match="below the minimum"):
        make_plan("snapkv", ratio=0.9, prompt_length=100)
    with pytest.raises(HeadwiseError, match="exactly one"):
        make_plan("knorm")
    with pytest.raises(HeadwiseError, match="unknown policy"):
        make_plan("nope", ratio=0.5)
    with pytest.raises(HeadwiseError, match="unknown option"):
        make_plan("knorm", ratio=0.5, options=["window=3", "colour=red"])
    with pytest.raises(HeadwiseError, match="expected a int"):
        make_plan("snapkv", ratio=0.5, options=["window=wide"])
    with pytest.raises(HeadwiseError, match="unknown allocation"):
        make_plan("knorm", ratio=0.5, options=["allocation=greedy"])
    with pytest.raises(HeadwiseError, match="unknown mode"):
        make_plan("knorm", ratio=0.5, mode="sometimes")


def test_a_headwise_cache_without_headwise_attention_is_refused():
    model = tiny_model("llama")
    cache = HeadwiseCache(model.config, make_plan("knorm", ratio=0.5))
    model.set_attn_implementation("sdpa")
    with pytest.raises(HeadwiseError, match="'headwise' attention"), torch.inference_mode():
        forward(model, cache, ids(10))


def test_the_whole_prompt_is_checked_against_the_policy_minimum():
    model = tiny_model("llama")
    prompt = ids(81)  # snapkv at ratio 0.75 would keep 20, below its minimum of 32 (sinks + window)
    with pytest.raises(HeadwiseError, match="keeps 20 of 81 tokens, below the minimum"):
        prefill(model, prompt, make_cache(model, "snapkv", ratio=0.75))
    with pytest.raises(HeadwiseError, match="keeps 20 of 81 tokens"):
        model.generate(prompt, **cache_kwargs(model, make_cache(model, "snapkv", ratio=0.75)), max_new_tokens=2)
    cache = make_cache(model, "snapkv", ratio=0.75)
    prefill(model, ids(200), cache, chunk_size=40)  # chunks keep the minimum for a while; the whole prompt is fine
    assert cache.kept()[0] == [50, 50]


def test_in_decode_mode_a_budget_larger_than_the_prompt_is_grown_into():
    model = tiny_model("llama")
    cache = make_cache(model, "h2o", budget=16, mode="decode")
    prefill(model, ids(10), cache)
    with torch.inference_mode():
        for token in ids(10, seed=21)[0]:
            forward(model, cache, token.view(1, 1))
    assert cache.kept()[0] == [16, 16] and cache.get_seq_length() == 20


def test_chunk_keeps_whole_runs_of_tokens_besides_the_protected_ones():
    model = tiny_model("llama")
    n, size, sinks, window = 100, 8, 2, 4
    cache = make_cache(model, "snapkv", ratio=0.6, options={"chunk": size, "sinks": sinks, "window": window})
    prefill(model, ids(n, seed=3), cache)
    for layer in cache.compressed_layers:
        for head in layer.heads:
            kept = set(head.positions[0].tolist())
            assert set(range(sinks)) | set(range(n - window, n)) <= kept
            runs = {p // size for p in kept - set(range(sinks)) - set(range(n - window, n))}
            partial = [r for r in runs if not set(range(r * size, min(n, (r + 1) * size))) <= kept]
            # Every run is kept whole, but for the protected tokens' runs and the one the budget cuts.
            protected_runs = {p // size for p in (*range(sinks), *range(n - window, n))}
            assert len(set(partial) - protected_runs) <= 1
    with pytest.raises(HeadwiseError, match="chunk must be"):
        make_cache(model, "snapkv", ratio=0.6, options={"chunk": 0})
