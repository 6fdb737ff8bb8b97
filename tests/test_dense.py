"""One dense prefill feeds every policy and ratio: the cache built from it equals the direct path's.

Equal means the same kept positions in every layer and head, the same bytes, and the same logits for a
question fed afterwards, exactly (the same attention code runs in both paths).
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from headwise.api import make_cache, make_plan
from headwise.compat import forward
from headwise.dense import capture, compress
from headwise.generation import cache_bytes, prefill

CASES = [
    ("snapkv", 0.5, {}), ("tova", 0.75, {}), ("h2o", 0.5, {}), ("a2sf", 0.5, {}), ("knorm", 0.5, {}),
    ("streaming_llm", 0.75, {}), ("random", 0.5, {}), ("full", 0.0, {}),
    ("snapkv", 0.75, {"schedule": "pyramid"}), ("h2o", 0.5, {"allocation": "adaptive"}),
    ("tova", 0.5, {"compensate": "true"}),
]


def direct(model, method, ratio, options, head):
    cache = make_cache(model, method, ratio=ratio, prompt_length=head.shape[1], options=options)
    logits = prefill(model, head, cache)
    cache.seal()
    return cache, logits


def positions(cache):
    return [[h.positions.clone() for h in layer.heads] for layer in cache.compressed_layers]


def answer_logits(model, cache, tail):
    return forward(model, copy.deepcopy(cache), tail).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
def test_cache_from_dense_prefill_equals_direct_path(arch):
    model = tiny_model(arch)
    torch.manual_seed(1)
    head, tail = torch.randint(0, 128, (1, 200)), torch.randint(0, 128, (1, 6))
    dense = capture(model, head)
    for method, ratio, options in CASES:
        want, want_logits = direct(model, method, ratio, options, head)
        plan = make_plan(method, ratio=ratio, options=options)
        got = compress(model, dense, plan)
        got.seal()
        assert torch.equal(dense.logits, want_logits) or method != "full"
        for a, b in zip(positions(got), positions(want), strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (method, options)
        assert cache_bytes(got) == cache_bytes(want)
        assert torch.equal(answer_logits(model, got, tail), answer_logits(model, want, tail)), (method, options)


def test_dense_context_is_not_changed_by_compressing():
    model = tiny_model("llama")
    head = torch.randint(0, 128, (1, 96))
    dense = capture(model, head)
    before = [t.keys.clone() for t in dense.layers]
    compress(model, dense, make_plan("snapkv", ratio=0.5))
    assert all(torch.equal(a, t.keys) for a, t in zip(before, dense.layers, strict=True))


def test_dense_path_refuses_decode_mode():
    model = tiny_model("llama")
    dense = capture(model, torch.randint(0, 128, (1, 96)))
    with pytest.raises(ValueError, match="prefill mode"):
        compress(model, dense, make_plan("snapkv", ratio=0.5, mode="decode"))


@pytest.mark.slow
def test_dense_path_equals_direct_path_on_smollm2(smollm2):
    ids = smollm2.tokenizer("The pass key is 71432. Remember it. " * 40, return_tensors="pt")["input_ids"]
    head, tail = ids[:, :-8], ids[:, -8:]
    dense = capture(smollm2.model, head)
    for method, ratio in (("snapkv", 0.75), ("h2o", 0.9), ("tova", 0.5)):
        want, _ = direct(smollm2.model, method, ratio, {}, head)
        got = compress(smollm2.model, dense, make_plan(method, ratio=ratio))
        got.seal()
        for a, b in zip(positions(got), positions(want), strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), method
        assert torch.equal(answer_logits(smollm2.model, got, tail), answer_logits(smollm2.model, want, tail))
