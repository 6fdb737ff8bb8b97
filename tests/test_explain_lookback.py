"""Lookback ratios: the pure ratio against a loop, and the recorded ratios against the model's own eager attention."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from headwise.api import make_cache
from headwise.explain.lookback import forced_ratios, lookback_ratio, traced_answer
from headwise.generation import prefill
from profile_helpers import tiny_loaded


def naive_ratio(row: list[float], context: list[bool]) -> float:
    ctx = [p for p, c in zip(row, context, strict=True) if c]
    new = [p for p, c in zip(row, context, strict=True) if not c]
    a, b = sum(ctx) / len(ctx), sum(new) / len(new)
    return a / (a + b)


def test_lookback_ratio_matches_a_loop():
    torch.manual_seed(0)
    probs = torch.rand(3, 5, 11).softmax(-1)
    context = torch.rand(11) < 0.6
    context[0], context[-1] = True, False
    got = lookback_ratio(probs, context)
    for i in range(3):
        for j in range(5):
            assert got[i, j].item() == pytest.approx(naive_ratio(probs[i, j].tolist(), context.tolist()), rel=1e-5)


def test_lookback_ratio_needs_both_kinds_of_keys():
    with pytest.raises(ValueError):
        lookback_ratio(torch.ones(4) / 4, torch.ones(4, dtype=torch.bool))


def eager_ratios(model, ids: list[int], prompt: int, window: dict[int, int]) -> torch.Tensor:
    """Ratios [steps, layers, heads] from transformers' eager attention over the whole sequence: the rows of the
    answer's queries but the last, context = positions before ``prompt``, counting only keys the row may see."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    rows = []
    for p in range(prompt, len(ids) - 1):
        layer_rows = []
        for layer, att in enumerate(attentions):
            keys = range(max(0, p - window[layer] + 1) if layer in window else 0, p + 1)
            context = [k < prompt for k in keys]
            layer_rows.append([naive_ratio(att[0, h, p, list(keys)].tolist(), context) for h in range(att.shape[1])])
        rows.append(layer_rows)
    return torch.tensor(rows)


def windows(model) -> dict[int, int]:
    config = model.config
    types = getattr(config, "layer_types", None) or []
    return {i: config.sliding_window for i, t in enumerate(types) if t == "sliding_attention"}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("plain_cache", [False, True])
def test_recorded_ratios_equal_eager_attention(arch, plain_cache):
    from transformers import DynamicCache

    lm = tiny_loaded(arch)
    torch.manual_seed(1)
    ids = torch.randint(2, 120, (48,)).tolist()
    context, tail, answer = ids[:30], ids[30:40], ids[40:]
    cache = DynamicCache(config=lm.model.config) if plain_cache else make_cache(lm.model, "full")
    prefill(lm.model, torch.tensor([context]), cache)
    got = forced_ratios(lm, cache, tail, answer)
    want = eager_ratios(tiny_model(arch), ids, 40, windows(lm.model))
    assert got.shape == want.shape == (len(answer) - 1, lm.info.num_layers, lm.info.num_heads)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{"window": 8}, {"window": 8, "compensate": True}])
def test_attention_weights_reproduce_the_compressed_attention(options):
    """On an evicted cache (with and without a summary token) the weights times the kept values are the output."""
    model = tiny_model("llama")
    torch.manual_seed(2)
    ids = torch.randint(2, 120, (1, 40))
    cache = make_cache(model, "snapkv", ratio=0.5, options=options, prompt_length=40)
    prefill(model, ids, cache)
    cache.seal()
    layer = cache.layers[1]
    query = torch.randn(1, 4, 1, 16)
    weights = layer.attention_weights(query, None, 0.25)
    outputs = []
    for h, (probs, positions) in enumerate(weights):
        head = layer.heads[h]
        values = head.values if head.summary is None else torch.cat([head.summary[1], head.values], dim=1)
        assert positions.shape[1] == values.shape[1] == probs.shape[-1] < 41
        assert (positions[0, 1:] > positions[0, :-1]).all()
        outputs.append(probs @ values[:, None].float())
    want = layer.attend(query, None, 0.25).transpose(1, 2)
    torch.testing.assert_close(torch.cat(outputs, dim=1), want, rtol=1e-4, atol=1e-5)


def test_traced_answer_records_a_row_per_token_after_the_first():
    lm = tiny_loaded("llama")
    torch.manual_seed(3)
    ids = torch.randint(2, 120, (40,)).tolist()
    cache = make_cache(lm.model, "streaming_llm", ratio=0.5, prompt_length=30)
    prefill(lm.model, torch.tensor([ids[:30]]), cache)
    cache.seal()
    traced = traced_answer(lm, cache, ids[30:], max_new_tokens=6)
    assert traced.ratios.shape == (len(traced.tokens) - 1, 3, 4)
    assert ((traced.ratios > 0) & (traced.ratios < 1)).all()
    torch.testing.assert_close(traced.ratios, forced_ratios(lm, cache, ids[30:], traced.tokens))
    assert cache.get_seq_length() == 30  # answered on a copy


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_head_attention_equals_eager_attention_of_the_chosen_heads(arch):
    from headwise.explain.retrieval import head_attention

    lm = tiny_loaded(arch)
    torch.manual_seed(4)
    ids = torch.randint(2, 120, (46,)).tolist()
    context, tail, answer = ids[:30], ids[30:40], ids[40:]
    heads = [(1, 0), (1, 3), (3 if arch == "gemma3" else 2, 1)]
    cache = make_cache(lm.model, "full")
    prefill(lm.model, torch.tensor([context]), cache)
    got = head_attention(lm, cache, tail, answer, heads)
    model = tiny_model(arch)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    want = sum(attentions[layer][0, head, 39:45, :40].double().sum(0) for layer, head in heads)
    torch.testing.assert_close(got.relevance, want, rtol=1e-4, atol=1e-6)
    assert got.steps == 6 and torch.equal(got.held, torch.full((40,), 18.0, dtype=torch.float64))


def test_retrieval_attribution_over_an_evicted_cache_reads_only_kept_tokens():
    from headwise.explain.retrieval import retrieval_attribution

    lm = tiny_loaded("llama")
    torch.manual_seed(5)
    ids = torch.randint(2, 120, (60,)).tolist()
    cache = make_cache(lm.model, "snapkv", ratio=0.5, options={"window": 8}, prompt_length=50)
    prefill(lm.model, torch.tensor([ids[:50]]), cache)
    cache.seal()
    heads = [(2, 1)]  # KV head 0 of layer 2
    attribution, held = retrieval_attribution(lm, cache, ids[:50], ids[50:55], ids[55:], heads)
    kept = set(cache.layers[2].heads[0].positions[0].tolist()) | set(range(50, 55))
    for p in range(55):
        assert (held[p] == 1.0) == (p in kept)
        assert (held[p] == 0.0) == (p not in kept)
        if p not in kept:
            assert attribution.relevance[p] == 0.0
    assert attribution.relevance[0] == 0.0 and sum(attribution.relevance) == pytest.approx(1.0)
    assert len(attribution.tokens) == 55 and attribution.targets == list(range(54, 59))
